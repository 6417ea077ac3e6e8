"""A whole federation in one process: the Federation's messages moved by function call instead of NVFlare.

What fast tests and benchmarks run; the NVFlare controller drives the same :class:`Federation`, so the two cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

from fedbpt.core.config import RunConfig
from fedbpt.core.server.checkpoint import after_round, open_run
from fedbpt.core.server.federation import Federation
from fedbpt.core.server.summary import RunSummary
from fedbpt.core.wire import payload_bytes


def run_in_process(
    cfg: RunConfig,
    site_runtime: Callable[[str], object],
    progress: Callable[[str], None] | None = None,
    out_dir: str | None = None,
) -> RunSummary:
    """Run the whole federation in this process: ``site_runtime(site)`` returns that site's SiteRuntime.

    With ``out_dir``, checkpoints are written there as the NVFlare controller writes them; ``cfg.resume``
    continues from one. bytes_down / bytes_up are exact payload bytes (wire.payload_bytes: arrays, numbers and
    strings, without keys or NVFlare framing); the controller counts FOBS-serialised Shareables instead, a few
    hundred bytes more.
    """
    sites = [f"site-{i}" for i in range(1, cfg.num_clients + 1)]
    fed = Federation(cfg, sites)
    first = open_run(fed)
    for rnd in range(first, cfg.num_rounds):
        targets, msg = fed.start_round(rnd)
        results = {s: site_runtime(s).run_round(msg["state"], bool(msg["evaluate"])) for s in targets}
        up = {s: payload_bytes(r) for s, r in results.items()}
        row = fed.finish_round(rnd, targets, results, payload_bytes(msg), up)
        after_round(fed, rnd, out_dir)
        if progress:
            progress(fed.summary.progress_line(row))
    msg = fed.final_message()
    row = fed.finish({s: site_runtime(s).final_evaluate(msg) for s in sites})
    if progress:
        progress(fed.summary.progress_line(row))
    return fed.summary
