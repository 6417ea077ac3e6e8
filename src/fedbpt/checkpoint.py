"""Server checkpoints: global CMA-ES state, round, run record and RNG states, so a stopped run continues bit for bit.

A checkpoint is one ``.npz`` file (numpy's zip of ``.npy`` arrays, read with ``allow_pickle=False``): the arrays of
the server's CMA-ES and a JSON header with the numbers, the round, the run record and the random generator
states. Nothing is pickled, so loading a checkpoint cannot run code. It is written to a temporary file and renamed,
so a server killed mid-write leaves the previous checkpoint intact.

Clients keep no state between rounds (their seeds derive from seed, site and round), so the server's state is
the whole state of a run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile

import numpy as np

from fedbpt.summary import _json_default, atomic_write
from fedbpt.tasks import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "fedbpt_checkpoint.npz"
FORMAT = "fedbpt-checkpoint"
VERSION = 1

# Settings that fix the search space, the data, the clients' objective and the server's update: a checkpoint only
# continues a run that shares all of them. Rounds, evaluation cadence, timeouts, paths and devices may change.
MUST_MATCH = (
    "task_name",
    "intrinsic_dim",
    "seed",
    "model_name",
    "n_prompt_tokens",
    "cat_or_add",
    "label_encoding",
    "sigma",
    "bound",
    "num_clients",
    "frac",
    "server_sigma",
    "local_adaptation",
    "cov_mode",
    "k_shot",
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

# pycma state that its tell() reads or carries forward (cma 4.x). B, C and D live in the sampler ``sm``; the
# strategy holds aliases of them. Attributes missing or None at save time are restored as such.
_ES_ARRAYS = (
    "mean",
    "mean_after_tell",
    "mean_old",
    "mean_old_old",
    "pc",
    "pc2",
    "pc_neg",
    "dC",
    "_isotropic_mean_shift",
    "sm.C",
    "sm.B",
    "sm.D",
    "adapt_sigma.ps",
    "best.x",
    "fit.fit",
    "fit.idx",
)
_ES_SCALARS = (
    "sigma",
    "_sigma_old",
    "countiter",
    "countevals",
    "itereigenupdated",
    "count_eigen",
    "_isotropic_mean_shift_iteration",
    "_flgtelldone",
    "number_of_solutions_asked",
    "sm.count_eigen",
    "sm.count_tell",
    "sm.last_update",
    "adapt_sigma.delta",
    "adapt_sigma._last_multiplier",
    "adapt_sigma._ps_updated_iteration",
    "adapt_sigma.is_initialized",
    "fit.flatfit_iterations",
    "fit.median",
    "fit.median0",
    "fit.median_min",
    "fit.median_previous",
    "fit.median_got_worse",
    "best.f",
    "best.evals",
    "best.evalsall",
    "best.compared",
)
_ES_LISTS = ("fit.hist", "fit.histbest", "fit.histmedian")
_ES_ALIASES = ("B", "C", "D")  # es.X is es.sm.X


class CheckpointError(ConfigError):
    """A checkpoint that cannot continue this run; the message names the file and the fix."""


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set(obj, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return float(v)


def _es_state(es) -> tuple[dict, dict]:
    arrays, header = {}, {"scalars": {}, "lists": {}, "none": []}
    for path in _ES_ARRAYS:
        v = _get(es, path)
        if v is None:
            header["none"].append(path)
        else:
            arrays[f"es.{path}"] = np.array(v, copy=True)
    for path in _ES_SCALARS:
        v = _get(es, path)
        if v is None:
            header["none"].append(path)
        else:
            header["scalars"][path] = _scalar(v)
    for path in _ES_LISTS:
        v = _get(es, path)
        header["lists"][path] = [] if v is None else [_scalar(x) for x in v]
    return arrays, header


def _set_es_state(es, arrays: dict, header: dict) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es.ask()  # builds what pycma creates lazily at its first ask (timer, counters); the samples are unused
    for path in _ES_ARRAYS:
        if path in header["none"]:
            if _get(es, path) is not None:
                _set(es, path, None)
        else:
            _set(es, path, np.array(arrays[f"es.{path}"], copy=True))
    for path in _ES_SCALARS:
        _set(es, path, None if path in header["none"] else header["scalars"][path])
    es.sigma = np.float64(es.sigma)  # pycma keeps sigma as a numpy scalar
    for path in _ES_LISTS:
        _set(es, path, list(header["lists"][path]))
    for name in _ES_ALIASES:
        setattr(es, name, getattr(es.sm, name))


def _generator_state(rng: np.random.Generator) -> dict:
    s = rng.bit_generator.state
    if s["bit_generator"] != "PCG64":
        raise TypeError(f"cannot checkpoint a {s['bit_generator']} generator")
    # 128-bit integers do not survive JSON as numbers
    return {
        "bit_generator": "PCG64",
        "state": str(s["state"]["state"]),
        "inc": str(s["state"]["inc"]),
        "has_uint32": int(s["has_uint32"]),
        "uinteger": int(s["uinteger"]),
    }


def _set_generator_state(rng: np.random.Generator, s: dict) -> None:
    rng.bit_generator.state = {
        "bit_generator": s["bit_generator"],
        "state": {"state": int(s["state"]), "inc": int(s["inc"])},
        "has_uint32": int(s["has_uint32"]),
        "uinteger": int(s["uinteger"]),
    }


def fingerprint(cfg: dict) -> dict:
    return {k: cfg[k] for k in MUST_MATCH}


def to_bytes(fed, rounds_done: int) -> bytes:
    """The checkpoint of ``fed`` after ``rounds_done`` rounds, as the bytes of an .npz file."""
    import cma

    arrays, es_header = _es_state(fed.server.es)
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # pycma's ask() draws from numpy's global generator
    arrays["np_global_keys"] = np.asarray(keys, dtype=np.uint32)
    if fed.summary.best_z is not None:
        arrays["best_z"] = np.asarray(fed.summary.best_z, dtype=np.float64)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "round": int(rounds_done),
        "config": fingerprint(fed.cfg),
        "clients_per_round": int(fed.k),
        "sites": list(fed.sites),
        "cma_version": cma.__version__,
        "es": es_header,
        "sent_sigma": float(fed.server.sent_sigma),
        "sampler_rng": _generator_state(fed._rng),
        "np_global": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "summary": {"rounds": fed.summary.rounds, "best": fed.summary.best},
    }
    text = json.dumps(header, default=_json_default, allow_nan=True)
    arrays["header"] = np.frombuffer(text.encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save(fed, rounds_done: int, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CHECKPOINT_FILE)
    atomic_write(path, to_bytes(fed, rounds_done))
    return path


def is_due(rnd: int, cfg: dict) -> bool:
    """After round ``rnd`` (0-based): every --checkpoint_every rounds, and after the last round.

    Only FedBPT's server CMA-ES is checkpointed; the baseline aggregations (bench tools) are not.
    """
    if cfg.get("aggregation", "fedbpt") != "fedbpt":
        return False
    every = int(cfg.get("checkpoint_every", 1))
    return every > 0 and ((rnd + 1) % every == 0 or rnd + 1 == cfg["num_rounds"])


def after_round(fed, rnd: int, out_dir: str | None) -> str | None:
    if out_dir is None or not is_due(rnd, fed.cfg):
        return None
    path = save(fed, rnd + 1, out_dir)
    log.info("round %d: checkpoint written to %s", rnd, path)
    return path


class Checkpoint:
    def __init__(self, path: str, header: dict, arrays: dict) -> None:
        self.path, self.header, self.arrays = path, header, arrays

    @property
    def round(self) -> int:
        return int(self.header["round"])


def load(path: str) -> Checkpoint:
    """Read and sanity-check a checkpoint file; raise CheckpointError (one line) if it is not a usable one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found: pass --resume with the {CHECKPOINT_FILE} of a run")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(bytes(arrays.pop("header")).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a FedBPT checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:100] if str(exc) else ''}): resume from an intact checkpoint or start afresh"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a FedBPT checkpoint: pass --resume with a {CHECKPOINT_FILE}")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {header.get('version')}, this code reads {VERSION}: "
            f"resume with the code version that wrote it"
        )
    try:
        problems = _problems(header, arrays)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problems = [f"incomplete header ({type(exc).__name__}: {exc})"]
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupted ({'; '.join(problems[:3])}): resume from another one")
    return Checkpoint(path, header, arrays)


