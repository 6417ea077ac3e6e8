"""What crosses the network: plain dicts of numpy arrays and numbers, validated on receipt.

NVFlare 2.9's FOBS refuses unregistered classes on the receiving side, and a pickled CMA-ES object (what the
reference example sends, 4,052,509 bytes at d=500) is neither small nor safe to unpickle. So the server sends
mean, sigma and the covariance in a compact encoding, and the client sends back its local result.

Covariance modes: ``full`` (float32 upper triangle, d(d+1)/2 values), ``diag`` (d values), ``none`` (mean and
sigma only; the client starts from the identity).
"""

from __future__ import annotations

import numpy as np

from fedbpt.core.algorithm.aggregation import ClientUpdate
from fedbpt.core.algorithm.search import GlobalState
from fedbpt.errors import PayloadError

COV_MODES = ("none", "diag", "full")  # --cov_mode: what encode_state sends of the covariance
TEST_EVALS = ("rounds", "end")  # --test_eval: test scored with dev every eval round, or only in the final evaluation
SITE_METRICS = ("pooled", "full")  # --site_metrics: what decode_eval accepts of a site's own train/dev data

# The tasks the server sends, in order: setup once (sites load data and model before --round_timeout starts
# counting), a round per federated round, eval once at the end.
TASK_SETUP = "fedbpt_setup"
TASK_ROUND = "fedbpt_round"
TASK_EVAL = "fedbpt_eval"
TASKS = (TASK_SETUP, TASK_ROUND, TASK_EVAL)
ERROR_HEADER = "fedbpt_error"  # a failed task's one-line reason, in the reply's headers


def encode_state(state: GlobalState, cov_mode: str = "full") -> dict:
    msg = {"round": int(state.round), "mean": np.asarray(state.mean, dtype=np.float64), "sigma": float(state.sigma)}
    if cov_mode == "full" and state.cov is not None:
        msg["cov_tri"] = state.cov[np.triu_indices(len(state.mean))].astype(np.float32)
    elif cov_mode == "diag" and state.cov is not None:
        msg["cov_diag"] = np.diag(state.cov).astype(np.float32)
    if getattr(state, "sites", None):  # per-site states: one row of ``mean`` per site (see state_for_site)
        msg["sites"] = ",".join(state.sites)
        msg["sigmas"] = np.asarray(state.sigmas, dtype=np.float64)
    return msg


def decode_state(msg: dict) -> GlobalState:
    mean = np.asarray(msg["mean"], dtype=np.float64)
    d = len(mean)
    cov = None
    if "cov_tri" in msg:
        cov = np.zeros((d, d), dtype=np.float64)
        cov[np.triu_indices(d)] = msg["cov_tri"]
        cov = cov + np.triu(cov, 1).T
    elif "cov_diag" in msg:
        cov = np.asarray(msg["cov_diag"], dtype=np.float64)
    return GlobalState(int(msg["round"]), mean, float(msg["sigma"]), cov)


def state_for_site(msg: dict, site: str) -> tuple[np.ndarray, GlobalState]:
    """(what ``site`` evaluates, the state its local search starts from).

    A shared state: the global mean, twice. Per-site states (``sites`` and ``sigmas`` present; the local-only
    baseline): every site's row is evaluated, so the server can pool each prompt over all sites' data, and the
    search starts from this site's own row and step size.
    """
    state = decode_state(msg)
    if "sites" not in msg:
        return state.mean, state
    sites = str(msg["sites"]).split(",")
    if site not in sites or state.mean.ndim != 2 or len(sites) != len(state.mean):
        raise PayloadError(f"per-site state without a row for {site}")
    own = sites.index(site)
    return state.mean, GlobalState(state.round, state.mean[own], float(msg["sigmas"][own]), None)


