"""The server's round logic, free of NVFlare: who takes part, what they get, what their answers change.

The NVFlare controller moves these messages over the network; :func:`run_in_process` moves them by function
call, which is what fast tests and benchmarks use. Both drive the same :class:`Federation`, so they cannot
drift apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from fedbpt.core.baselines import make_server
from fedbpt.core.checkpoint import after_round, open_run
from fedbpt.core.config import clients_per_round
from fedbpt.core.summary import RunSummary
from fedbpt.core.tasks import get_task
from fedbpt.core.wire import COUNTS, decode_counts, decode_eval, decode_update, encode_state, payload_bytes
from fedbpt.errors import PayloadError, TooFewClients

log = logging.getLogger(__name__)


class Federation:
    def __init__(self, cfg: dict, sites: list[str]) -> None:
        self.cfg = cfg
        self.sites = sorted(sites)
        self.k = min(clients_per_round(cfg), len(self.sites))
        self.server = make_server(cfg, self.k, self.sites)
        task = get_task(cfg["task_name"])
        self.num_labels = task.num_classes
        self.summary = RunSummary(cfg, task.metric)
        self._rng = np.random.default_rng([cfg["seed"], 7])  # client sampling, separate from every other stream
        self._t0 = 0.0
        self._state = None

    def drop_sites(self, sites) -> None:
        """Take sites out of the rotation (they failed setup); rounds sample from the rest, as many as it has."""
        self.sites = sorted(set(self.sites) - set(sites))

    def start_round(self, rnd: int) -> tuple[list[str], dict]:
        """The sampled sites and the message every one of them gets."""
        self._t0 = time.time()
        targets = sorted(self._rng.choice(self.sites, size=min(self.k, len(self.sites)), replace=False).tolist())
        self._state = self.server.state(rnd)
        evaluate = rnd % self.cfg["eval_every"] == 0
        return targets, {"state": encode_state(self._state, self.cfg["cov_mode"]), "evaluate": int(evaluate)}

    def finish_round(
        self, rnd: int, targets: list[str], results: dict, bytes_down: int = 0, bytes_up: dict | None = None
    ) -> dict:
        """Validate the uploads, aggregate, record the round. ``results``: site -> payload dict.

        A malformed evaluation report rejects the whole upload, as a malformed search result does: either means a
        broken or hostile client.
        """
        cfg = self.cfg
        updates, evals = [], {}
        for site, payload in sorted(results.items()):
            try:
                update = decode_update(site, payload, cfg["intrinsic_dim"], cfg["local_iter"], cfg["bound"])
                evals[site] = decode_eval(payload, self.num_labels, cfg["loss_type"])
            except PayloadError as exc:
                log.error("round %d: rejected the update of %s: %s", rnd, site, exc)
                continue
            updates.append(update)
        missing = sorted(set(targets) - {u.site for u in updates})
        if missing:
            log.warning("round %d: no usable update from %s", rnd, ", ".join(missing))
        if len(updates) < cfg["min_clients"]:
            reason = (
                f"round {rnd}: {len(updates)} usable updates, fewer than --min_clients {cfg['min_clients']} "
                f"(missing: {', '.join(missing)})"
            )
            self.summary.fail(reason)
            raise TooFewClients(reason)
        info = self.server.aggregate(updates)
        fits = np.array([u.fitness for u in updates])
        up = [bytes_up[u.site] for u in updates] if bytes_up else []
        return self.summary.add_round(
            rnd,
            self._state.mean,
            evals,
            [u.site for u in updates],
            missing=missing,
            sigma=info.sigma_sent,
            sigma_before_tell=info.sigma_before_tell,
            best_fitness=float(fits.min()),
            median_fitness=float(np.median(fits)),
            clipped=info.clipped,
            sigma_local_median=float(np.median([u.sigma_final for u in updates])),
            client_stats=info.clients,
            seconds=time.time() - self._t0,
            client_seconds={s: _work_seconds(results[s]) for s in evals},  # model work: the rest is orchestration
            setup_seconds={s: float(results[s].get("setup_seconds", 0.0)) for s in evals},  # building its runtime
            import_seconds={s: float(results[s].get("import_seconds", 0.0)) for s in evals},
            bytes_down=int(bytes_down),
            bytes_up=int(np.mean(up)) if up else 0,
            **({"restored_to": info.notes["restored_to"]} if "restored_to" in info.notes else {}),
            **_summed_counts(decode_counts(results[u.site]) for u in updates),
        )

    def final_message(self) -> dict:
        """The final prompt; with --test_eval end also the best-dev prompt, the one the test set is scored for."""
        self._state = self.server.state(self.cfg["num_rounds"])
        msg = {"state": encode_state(self._state, "none")}
        if self.cfg["test_eval"] == "end" and self.summary.best_z is not None:
            msg["best_mean"] = np.asarray(self.summary.best_z, dtype=np.float64)
        return msg

    def finish(self, results: dict) -> dict:
        """Record the final evaluation; a malformed report is dropped (there is no search state to protect)."""
        evals, counts = {}, []
        for site, payload in sorted(results.items()):
            try:
                evals[site] = decode_eval(payload, self.num_labels, self.cfg["loss_type"])
                counts.append(decode_counts(payload))
            except PayloadError as exc:
                log.error("final evaluation: dropped the report of %s: %s", site, exc)
        row = self.summary.add_final(self.cfg["num_rounds"], self._state.mean, evals)
        row.update(_summed_counts(counts))
        row["totals"] = _summed_counts(self.summary.rounds + [row])  # the run's cost, final evaluation included
        return row


def _summed_counts(reports) -> dict:
    """queries, eval_queries and tokens summed over sites' reports (or rows); absent counts add nothing."""
    out = dict.fromkeys(COUNTS, 0)
    for report in reports:
        for key in COUNTS:
            out[key] += report.get(key, 0)
    return out


def _work_seconds(payload: dict) -> float:
    return float(payload.get("seconds_search", 0.0)) + float(payload.get("seconds_eval", 0.0))


def run_in_process(
    cfg: dict,
    site_runtime: Callable[[str], object],
    progress: Callable[[str], None] | None = None,
    out_dir: str | None = None,
) -> RunSummary:
    """Run the whole federation in this process: ``site_runtime(site)`` returns that site's SiteRuntime.

    With ``out_dir``, checkpoints are written there as the NVFlare controller writes them; ``cfg["resume"]``
    continues from one. bytes_down / bytes_up are exact payload bytes (wire.payload_bytes: arrays, numbers and
    strings, without keys or NVFlare framing); the controller counts FOBS-serialised Shareables instead, a few
    hundred bytes more.
    """
    sites = [f"site-{i}" for i in range(1, cfg["num_clients"] + 1)]
    fed = Federation(cfg, sites)
    first = open_run(fed, cfg)
    for rnd in range(first, cfg["num_rounds"]):
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