_HEADER_KEYS = ("round", "config", "clients_per_round", "sites", "cma_version", "es", "sent_sigma", "sampler_rng")


def _problems(header: dict, arrays: dict) -> list[str]:
    missing = [k for k in _HEADER_KEYS + ("np_global", "summary") if k not in header]
    if missing:
        return [f"header lacks {', '.join(missing)}"]
    d = int(header["config"]["intrinsic_dim"])
    problems = []
    for key in ("es.mean", "es.pc", "es.adapt_sigma.ps", "es.sm.D"):
        if key not in arrays or arrays[key].shape != (d,):
            problems.append(f"{key} is not a vector of length {d}")
    for key in ("es.sm.C", "es.sm.B"):
        if key not in arrays or arrays[key].shape != (d, d):
            problems.append(f"{key} is not a {d}x{d} matrix")
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            problems.append(f"{key} has NaN or inf")
    sigma = header["es"]["scalars"].get("sigma")
    if not isinstance(sigma, float) or not np.isfinite(sigma) or sigma <= 0:
        problems.append(f"sigma {sigma!r} is not a positive number")
    return problems


def check_compatible(ckpt: Checkpoint, cfg: dict, clients_per_round: int | None = None) -> None:
    """Refuse a checkpoint written by a run with other settings (d, task, seed, ...)."""
    saved = ckpt.header["config"]
    diffs = [
        f"--{k} {saved.get(k)!r} there, {cfg[k]!r} here"
        for k in MUST_MATCH
        if k not in saved or json.dumps(saved[k]) != json.dumps(cfg[k])
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt.path} belongs to another run ({'; '.join(diffs)}): "
            f"resume with the settings it was written with, or start afresh without --resume"
        )
    if clients_per_round is not None and clients_per_round != ckpt.header["clients_per_round"]:
        raise CheckpointError(
            f"checkpoint {ckpt.path} aggregates {ckpt.header['clients_per_round']} clients per round, this run "
            f"{clients_per_round}: resume with the same --num_clients/--frac and at least that many sites connected"
        )
    if ckpt.round >= cfg["num_rounds"]:
        raise CheckpointError(
            f"checkpoint {ckpt.path} already has {ckpt.round} rounds: pass --num_rounds larger than {ckpt.round}"
        )


