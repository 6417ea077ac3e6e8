"""The state of a pycma CMAEvolutionStrategy as a state dict (:mod:`fedbpt.core.state`), checked before it is set.

pycma has no state API of its own, and pickling the strategy would make loading a saved state run code. These lists
name what its tell() reads or carries forward (cma 4.x); :class:`~fedbpt.core.algorithm.aggregation.ServerES` saves
and loads its CMA-ES through them. B, C and D live in the sampler ``sm``; the strategy holds aliases of them.
Attributes missing or None when saved are restored as None.

Under ``name`` (the server uses ``es``) a state holds ``{"scalars", "lists", "none", "decoding"}``; each array field
sits beside it as ``name.path`` (``es.mean``, ``es.sm.C``, ``es.sigma_vec.scaling``).
"""

from __future__ import annotations

import warnings

import numpy as np

from fedbpt.core.state import StateError, array, flag, integer, mapping, member, number, sequence

# The largest step size a state may carry. Far above any step a run reaches (the eq6_sent ablation, whose step grows
# about 1.7x a round, is near 1e7 after 30 rounds and 1e23 after 100), far below where pycma's squared steps overflow
# float64 (about 1e154).
SIGMA_MAX = 1e30

ARRAYS = (
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
SCALARS = (
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
LISTS = ("fit.hist", "fit.histbest", "fit.histmedian")
ALIASES = ("B", "C", "D")  # es.X is es.sm.X
# pycma's diagonal decoding (its DiagonalDecoding ``sigma_vec``): the identity, a scalar 1, until a box's maxstd
# (with --bound, a third of the box's width) rescales a coordinate, which makes ``scaling`` a vector. ``dim`` is not
# derived from it: pycma leaves it 1 when it widens ``scaling``, and its learning rates read ``dim``. A state that
# does not hold these fields leaves the strategy's own decoding, which is exact for runs without --bound.
DECODING = ("sigma_vec.scaling", "sigma_vec.is_identity", "sigma_vec.dim")

# what the checks expect of each field
_REQUIRED = ("mean", "pc", "adapt_sigma.ps", "sm.C", "sm.B", "sm.D", "sigma", "countiter")  # never None while running
_BOOLS = ("_flgtelldone", "adapt_sigma.is_initialized")
_MARKS = ("_isotropic_mean_shift_iteration", "adapt_sigma._ps_updated_iteration")  # iteration numbers, -1: never
_STEPS = ("sigma", "_sigma_old")
_POSITIVE = ("adapt_sigma.delta", "adapt_sigma._last_multiplier")
_FITNESS = ("fit.median", "fit.median0", "fit.median_min", "fit.median_previous", "best.f")  # inf before any tell
_COUNTS = tuple(p for p in SCALARS if p not in _BOOLS + _MARKS + _STEPS + _POSITIVE + _FITNESS)  # counters, >= 0
_PER_POINT = ("fit.fit", "fit.idx")  # one entry per told point
_MATRICES = ("sm.C", "sm.B")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _parent(obj, path: str) -> tuple[object, str]:
    """(the object holding the last attribute of ``path``, that attribute's name); AttributeError if there is none."""
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, last


def _scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return float(v)


def state_dict(es, name: str) -> dict:
    """``es``'s state: its numbers under ``name``, each of its arrays (a copy) under ``name.path``."""
    out, numbers = {}, {"scalars": {}, "lists": {}, "none": []}
    for path in ARRAYS:
        v = _get(es, path)
        if v is None:
            numbers["none"].append(path)
        else:
            out[f"{name}.{path}"] = np.array(v, copy=True)
    for path in SCALARS:
        v = _get(es, path)
        if v is None:
            numbers["none"].append(path)
        else:
            numbers["scalars"][path] = _scalar(v)
    for path in LISTS:
        v = _get(es, path)
        numbers["lists"][path] = [] if v is None else [_scalar(x) for x in v]
    vec = es.sigma_vec
    out[f"{name}.sigma_vec.scaling"] = np.array(vec.scaling, dtype=np.float64, copy=True)
    numbers["decoding"] = {"is_identity": bool(vec.is_identity), "dim": int(vec.dim)}
    return {name: numbers, **out}


def check_state(state: dict, name: str, d: int, k: int) -> None:
    """Raise StateError for the first field under ``name`` that a CMA-ES in dimension ``d`` telling ``k`` points a
    generation could not continue from: types, shapes, ranges, finiteness and the covariance's own properties."""
    numbers = mapping(member(state, name), name)
    scalars = mapping(member(numbers, "scalars", f"{name}.scalars"), f"{name}.scalars")
    lists = mapping(member(numbers, "lists", f"{name}.lists"), f"{name}.lists")
    none = sequence(member(numbers, "none", f"{name}.none"), f"{name}.none")
    for path in none:
        if path not in ARRAYS + SCALARS:
            raise StateError(f"{name}.none", f"names {path!r}, not a CMA-ES field this tool records")
        if path in _REQUIRED:
            raise StateError(f"{name}.{path}", "is recorded as None, which no running CMA-ES has")
    for path in ARRAYS:
        if path in none:
            continue
        field = f"{name}.{path}"
        if path in _MATRICES:
            array(state, field, (d, d))
        elif path == "fit.idx":
            idx = array(state, field, (k,), int)
            if sorted(idx.tolist()) != list(range(k)):
                raise StateError(field, f"is not a permutation of 0..{k - 1}")
        elif path in _PER_POINT:
            array(state, field, (k,))
        else:
            array(state, field, (d,))
    _check_covariance(state, name, none, d)
    for path in SCALARS:
        if path in none:
            continue
        field = f"{name}.scalars.{path}"
        v = member(scalars, path, field)
        if path in _BOOLS:
            flag(v, field)
        elif path in _MARKS:
            integer(v, field, -1)
        elif path in _COUNTS:
            integer(v, field, 0)
        elif path in _STEPS:
            number(v, field, positive=True, hi=SIGMA_MAX)
        elif path in _POSITIVE:
            number(v, field, positive=True)
        else:  # _FITNESS
            number(v, field, finite=False)
    for path in LISTS:
        field = f"{name}.lists.{path}"
        for v in sequence(member(lists, path, field), field):
            number(v, field, finite=False)
    _check_decoding(state, name, d)


def _check_decoding(state: dict, name: str, d: int) -> None:
    """The diagonal decoding, where the state holds it: positive scales, one or one per coordinate."""
    field, scaling = f"{name}.decoding", f"{name}.sigma_vec.scaling"
    if "decoding" not in state[name] and scaling not in state:
        return
    decoding = mapping(member(state[name], "decoding", field), field)
    flag(member(decoding, "is_identity", f"{field}.is_identity"), f"{field}.is_identity")
    dim = integer(member(decoding, "dim", f"{field}.dim"), f"{field}.dim", 1)
    if dim not in (1, d):
        raise StateError(f"{field}.dim", f"is {dim}, not 1 or {d}")
    a = member(state, scaling)
    array(state, scaling, () if isinstance(a, np.ndarray) and a.shape == () else (d,))
    if not np.all(a > 0):
        raise StateError(scaling, "has a zero or negative entry: not a scaling")


def _check_covariance(state: dict, name: str, none: list, d: int) -> None:
    """C symmetric positive definite with a positive diagonal, D positive, B orthonormal: what sampling needs."""
    c = state[f"{name}.sm.C"]
    scale = float(np.max(np.abs(c)))
    if not np.all(np.diag(c) > 0):
        raise StateError(f"{name}.sm.C", "has a zero or negative diagonal entry: not a covariance matrix")
    if np.max(np.abs(c - c.T)) > 1e-10 * scale:
        raise StateError(f"{name}.sm.C", "is not symmetric: not a covariance matrix")
    if np.linalg.eigvalsh(c).min() <= 0:  # pycma's own test when it eigen-decomposes C
        raise StateError(f"{name}.sm.C", "is not positive definite: not a covariance matrix")
    if not np.all(state[f"{name}.sm.D"] > 0):
        raise StateError(f"{name}.sm.D", "has a zero or negative entry: not the square roots of C's eigenvalues")
    if "dC" not in none and not np.all(state[f"{name}.dC"] > 0):
        raise StateError(f"{name}.dC", "has a zero or negative entry: not the diagonal of a covariance matrix")
    b = state[f"{name}.sm.B"]
    if np.max(np.abs(b.T @ b - np.eye(d))) > 1e-6:
        raise StateError(f"{name}.sm.B", "is not orthonormal: not the eigenvectors of C")


def set_state(es, state: dict, name: str) -> None:
    """Put a state that passed :func:`check_state` into ``es``.

    An AttributeError here means ``es`` is laid out otherwise than the pycma that wrote the state; it is raised
    before ``es`` changes. numpy's global generator, which pycma's ask() draws from, is left as it was.
    """
    for path in ARRAYS + SCALARS + LISTS + DECODING:
        _parent(es, path)
    numbers = state[name]
    rng = np.random.get_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es.ask()  # builds what pycma creates lazily at its first ask (timer, counters); the samples are unused
    np.random.set_state(rng)
    for path in ARRAYS:
        obj, attr = _parent(es, path)
        if path not in numbers["none"]:
            setattr(obj, attr, np.array(state[f"{name}.{path}"], copy=True))
        elif getattr(obj, attr, None) is not None:
            setattr(obj, attr, None)
    for path in SCALARS:
        obj, attr = _parent(es, path)
        setattr(obj, attr, None if path in numbers["none"] else numbers["scalars"][path])
    es.sigma = np.float64(es.sigma)  # pycma keeps sigma as a numpy scalar
    for path in LISTS:
        obj, attr = _parent(es, path)
        setattr(obj, attr, list(numbers["lists"][path]))
    for alias in ALIASES:
        setattr(es, alias, getattr(es.sm, alias))
    if "decoding" in numbers:
        vec = es.sigma_vec
        vec.scaling = np.array(state[f"{name}.sigma_vec.scaling"], copy=True)
        vec.is_identity = numbers["decoding"]["is_identity"]
        vec.dim = numbers["decoding"]["dim"]
