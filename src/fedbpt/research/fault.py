"""Fault injection, for tests and failure drills: one site raises, crashes, hangs or uploads garbage in a round.

A plan is ``"site-2:1:raise,site-3:2:hang"`` (``site:round:mode``, comma-separated). It is never part of a
production job: ``FedBPTRecipe(fault_plan=...)`` (or ``FEDBPT_FAULT=...`` in the environment of ``job.py``)
swaps in flare.drill's executor, which carries the plan in its arguments, so the exported job holds this module
only when a plan was given.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np

from fedbpt.errors import ConfigError, InjectedFault

log = logging.getLogger(__name__)

MODES = {
    "raise": "the round's task raises (the executor answers EXECUTION_EXCEPTION)",
    "exit": "the site's job process exits at once, as on a crash",
    "hang": "the site does not answer; it waits until the task is aborted",
    "nan": "the upload's mean is all NaN",
    "huge": "the upload's mean is 10 times longer than d",
}
EXIT_CODE = 17
HANG_POLL_SECONDS = 0.1


def parse(spec: str) -> dict[tuple[str, int], str]:
    """``"site-2:1:raise,site-3:2:hang"`` -> {("site-2", 1): "raise", ("site-3", 2): "hang"}."""
    plan = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].strip().isdigit() or parts[2].strip() not in MODES:
            raise ConfigError(
                f"fault plan item '{item}' is not site:round:mode with mode one of {', '.join(MODES)} "
                "(e.g. site-2:1:raise)"
            )
        plan[(parts[0].strip(), int(parts[1]))] = parts[2].strip()
    return plan


def run_with_faults(
    mode: str | None, site: str, rnd: int, work: Callable[[], dict], should_stop: Callable[[], bool]
) -> dict:
    """``work()`` (this site's round), unless ``mode`` names a fault for it."""
    if mode is None:
        return work()
    log.warning("%s: injecting fault '%s' in round %d", site, mode, rnd)
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
