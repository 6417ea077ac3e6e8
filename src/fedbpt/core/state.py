"""Saved state as plain data, and the checks it passes before an object takes it back.

Every object a resumed run restores (the server's CMA-ES, the robust server's incumbent, the run record, the random
generators) exposes ``state_dict()`` and ``load_state_dict(state)``. A state dict is flat: numbers, strings, lists and
dicts under plain names, and numpy arrays under dotted names (``es.mean``), so that a file format can keep the
arrays apart from the rest without knowing what either means. ``load_state_dict`` checks every field with the
validators here before it changes anything, so a damaged or crafted state is refused by a :class:`StateError` that
names its field, and an object is never left half restored.
"""

from __future__ import annotations

import numpy as np


class StateError(ValueError):
    """A state field that cannot be used: ``field`` names it (``es.scalars.sigma``), ``problem`` says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class MissingField(StateError):
    """A field the state lacks: it was damaged or written by something else."""

    def __init__(self, field: str) -> None:
        super().__init__(field, "is missing")


def member(obj: dict, key: str, field: str | None = None):
    """``obj[key]``, or MissingField naming ``field`` (default: ``key``)."""
    if key not in obj:
        raise MissingField(key if field is None else field)
    return obj[key]


def mapping(v, field: str) -> dict:
    if not isinstance(v, dict):
        raise StateError(field, f"is a {type(v).__name__}, not a JSON object")
    return v


def sequence(v, field: str) -> list:
    if not isinstance(v, list):
        raise StateError(field, f"is a {type(v).__name__}, not a list")
    return v


def flag(v, field: str) -> bool:
    if not isinstance(v, bool):
        raise StateError(field, f"is {v!r}, not true or false")
    return v


def integer(v, field: str, lo: int, hi: int | None = None) -> int:
    """An int in [lo, hi] (hi None: unbounded); a bool is not one, though Python counts it as one."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise StateError(field, f"is {v!r}, not an integer")
    if v < lo or (hi is not None and v > hi):
        raise StateError(field, f"is {v}, outside [{lo}, {'inf' if hi is None else hi}]")
    return v


def number(
    v, field: str, finite: bool = True, positive: bool = False, hi: float | None = None, nan: bool = False
) -> float:
    """An int or float as a float: finite unless ``finite`` is False, NaN only with ``nan``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise StateError(field, f"is {v!r}, not a number")
    try:
        v = float(v)
    except OverflowError:
        raise StateError(field, "is an integer too large for a float") from None
    if (np.isnan(v) and not nan) or (finite and not np.isfinite(v)):
        raise StateError(field, f"is {v!r}, not a finite number")
    if positive and v <= 0:
        raise StateError(field, f"is {v!r}, not a positive number")
    if hi is not None and v > hi:
        raise StateError(field, f"is {v!r}, larger than {hi:g}")
    return v


def optional_metric(v, field: str) -> float | None:
    """A recorded metric: null, or a number, NaN included (a split whose every example was dropped scores NaN)."""
    return None if v is None else number(v, field, finite=False, nan=True)


def array(state: dict, name: str, shape: tuple, dtype=np.float64) -> np.ndarray:
    """``state[name]`` as an array of this shape and dtype (``int``: any integer type), finite if float."""
    a = member(state, name)
    if not isinstance(a, np.ndarray):
        raise StateError(name, f"is a {type(a).__name__}, not an array")
    if dtype is int:
        if a.dtype.kind not in "iu":
            raise StateError(name, f"has dtype {a.dtype}, not an integer type")
    elif a.dtype != dtype:
        raise StateError(name, f"has dtype {a.dtype}, not {np.dtype(dtype)}")
    if a.shape != shape:
        raise StateError(name, f"has shape {a.shape}, not {shape}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise StateError(name, "has NaN or inf")
    return a


# ---- random generators --------------------------------------------------------------------------------------------
_PCG_DIGITS = 39  # 2**128 - 1 in decimal
_MT_KEYS = 624  # MT19937's state words


def generator_state(rng: np.random.Generator) -> dict:
    """A PCG64 generator's state; its 128-bit integers as decimal strings, which JSON keeps exactly."""
    s = rng.bit_generator.state
    if s["bit_generator"] != "PCG64":
        raise TypeError(f"cannot save a {s['bit_generator']} generator")
    return {
        "bit_generator": "PCG64",
        "state": str(s["state"]["state"]),
        "inc": str(s["state"]["inc"]),
        "has_uint32": int(s["has_uint32"]),
        "uinteger": int(s["uinteger"]),
    }


def check_generator_state(s, field: str) -> None:
    s = mapping(s, field)
    if member(s, "bit_generator", f"{field}.bit_generator") != "PCG64":
        raise StateError(f"{field}.bit_generator", f"is {s['bit_generator']!r}, not 'PCG64'")
    for key in ("state", "inc"):
        v = member(s, key, f"{field}.{key}")
        if not isinstance(v, str) or not (0 < len(v) <= _PCG_DIGITS) or not all("0" <= c <= "9" for c in v):
            raise StateError(f"{field}.{key}", f"is {v!r}, not a decimal 128-bit integer")
        if int(v) >= 2**128:
            raise StateError(f"{field}.{key}", "does not fit in 128 bits")
    if int(s["inc"]) % 2 == 0:
        raise StateError(f"{field}.inc", "is even: a PCG64 increment is always odd")
    integer(member(s, "has_uint32", f"{field}.has_uint32"), f"{field}.has_uint32", 0, 1)
    integer(member(s, "uinteger", f"{field}.uinteger"), f"{field}.uinteger", 0, 2**32 - 1)


def set_generator_state(rng: np.random.Generator, s: dict) -> None:
    """Inverse of :func:`generator_state` (``s`` checked by :func:`check_generator_state`)."""
    rng.bit_generator.state = {
        "bit_generator": s["bit_generator"],
        "state": {"state": int(s["state"]), "inc": int(s["inc"])},
        "has_uint32": int(s["has_uint32"]),
        "uinteger": int(s["uinteger"]),
    }


def global_state(name: str) -> dict:
    """numpy's global MT19937 generator: its numbers under ``name``, its 624 key words under ``name + "_keys"``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numbers = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {name: numbers, f"{name}_keys": np.asarray(keys, dtype=np.uint32)}


def check_global_state(state: dict, name: str) -> None:
    g = mapping(member(state, name), name)
    if member(g, "kind", f"{name}.kind") != "MT19937":
        raise StateError(f"{name}.kind", f"is {g['kind']!r}, not 'MT19937'")
    integer(member(g, "pos", f"{name}.pos"), f"{name}.pos", 0, _MT_KEYS)
    integer(member(g, "has_gauss", f"{name}.has_gauss"), f"{name}.has_gauss", 0, 1)
    number(member(g, "cached_gaussian", f"{name}.cached_gaussian"), f"{name}.cached_gaussian")
    keys = array(state, f"{name}_keys", (_MT_KEYS,), np.uint32)
    if not keys.any():
        raise StateError(f"{name}_keys", "is all zeros: not a Mersenne Twister state")


def set_global_state(state: dict, name: str) -> None:
    """Inverse of :func:`global_state` (checked by :func:`check_global_state`)."""
    g = state[name]
    np.random.set_state((g["kind"], state[f"{name}_keys"], g["pos"], g["has_gauss"], g["cached_gaussian"]))