def encode_update(
    mean: np.ndarray, fitness: float, sigmas: np.ndarray, popsize: int, n_train: int, sigma_final: float, **extra
) -> dict:
    """A client's upload. ``sigmas``: the I steps the local iterations sampled with (Eq. 6 and the reference rule
    read them); ``sigma_final``: the step after the last tell (FedAvg-BBT and local-only continue from it)."""
    msg = {
        "mean": np.asarray(mean, dtype=np.float64),
        "fitness": float(fitness),
        "sigmas": np.asarray(sigmas, dtype=np.float64),
        "sigma_final": float(sigma_final),
        "popsize": int(popsize),
        "n_train": int(n_train),
    }
    msg.update(extra)
    return msg


def _finite_number(msg: dict, key: str) -> float:
    v = msg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        raise PayloadError(f"'{key}' is not a finite number: {v!r}"[:200])
    return float(v)


# What a site's task took, in seconds: its local search and evaluation (client_seconds in the run record), building its
# runtime (setup_seconds; 0 when the process already had it) and the library imports a fresh process needed.
TIMINGS = ("seconds_search", "seconds_eval", "setup_seconds", "import_seconds")
COUNTS = ("queries", "eval_queries", "tokens")  # what a site's work cost in model queries and computed tokens


def decode_counts(msg: dict) -> dict:
    """The cost counts a site's upload carries (any of COUNTS; an older client sends none), checked: each a finite,
    non-negative number. ``queries``: examples x candidates its search scored (clean and perturbed copies);
    ``eval_queries``: examples x prompts it evaluated; ``tokens``: positions its model computed."""
    out = {}
    for key in COUNTS:
        if key in msg:
            value = _finite_number(msg, key)
            if value < 0:
                raise PayloadError(f"'{key}' is negative: {value!r}")
            out[key] = int(value) if float(value).is_integer() else value
    return out


def decode_update(site: str, msg: dict, d: int, local_iter: int, bound: float = 0.0) -> ClientUpdate:
    """Validate a client's upload; raise PayloadError naming what is wrong.

    With a box bound, a mean outside it is rejected too: pycma's tell() would raise on it and stop the server.
    """
    if not isinstance(msg, dict):
        raise PayloadError(f"payload is {type(msg).__name__}, not a dict")
    for key in ("mean", "fitness", "sigmas", "sigma_final", "popsize"):
        if key not in msg:
            raise PayloadError(f"missing key '{key}'")
    mean = msg["mean"]
    if not isinstance(mean, np.ndarray) or mean.shape != (d,) or not np.issubdtype(mean.dtype, np.floating):
        raise PayloadError(f"'mean' must be a float array of shape ({d},), got {getattr(mean, 'shape', type(mean))}")
    if not np.all(np.isfinite(mean)):
        raise PayloadError("'mean' has NaN or inf")
    if bound > 0 and np.max(np.abs(mean)) > bound:
        raise PayloadError(f"'mean' leaves the box [-{bound}, {bound}] (max |z_i| {np.max(np.abs(mean)):.4g})")
    sigmas = msg["sigmas"]
    if not isinstance(sigmas, np.ndarray) or sigmas.shape != (local_iter,):
        raise PayloadError(f"'sigmas' must be an array of shape ({local_iter},)")
    if not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        raise PayloadError("'sigmas' must be finite and positive")
    fitness = _finite_number(msg, "fitness")
    sigma_final = _finite_number(msg, "sigma_final")
    if sigma_final <= 0:
        raise PayloadError("'sigma_final' must be positive")
    popsize = int(_finite_number(msg, "popsize"))
    if popsize < 2:
        raise PayloadError(f"'popsize' must be at least 2, got {popsize}")
    n_train = int(_finite_number(msg, "n_train")) if "n_train" in msg else 1
    for key in TIMINGS:  # timings go into the run record
        if key in msg and _finite_number(msg, key) < 0:
            raise PayloadError(f"'{key}' is negative")
    decode_counts(msg)
    # the training loss at the received mean, which every round's upload reports (robust FedBPT's incumbent reads it)
    start_loss = _finite_number(msg, "train_loss") if "train_loss" in msg else None
    return ClientUpdate(
        site,
        mean.astype(np.float64),
        fitness,
        sigmas.astype(np.float64),
        popsize,
        max(1, n_train),
        sigma_final,
        start_loss,
    )


