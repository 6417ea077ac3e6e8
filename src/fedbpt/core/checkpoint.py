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

from fedbpt.core.aggregation import parse_incumbent_state
from fedbpt.core.config import SERVER_ES
from fedbpt.core.summary import _json_default, atomic_write
from fedbpt.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "fedbpt_checkpoint.npz"
FORMAT = "fedbpt-checkpoint"
VERSION = 1

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


def _incumbent_arrays(arrays: dict) -> dict:
    return {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("incumbent.")}


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
    incumbent = fed.server.incumbent_state() if hasattr(fed.server, "incumbent_state") else None
    if incumbent is not None:  # robust FedBPT's best mean so far
        arrays.update({f"incumbent.{k}": v for k, v in incumbent[1].items()})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "round": int(rounds_done),
        "config": fingerprint(fed.cfg),
        "clients_per_round": int(fed.k),
        "told_per_round": int(fed.server.k),
        "sites": list(fed.sites),
        "cma_version": cma.__version__,
        "es": es_header,
        "sent_sigma": float(fed.server.sent_sigma),
        "sampler_rng": _generator_state(fed._rng),
        "np_global": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "summary": {"rounds": fed.summary.rounds, "best": fed.summary.best},
    }
    if incumbent is not None:
        header["incumbent"] = incumbent[0]
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

    Only FedBPT's server CMA-ES (faithful or robust) is checkpointed; the baseline aggregations (bench tools) are not.
    """
    if cfg.get("aggregation", "fedbpt") not in SERVER_ES:
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


_FIX = "resume from an intact checkpoint or start a new run without --resume"


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:100] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def load(path: str) -> Checkpoint:
    """Read and check a checkpoint file; raise CheckpointError (one line) if it is not a usable one.

    Every field that :func:`restore` puts into the run is checked for its type, shape, range and finiteness, so
    a damaged or crafted file is refused here, naming the field, and never half-restored.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found: pass --resume with the {CHECKPOINT_FILE} of a run")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(bytes(arrays.pop("header")).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a FedBPT checkpoint ({_one_line(exc)}): "
            f"resume from an intact checkpoint or start afresh"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a FedBPT checkpoint: pass --resume with a {CHECKPOINT_FILE}")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {header.get('version')!r}, this code reads {VERSION}: "
            f"resume with the code version that wrote it"
        )
    try:
        _validate(header, arrays)
    except _Missing as exc:
        raise CheckpointError(
            f"checkpoint {path} lacks field {exc.field}: it is damaged or not written by this tool; {_FIX}"
        ) from None
    except _Invalid as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: {exc.field} {exc.problem}; {_FIX}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, np.linalg.LinAlgError) as exc:
        # a shape of damage the checks above did not foresee: still one line, never a traceback
        raise CheckpointError(f"checkpoint {path} is corrupted ({_one_line(exc)}); {_FIX}") from None
    return Checkpoint(path, header, arrays)


# The largest step size a checkpoint may carry. Far above any step a run reaches (the eq6_sent ablation, whose
# step grows about 1.7x a round, is near 1e7 after 30 rounds and 1e23 after 100), far below where pycma's squared
# steps overflow float64 (about 1e154).
SIGMA_MAX = 1e30

_HEADER_KEYS = (
    "round",
    "config",
    "clients_per_round",
    "sites",
    "cma_version",
    "es",
    "sent_sigma",
    "sampler_rng",
    "np_global",
    "summary",
)
# pycma state without which the strategy cannot continue: never recorded as None by a genuine checkpoint
_ES_REQUIRED = ("mean", "pc", "adapt_sigma.ps", "sm.C", "sm.B", "sm.D", "sigma", "countiter")
_ES_BOOLS = ("_flgtelldone", "adapt_sigma.is_initialized")
_ES_MARKS = ("_isotropic_mean_shift_iteration", "adapt_sigma._ps_updated_iteration")  # iteration numbers, -1: never
_ES_STEPS = ("sigma", "_sigma_old")
_ES_POSITIVE = ("adapt_sigma.delta", "adapt_sigma._last_multiplier")
_ES_FITNESS = ("fit.median", "fit.median0", "fit.median_min", "fit.median_previous", "best.f")  # inf before any tell
_ES_COUNTS = tuple(
    p for p in _ES_SCALARS if p not in _ES_BOOLS + _ES_MARKS + _ES_STEPS + _ES_POSITIVE + _ES_FITNESS
)  # counters, >= 0
_ES_PER_CLIENT = ("fit.fit", "fit.idx")  # one entry per told point: clients_per_round
_ES_MATRICES = ("sm.C", "sm.B")
_MT_KEYS = 624  # MT19937's state words
_PCG_DIGITS = 39  # 2**128 - 1 in decimal


