"""Fault injection, for tests and failure drills: one site raises, crashes, hangs or uploads garbage in a round.

``FEDBPT_FAULT="site-2:1:raise,site-3:2:hang"`` (``site:round:mode``, comma-separated). The executor reads it in
the site's own process, so it reaches simulator clients (they inherit the environment of ``job.py``) and deployed
sites (set it before starting the site). Unset, nothing changes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np

from fedbpt.tasks import ConfigError

log = logging.getLogger(__name__)

ENV = "FEDBPT_FAULT"
MODES = {
    "raise": "the round's task raises (the executor answers EXECUTION_EXCEPTION)",
    "exit": "the site's job process exits at once, as on a crash",
    "hang": "the site does not answer; it waits until the task is aborted",
    "nan": "the upload's mean is all NaN",
    "huge": "the upload's mean is 10 times longer than d",
}
EXIT_CODE = 17
HANG_POLL_SECONDS = 0.1


class InjectedFault(RuntimeError):
    """Raised by the 'raise' mode."""


def parse(spec: str) -> dict[tuple[str, int], str]:
    """``"site-2:1:raise,site-3:2:hang"`` -> {("site-2", 1): "raise", ("site-3", 2): "hang"}."""
    plan = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].strip().isdigit() or parts[2].strip() not in MODES:
            raise ConfigError(
                f"${ENV} item '{item}' is not site:round:mode with mode one of {', '.join(MODES)} (e.g. site-2:1:raise)"
            )
        plan[(parts[0].strip(), int(parts[1]))] = parts[2].strip()
    return plan


def fault_for(site: str, rnd: int, env: dict | None = None) -> str | None:
    spec = (os.environ if env is None else env).get(ENV, "")
    return parse(spec).get((site, int(rnd))) if spec else None


def run_with_faults(site: str, rnd: int, work: Callable[[], dict], should_stop: Callable[[], bool]) -> dict:
    """``work()`` (this site's round), unless a fault is planned for this site and round."""
    mode = fault_for(site, rnd)
    if mode is None:
        return work()
    log.warning("%s: injecting fault '%s' in round %d (%s)", site, mode, rnd, ENV)
    if mode == "raise":
        raise InjectedFault(f"{site}: injected fault in round {rnd}")
    if mode == "exit":
        logging.shutdown()
        os._exit(EXIT_CODE)
    if mode == "hang":
        while not should_stop():
            time.sleep(HANG_POLL_SECONDS)
        raise InterruptedError(f"{site}: injected hang in round {rnd} aborted")
    out = work()
    if mode == "nan":
        out["mean"] = np.full_like(out["mean"], np.nan)
    else:  # huge
        out["mean"] = np.tile(out["mean"], 10)
    return out