# final evaluation only: best_test (the best-dev prompt), no_prompt_test (the template alone, no prompt rows)
EVAL_SPLITS = ("train", "dev", "test", "best_test", "no_prompt_test")
# A site's own examples: by default (--site_metrics pooled) their reports carry how many were scored and how many
# right, not a confusion matrix, whose rows are the site's label histogram. The test splits are the eval sites'
# public test set: a confusion matrix there reveals nothing of a site and gives F1.
PRIVATE_SPLITS = ("train", "dev")
MAX_COUNT = 2**53  # summed over sites in int64 and divided in float64: counts stay exact far below overflow


def _count(msg: dict, key: str, high: int) -> int:
    v = msg[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= high:
        raise PayloadError(f"'{key}' must be an integer in [0, {high}], got {v!r}"[:200])
    return int(v)


def decode_eval(msg: dict, num_labels: int, loss_type: str = "ce") -> dict:
    """The evaluation reports in a site's upload, checked; raise PayloadError naming the field.

    Each reported split is a loss, a count ``n`` and either a confusion matrix or the number ``correct``.
    summary.pooled sums these over sites: a wrong-shaped confusion matrix would stop the server, and NaN,
    negative or inconsistent counts would skew the logged global metrics. Only the keys of each reported split
    come back. Well-formed but false numbers cannot be detected here. ``perf`` loss is minus the accuracy, so it
    lies in [-1, 0]; ``ce`` and ``hinge`` are non-negative.
    """
    if not isinstance(msg, dict):
        raise PayloadError(f"payload is {type(msg).__name__}, not a dict")
    out: dict = {}
    for split in EVAL_SPLITS:
        loss_key, n_key, conf_key, correct_key = (f"{split}_{k}" for k in ("loss", "n", "confusion", "correct"))
        present = [k for k in (loss_key, n_key, conf_key, correct_key) if k in msg]
        if not present:
            continue
        if conf_key in msg and correct_key in msg:
            raise PayloadError(f"'{conf_key}' and '{correct_key}' both came: send one")
        required = [loss_key, n_key, correct_key if correct_key in msg else conf_key]
        missing = [k for k in required if k not in msg]
        if missing:
            raise PayloadError(f"'{present[0]}' came without {', '.join(repr(k) for k in missing)}")
        n = _count(msg, n_key, MAX_COUNT - 1)
        if correct_key in msg:
            out[correct_key] = _count(msg, correct_key, n)
        else:
            conf = msg[conf_key]
            if not isinstance(conf, np.ndarray) or not np.issubdtype(conf.dtype, np.integer):
                raise PayloadError(f"'{conf_key}' must be an integer array, got {getattr(conf, 'dtype', type(conf))}")
            if conf.shape != (num_labels, num_labels):
                raise PayloadError(f"'{conf_key}' must have shape ({num_labels}, {num_labels}), got {conf.shape}")
            if np.any(conf < 0):
                raise PayloadError(f"'{conf_key}' has negative counts")
            total = sum(int(v) for v in conf.ravel())  # Python ints: a hostile uint64 cannot wrap the sum around
            if total != n:
                raise PayloadError(f"'{conf_key}' counts {total} predictions but '{n_key}' is {n}")
            out[conf_key] = conf.astype(np.int64)
        loss = _finite_number(msg, loss_key)
        low, high = (-1.0, 0.0) if loss_type == "perf" else (0.0, np.inf)
        if not low <= loss <= high:
            raise PayloadError(f"'{loss_key}' {loss!r} is outside [{low}, {high}] for --loss_type {loss_type}")
        out[loss_key], out[n_key] = loss, n
    return out


def payload_bytes(msg: dict) -> int:
    """Exact bytes of the arrays, numbers (8 each) and strings (UTF-8) in a payload, excluding keys and framing."""
    total = 0
    for v in msg.values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, dict):
            total += payload_bytes(v)
        elif isinstance(v, str):
            total += len(v.encode())
        else:
            total += 8
    return total