class _Missing(Exception):
    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class _Invalid(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _member(obj: dict, key: str, field: str):
    if key not in obj:
        raise _Missing(field)
    return obj[key]


def _dict(v, field: str) -> dict:
    if not isinstance(v, dict):
        raise _Invalid(field, f"is a {type(v).__name__}, not a JSON object")
    return v


def _list(v, field: str) -> list:
    if not isinstance(v, list):
        raise _Invalid(field, f"is a {type(v).__name__}, not a list")
    return v


def _int(v, field: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Invalid(field, f"is {v!r}, not an integer")
    if v < lo or (hi is not None and v > hi):
        raise _Invalid(field, f"is {v}, outside [{lo}, {'inf' if hi is None else hi}]")
    return v


def _number(
    v, field: str, finite: bool = True, positive: bool = False, hi: float | None = None, nan: bool = False
) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Invalid(field, f"is {v!r}, not a number")
    try:
        v = float(v)
    except OverflowError:
        raise _Invalid(field, "is an integer too large for a float") from None
    if (np.isnan(v) and not nan) or (finite and not np.isfinite(v)):
        raise _Invalid(field, f"is {v!r}, not a finite number")
    if positive and v <= 0:
        raise _Invalid(field, f"is {v!r}, not a positive number")
    if hi is not None and v > hi:
        raise _Invalid(field, f"is {v!r}, larger than {hi:g}")
    return v


def _optional_metric(v, field: str):
    """A recorded metric: null, or a number, NaN included (a split whose every example was dropped scores NaN)."""
    return None if v is None else _number(v, field, finite=False, nan=True)


def _array(arrays: dict, name: str, shape: tuple, dtype=np.float64) -> np.ndarray:
    if name not in arrays:
        raise _Missing(name)
    a = arrays[name]
    if dtype is int:
        if a.dtype.kind not in "iu":
            raise _Invalid(name, f"has dtype {a.dtype}, not an integer type")
    elif a.dtype != dtype:
        raise _Invalid(name, f"has dtype {a.dtype}, not {np.dtype(dtype)}")
    if a.shape != shape:
        raise _Invalid(name, f"has shape {a.shape}, not {shape}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise _Invalid(name, "has NaN or inf")
    return a


def _validate(header: dict, arrays: dict) -> None:
    """Raise _Missing or _Invalid for the first field :func:`restore` could not use as it stands."""
    for key in _HEADER_KEYS:
        _member(header, key, key)
    config = _dict(header["config"], "config")
    d = _int(_member(config, "intrinsic_dim", "config.intrinsic_dim"), "config.intrinsic_dim", 1)
    rounds_done = _int(header["round"], "round", 0)
    sites = _list(header["sites"], "sites")
    if not sites or not all(isinstance(s, str) and s for s in sites) or len(set(sites)) != len(sites):
        raise _Invalid("sites", "is not a non-empty list of distinct site names")
    # not bounded by the sites: sites that fail setup leave the rotation and the server tells their points as absent
    k = _int(header["clients_per_round"], "clients_per_round", 1)
    k = _int(header.get("told_per_round", k), "told_per_round", k, k + 1)  # robust: the K means and the mean
    if not isinstance(header["cma_version"], str) or not header["cma_version"]:
        raise _Invalid("cma_version", f"is {header['cma_version']!r}, not a version string")
    _validate_es(header["es"], arrays, d, k)
    _number(header["sent_sigma"], "sent_sigma", positive=True, hi=SIGMA_MAX)
    _validate_pcg64(header["sampler_rng"], "sampler_rng")
    _validate_mt19937(header["np_global"], arrays)
    _validate_summary(header["summary"], arrays, rounds_done, d)
    if "incumbent" in header:
        try:
            parse_incumbent_state(header["incumbent"], _incumbent_arrays(arrays), d)
        except ValueError as exc:
            raise _Invalid("incumbent", f"does not fit: {exc}") from None
    for name, a in arrays.items():  # any other float array the file carries
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise _Invalid(name, "has NaN or inf")


def _validate_es(es, arrays: dict, d: int, k: int) -> None:
    es = _dict(es, "es")
    scalars = _dict(_member(es, "scalars", "es.scalars"), "es.scalars")
    lists = _dict(_member(es, "lists", "es.lists"), "es.lists")
    none = _list(_member(es, "none", "es.none"), "es.none")
    for path in none:
        if path not in _ES_ARRAYS + _ES_SCALARS:
            raise _Invalid("es.none", f"names {path!r}, not a CMA-ES field this tool records")
        if path in _ES_REQUIRED:
            raise _Invalid(f"es.{path}", "is recorded as None, which no running CMA-ES has")
    for path in _ES_ARRAYS:
        if path in none:
            continue
        name = f"es.{path}"
        if path in _ES_MATRICES:
            _array(arrays, name, (d, d))
        elif path == "fit.idx":
            idx = _array(arrays, name, (k,), int)
            if sorted(idx.tolist()) != list(range(k)):
                raise _Invalid(name, f"is not a permutation of 0..{k - 1}")
        elif path in _ES_PER_CLIENT:
            _array(arrays, name, (k,))
        else:
            _array(arrays, name, (d,))
    _validate_covariance(arrays, none, d)
    for path in _ES_SCALARS:
        if path in none:
            continue
        field = f"es.scalars.{path}"
        v = _member(scalars, path, field)
        if path in _ES_BOOLS:
            if not isinstance(v, bool):
                raise _Invalid(field, f"is {v!r}, not true or false")
        elif path in _ES_MARKS:
            _int(v, field, -1)
        elif path in _ES_COUNTS:
            _int(v, field, 0)
        elif path in _ES_STEPS:
            _number(v, field, positive=True, hi=SIGMA_MAX)
        elif path in _ES_POSITIVE:
            _number(v, field, positive=True)
        else:  # _ES_FITNESS
            _number(v, field, finite=False)
    for path in _ES_LISTS:
        field = f"es.lists.{path}"
        for v in _list(_member(lists, path, field), field):
            _number(v, field, finite=False)


def _validate_covariance(arrays: dict, none: list, d: int) -> None:
    """C symmetric positive definite with a positive diagonal, D positive, B orthonormal: what sampling needs."""
    c = arrays["es.sm.C"]
    scale = float(np.max(np.abs(c)))
    if not np.all(np.diag(c) > 0):
        raise _Invalid("es.sm.C", "has a zero or negative diagonal entry: not a covariance matrix")
    if np.max(np.abs(c - c.T)) > 1e-10 * scale:
        raise _Invalid("es.sm.C", "is not symmetric: not a covariance matrix")
    if np.linalg.eigvalsh(c).min() <= 0:  # pycma's own test when it eigen-decomposes C
        raise _Invalid("es.sm.C", "is not positive definite: not a covariance matrix")
    if not np.all(arrays["es.sm.D"] > 0):
        raise _Invalid("es.sm.D", "has a zero or negative entry: not the square roots of C's eigenvalues")
    if "dC" not in none and not np.all(arrays["es.dC"] > 0):
        raise _Invalid("es.dC", "has a zero or negative entry: not the diagonal of a covariance matrix")
    b = arrays["es.sm.B"]
    if np.max(np.abs(b.T @ b - np.eye(d))) > 1e-6:
        raise _Invalid("es.sm.B", "is not orthonormal: not the eigenvectors of C")


def _validate_pcg64(s, field: str) -> None:
    s = _dict(s, field)
    if _member(s, "bit_generator", f"{field}.bit_generator") != "PCG64":
        raise _Invalid(f"{field}.bit_generator", f"is {s['bit_generator']!r}, not 'PCG64'")
    for key in ("state", "inc"):
        v = _member(s, key, f"{field}.{key}")
        if not isinstance(v, str) or not (0 < len(v) <= _PCG_DIGITS) or not all("0" <= c <= "9" for c in v):
            raise _Invalid(f"{field}.{key}", f"is {v!r}, not a decimal 128-bit integer")
        if int(v) >= 2**128:
            raise _Invalid(f"{field}.{key}", "does not fit in 128 bits")
    if int(s["inc"]) % 2 == 0:
        raise _Invalid(f"{field}.inc", "is even: a PCG64 increment is always odd")
    _int(_member(s, "has_uint32", f"{field}.has_uint32"), f"{field}.has_uint32", 0, 1)
    _int(_member(s, "uinteger", f"{field}.uinteger"), f"{field}.uinteger", 0, 2**32 - 1)


def _validate_mt19937(g, arrays: dict) -> None:
    g = _dict(g, "np_global")
    if _member(g, "kind", "np_global.kind") != "MT19937":
        raise _Invalid("np_global.kind", f"is {g['kind']!r}, not 'MT19937'")
    _int(_member(g, "pos", "np_global.pos"), "np_global.pos", 0, _MT_KEYS)
    _int(_member(g, "has_gauss", "np_global.has_gauss"), "np_global.has_gauss", 0, 1)
    _number(_member(g, "cached_gaussian", "np_global.cached_gaussian"), "np_global.cached_gaussian")
    keys = _array(arrays, "np_global_keys", (_MT_KEYS,), np.uint32)
    if not keys.any():
        raise _Invalid("np_global_keys", "is all zeros: not a Mersenne Twister state")


def _validate_summary(summary, arrays: dict, rounds_done: int, d: int) -> None:
    summary = _dict(summary, "summary")
    rows = _list(_member(summary, "rounds", "summary.rounds"), "summary.rounds")
    for i, row in enumerate(rows):
        field = f"summary.rounds[{i}]"
        v = _member(_dict(row, field), "round", f"{field}.round")
        if isinstance(v, bool) or not isinstance(v, int) or v != i:
            raise _Invalid(f"{field}.round", f"is {v!r}, not {i}: the rows are rounds 0, 1, ... in order")
    if rounds_done != len(rows):
        raise _Invalid("round", f"is {rounds_done}, but summary.rounds records {len(rows)} rounds done")
    best = _dict(_member(summary, "best", "summary.best"), "summary.best")
    best_round = _member(best, "round", "summary.best.round")
    dev = _optional_metric(_member(best, "dev_acc", "summary.best.dev_acc"), "summary.best.dev_acc")
    for key in ("dev_loss", "test_acc"):  # dev_loss: absent in checkpoints written before it was recorded
        _optional_metric(best.get(key), f"summary.best.{key}")
    if best_round is None:
        if dev is not None:
            raise _Invalid("summary.best.round", "is null, yet summary.best.dev_acc is set")
        if "best_z" in arrays:
            raise _Invalid("best_z", "is present, yet summary.best.round is null")
    else:
        if rounds_done == 0:
            raise _Invalid("summary.best.round", f"is {best_round!r}, but no round is done")
        _int(best_round, "summary.best.round", 0, rounds_done - 1)
        _array(arrays, "best_z", (d,))


def check_compatible(ckpt: Checkpoint, cfg: dict, clients_per_round: int | None = None) -> None:
    """Refuse a checkpoint written by a run with other settings (d, task, seed, ...)."""
    saved = ckpt.header["config"]
    saved = {**ADDED_LATER, "dev_shot": saved.get("k_shot"), **saved}  # dev was k_shot per class before --dev_shot
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
    other_cma = h["cma_version"] != cma.__version__
    if other_cma:
        log.warning(
            "checkpoint written with cma %s, running cma %s: continuation may differ", h["cma_version"], cma.__version__
        )
    try:
        _set_es_state(fed.server.es, a, h["es"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # load() checked every field, so only another pycma's layout can get here, or a bug
        if other_cma:
            raise CheckpointError(
                f"checkpoint {ckpt.path} does not fit this pycma (written with cma {h['cma_version']}, running "
                f"{cma.__version__}: {_one_line(exc)}): resume with the cma version that wrote it"
            ) from None
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this pycma {cma.__version__}, the version that wrote it "
            f"({_one_line(exc)}): it is damaged or not written by this tool; {_FIX}"
        ) from None
    fed.server.sent_sigma = float(h["sent_sigma"])
    _set_generator_state(fed._rng, h["sampler_rng"])
    g = h["np_global"]
    np.random.set_state((g["kind"], a["np_global_keys"], g["pos"], g["has_gauss"], g["cached_gaussian"]))
    fed.summary.rounds = list(h["summary"]["rounds"])
    fed.summary.best = dict(h["summary"]["best"])
    fed.summary.best_z = np.array(a["best_z"]) if "best_z" in a else None
    if hasattr(fed.server, "load_incumbent_state"):
        # a robust run's checkpoint written without its incumbent: the server starts keeping one from here
        numbers = h.get("incumbent", {"rounds_done": ckpt.round, "round": None, "losses": {}})
        fed.server.load_incumbent_state(numbers, _incumbent_arrays(a))
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
