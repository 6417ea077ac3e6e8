"""The server's round logic, free of NVFlare: who takes part, what they get, what their answers change.

The NVFlare controller moves these messages over the network; core.server.inprocess moves them by function call, which
is what fast tests and benchmarks use. Both drive the same :class:`Federation`, so they cannot drift apart. The
Federation owns the run's state (:meth:`Federation.state_dict`), which a checkpoint file holds (core.server.checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from fedbpt.core.algorithm.aggregation import RobustServerES, ServerES
from fedbpt.core.algorithm.baselines import make_server
from fedbpt.core.data.tasks import get_task
from fedbpt.core.server.summary import RunSummary
from fedbpt.core.state import (
    StateError,
    check_generator_state,
    check_global_state,
    generator_state,
    global_state,
    integer,
    mapping,
    member,
    sequence,
    set_generator_state,
    set_global_state,
)
from fedbpt.core.wire import COUNTS, decode_counts, decode_eval, decode_update, encode_state
from fedbpt.errors import CheckpointError, PayloadError, TooFewClients, opt

if TYPE_CHECKING:
    from fedbpt.core.config import RunConfig

log = logging.getLogger(__name__)

# Settings that fix the search space, the data, the clients' objective and the server's update: a checkpoint only
# continues a run that shares all of them. Rounds, evaluation cadence, timeouts, paths and devices may change.
MUST_MATCH = (
    "aggregation",
    "task_name",
    "intrinsic_dim",
    "seed",
    "model_name",
    "n_prompt_tokens",
    "cat_or_add",
    "label_encoding",
    "prompt_placement",
    "sigma",
    "bound",
    "num_clients",
    "frac",
    "server_sigma",
    "local_adaptation",
    "cov_mode",
    "k_shot",
    "dev_shot",
    "iid",
    "alpha_dir",
    "partition",
    "loss_type",
    "perturb",
    "perturb_rate",
    "eq7",
    "local_iter",
    "local_popsize",
)

# Settings added to MUST_MATCH after checkpoints were written without them: the value those runs had.
ADDED_LATER = {"aggregation": "fedbpt", "prompt_placement": "auto"}


def fingerprint(cfg: RunConfig) -> dict:
    """The settings a checkpoint must share with the run that continues it."""
    return {k: getattr(cfg, k) for k in MUST_MATCH}


def check_compatible(ckpt, cfg: RunConfig, clients_per_round: int | None = None) -> None:
    """Refuse a checkpoint (checkpoint.Checkpoint) written by a run with other settings (d, task, seed, ...)."""
    saved = ckpt.header["config"]
    saved = {**ADDED_LATER, "dev_shot": saved.get("k_shot"), **saved}  # dev was k_shot per class before --dev_shot
    diffs = [
        f"{opt(k)} {saved.get(k)!r} there, {getattr(cfg, k)!r} here"
        for k in MUST_MATCH
        if k not in saved or json.dumps(saved[k]) != json.dumps(getattr(cfg, k))
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt.path} belongs to another run ({'; '.join(diffs)}): "
            f"resume with the settings it was written with, or start afresh without {opt('resume')}"
        )
    if clients_per_round is not None and clients_per_round != ckpt.header["clients_per_round"]:
        raise CheckpointError(
            f"checkpoint {ckpt.path} aggregates {ckpt.header['clients_per_round']} clients per round, this run "
            f"{clients_per_round}: resume with the same {opt('num_clients')}/{opt('frac')} and at least that many "
            "sites connected"
        )
    if ckpt.round >= cfg.num_rounds:
        raise CheckpointError(
            f"checkpoint {ckpt.path} already has {ckpt.round} rounds: pass {opt('num_rounds')} larger than {ckpt.round}"
        )


class Federation:
    def __init__(self, cfg: RunConfig, sites: list[str]) -> None:
        self.cfg = cfg
        self.sites = sorted(sites)
        self.k = min(cfg.clients_per_round, len(self.sites))
        self.server = make_server(
            cfg.aggregation, cfg.intrinsic_dim, cfg.sigma, self.k, self.sites, cfg.seed, cfg.bound, cfg.server_sigma
        )
        task = get_task(cfg.task_name)
        self.num_labels = task.num_classes
        self.summary = RunSummary(cfg, task.metric)
        self._rng = np.random.default_rng([cfg.seed, 7])  # client sampling, separate from every other stream
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
        evaluate = rnd % self.cfg.eval_every == 0
        return targets, {"state": encode_state(self._state, self.cfg.cov_mode), "evaluate": int(evaluate)}

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
                update = decode_update(site, payload, cfg.intrinsic_dim, cfg.local_iter, cfg.bound)
                evals[site] = decode_eval(payload, self.num_labels, cfg.loss_type)
            except PayloadError as exc:
                log.error("round %d: rejected the update of %s: %s", rnd, site, exc)
                continue
            updates.append(update)
        missing = sorted(set(targets) - {u.site for u in updates})
        if missing:
            log.warning("round %d: no usable update from %s", rnd, ", ".join(missing))
        if len(updates) < cfg.min_clients:
            reason = (
                f"round {rnd}: {len(updates)} usable updates, fewer than --min_clients {cfg.min_clients} "
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
        self._state = self.server.state(self.cfg.num_rounds)
        msg = {"state": encode_state(self._state, "none")}
        if self.cfg.test_eval == "end" and self.summary.best_z is not None:
            msg["best_mean"] = np.asarray(self.summary.best_z, dtype=np.float64)
        return msg

    def finish(self, results: dict) -> dict:
        """Record the final evaluation; a malformed report is dropped (there is no search state to protect)."""
        evals, counts = {}, []
        for site, payload in sorted(results.items()):
            try:
                evals[site] = decode_eval(payload, self.num_labels, self.cfg.loss_type)
                counts.append(decode_counts(payload))
            except PayloadError as exc:
                log.error("final evaluation: dropped the report of %s: %s", site, exc)
        row = self.summary.add_final(self.cfg.num_rounds, self._state.mean, evals)
        row.update(_summed_counts(counts))
        row["totals"] = _summed_counts(self.summary.rounds + [row])  # the run's cost, final evaluation included
        return row

    def state_dict(self, rounds_done: int) -> dict:
        """The run's state after ``rounds_done`` rounds, as a state dict (:mod:`fedbpt.core.state`): the server's and
        the record's, both random generators, and the settings and sites it was made with. Clients keep no state
        between rounds (their seeds derive from seed, site and round), so this is the whole state of a run."""
        import cma

        return {
            "round": int(rounds_done),
            "config": fingerprint(self.cfg),
            "clients_per_round": int(self.k),
            "told_per_round": int(self.server.k),
            "sites": list(self.sites),
            "cma_version": cma.__version__,
            **self.server.state_dict(),
            "sampler_rng": generator_state(self._rng),
            **global_state("np_global"),  # pycma's ask() draws from numpy's global generator
            **self.summary.state_dict(),
        }

    @staticmethod
    def check_state(state: dict) -> None:
        """Raise StateError for the first field of ``state`` a run could not continue from. The dimension, the
        points told a round and the server's kind are the state's own, so a saved state is checked before any
        Federation exists; settings that differ from a run's are :func:`check_compatible`'s."""
        _, d, told = _check_run_state(state)
        robust = state["config"].get("aggregation") == "fedbpt_robust"
        (RobustServerES if robust else ServerES).check_state(state, d, told)

    def load_state_dict(self, state: dict) -> int:
        """Continue from :meth:`state_dict`'s output; return the first round to run. Every field is checked, the
        server's against this run's server, before anything changes."""
        rounds_done, _, _ = _check_run_state(state)
        self.server.load_state_dict(state)  # checks its own fields first
        self.summary.load_state_dict(state)
        set_generator_state(self._rng, state["sampler_rng"])
        set_global_state(state, "np_global")
        return rounds_done


def _check_run_state(state: dict) -> tuple[int, int, int]:
    """Check every field but the server's; return (rounds done, dimension, points told a round)."""
    rounds_done = integer(member(state, "round"), "round", 0)
    config = mapping(member(state, "config"), "config")
    d = integer(member(config, "intrinsic_dim", "config.intrinsic_dim"), "config.intrinsic_dim", 1)
    sites = sequence(member(state, "sites"), "sites")
    if not sites or not all(isinstance(s, str) and s for s in sites) or len(set(sites)) != len(sites):
        raise StateError("sites", "is not a non-empty list of distinct site names")
    # not bounded by the sites: sites that fail setup leave the rotation and the server tells their points as absent
    k = integer(member(state, "clients_per_round"), "clients_per_round", 1)
    told = integer(state.get("told_per_round", k), "told_per_round", k, k + 1)  # robust: the K means and the mean
    version = member(state, "cma_version")
    if not isinstance(version, str) or not version:
        raise StateError("cma_version", f"is {version!r}, not a version string")
    check_generator_state(member(state, "sampler_rng"), "sampler_rng")
    check_global_state(state, "np_global")
    RunSummary.check_state(state, d)
    rows = len(state["summary"]["rounds"])
    if rounds_done != rows:
        raise StateError("round", f"is {rounds_done}, but summary.rounds records {rows} rounds done")
    return rounds_done, d, told


def _summed_counts(reports) -> dict:
    """queries, eval_queries and tokens summed over sites' reports (or rows); absent counts add nothing."""
    out = dict.fromkeys(COUNTS, 0)
    for report in reports:
        for key in COUNTS:
            out[key] += report.get(key, 0)
    return out


def _work_seconds(payload: dict) -> float:
    return float(payload.get("seconds_search", 0.0)) + float(payload.get("seconds_eval", 0.0))