def restore(fed, ckpt: Checkpoint) -> int:
    """Put the checkpoint's state into a freshly built Federation; return the first round to run."""
    check_compatible(ckpt, fed.cfg, fed.k)
    import cma

    h, a = ckpt.header, ckpt.arrays
    if sorted(h["sites"]) != list(fed.sites):
        log.warning("resuming with sites %s; the checkpoint had %s", fed.sites, h["sites"])
    if h["cma_version"] != cma.__version__:
        log.warning(
            "checkpoint written with cma %s, running cma %s: continuation may differ", h["cma_version"], cma.__version__
        )
    try:
        _set_es_state(fed.server.es, a, h["es"])
    except (AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this pycma (written with cma {h['cma_version']}, running "
            f"{cma.__version__}: {exc}): resume with the cma version that wrote it"
        ) from None
    fed.server.sent_sigma = float(h["sent_sigma"])
    _set_generator_state(fed._rng, h["sampler_rng"])
    g = h["np_global"]
    np.random.set_state((g["kind"], a["np_global_keys"], g["pos"], g["has_gauss"], g["cached_gaussian"]))
    fed.summary.rounds = list(h["summary"]["rounds"])
    fed.summary.best = dict(h["summary"]["best"])
    fed.summary.best_z = np.array(a["best_z"]) if "best_z" in a else None
    log.info("resumed from %s after round %d", ckpt.path, ckpt.round - 1)
    return ckpt.round


def resolve_path(path: str, base_dir: str) -> str:
    """A relative --resume (as in an exported job, where the checkpoint travels in the app's config folder)."""
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def open_run(fed, cfg: dict, base_dir: str = "") -> int:
    """Resume ``fed`` if the config asks for it; return the first round to run (0 for a fresh run)."""
    if not cfg.get("resume"):
        return 0
    return restore(fed, load(resolve_path(cfg["resume"], base_dir)))


def attach_to_job(job, cfg: dict, run_cfg: dict) -> None:
    """Ship the --resume checkpoint inside the job (server app config folder) and point the controller at it.

    A real deployment's server cannot read the submitting machine's files; the job folder is what travels.
    """
    if not cfg.get("resume"):
        return
    job.add_file_to_server(cfg["resume"], app_folder_type="config")
    run_cfg["resume"] = os.path.basename(cfg["resume"])


def resume_hint(cfg: dict) -> str:
    """How to continue a stopped simulator run, for its error message."""
    path = os.path.join(cfg["workspace"], CHECKPOINT_FILE)
    if not os.path.isfile(path):
        return " (no checkpoint was written)"
    try:
        rounds = load(path).round
    except CheckpointError:
        return f" (the checkpoint {path} is unreadable)"
    return f"; continue from its checkpoint after {rounds} rounds with --resume {path}"
