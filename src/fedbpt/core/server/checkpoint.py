"""Server checkpoints: a run's state in one file, so that a stopped run continues bit for bit.

A checkpoint is one ``.npz`` file (numpy's zip of ``.npy`` arrays, read with ``allow_pickle=False``) holding
:meth:`Federation.state_dict <fedbpt.core.server.federation.Federation.state_dict>`: each array of the state as an entry
under its name (``es.mean``, ``np_global_keys``), everything else in a JSON header. Nothing is pickled, so loading a
checkpoint cannot run code. It is written to a temporary file and renamed, so a server killed mid-write leaves the
previous checkpoint intact.

What the state holds and how each field is checked belongs to the objects it comes from (:mod:`fedbpt.core.state`);
this module reads and writes the file, and says in one line, naming the file, why one cannot continue this run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from typing import TYPE_CHECKING

import numpy as np

from fedbpt.core.server.federation import Federation, check_compatible
from fedbpt.core.server.summary import _json_default, atomic_write
from fedbpt.core.state import MissingField, StateError
from fedbpt.errors import CheckpointError, opt

if TYPE_CHECKING:
    from fedbpt.core.config import RunConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "fedbpt_checkpoint.npz"
FORMAT = "fedbpt-checkpoint"
VERSION = 1
_HEADER = "header"  # the npz entry of the JSON header
_FILE_KEYS = ("format", "version")  # header keys of the file, not of the state


def to_bytes(state: dict) -> bytes:
    """A state dict as the bytes of an .npz file: its arrays as entries, the rest in the JSON header."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    header = {k: v for k, v in state.items() if k not in arrays}
    clash = sorted(set(state) & {_HEADER, *_FILE_KEYS})
    if clash:
        raise ValueError(f"a checkpointed state cannot use the names {clash}: the file's own")
    text = json.dumps({"format": FORMAT, "version": VERSION, **header}, default=_json_default, allow_nan=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_HEADER: np.frombuffer(text.encode(), dtype=np.uint8)})
    return buf.getvalue()


def save(fed, rounds_done: int, out_dir: str) -> str:
    """Write ``fed``'s state after ``rounds_done`` rounds to ``out_dir``/CHECKPOINT_FILE; return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CHECKPOINT_FILE)
    atomic_write(path, to_bytes(fed.state_dict(rounds_done)))
    return path


def is_due(rnd: int, cfg: RunConfig) -> bool:
    """After round ``rnd`` (0-based): every --checkpoint_every rounds, and after the last round.

    Only FedBPT's server CMA-ES (faithful or robust) is checkpointed; the baseline aggregations (bench tools) are not.
    """
    if not cfg.has_server_es:
        return False
    every = cfg.checkpoint_every
    return every > 0 and ((rnd + 1) % every == 0 or rnd + 1 == cfg.num_rounds)


def after_round(fed, rnd: int, out_dir: str | None) -> str | None:
    if out_dir is None or not is_due(rnd, fed.cfg):
        return None
    path = save(fed, rnd + 1, out_dir)
    log.info("round %d: checkpoint written to %s", rnd, path)
    return path


class Checkpoint:
    """A checkpoint file as read: its JSON ``header`` and its ``arrays``, checked by :func:`load`."""

    def __init__(self, path: str, header: dict, arrays: dict) -> None:
        self.path, self.header, self.arrays = path, header, arrays

    @property
    def round(self) -> int:
        return int(self.header["round"])

    @property
    def state(self) -> dict:
        """The state dict it holds, as :meth:`Federation.load_state_dict` takes it."""
        return {**{k: v for k, v in self.header.items() if k not in _FILE_KEYS}, **self.arrays}


_FIX = "resume from an intact checkpoint or start a new run without --resume"


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:100] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def _refused(path: str, exc: StateError) -> CheckpointError:
    if isinstance(exc, MissingField):
        return CheckpointError(
            f"checkpoint {path} lacks field {exc.field}: it is damaged or not written by this tool; {_FIX}"
        )
    return CheckpointError(f"checkpoint {path} is corrupted: {exc.field} {exc.problem}; {_FIX}")


def load(path: str) -> Checkpoint:
    """Read and check a checkpoint file; raise CheckpointError (one line) if it is not a usable one.

    Every field that :func:`restore` puts into the run is checked for its type, shape, range and finiteness
    (:meth:`Federation.check_state`), so a damaged or crafted file is refused here, naming the field, and never
    half-restored.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found: pass {opt('resume')} with the {CHECKPOINT_FILE} of a run")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(bytes(arrays.pop(_HEADER)).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a FedBPT checkpoint ({_one_line(exc)}): "
            f"resume from an intact checkpoint or start afresh"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a FedBPT checkpoint: pass {opt('resume')} with a {CHECKPOINT_FILE}")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {header.get('version')!r}, this code reads {VERSION}: "
            f"resume with the code version that wrote it"
        )
    ckpt = Checkpoint(path, header, arrays)
    try:
        Federation.check_state(ckpt.state)
        for name, a in arrays.items():  # any other float array the file carries
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise StateError(name, "has NaN or inf")
    except StateError as exc:
        raise _refused(path, exc) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, np.linalg.LinAlgError) as exc:
        # a shape of damage the checks did not foresee: still one line, never a traceback
        raise CheckpointError(f"checkpoint {path} is corrupted ({_one_line(exc)}); {_FIX}") from None
    return ckpt


def restore(fed, ckpt: Checkpoint) -> int:
    """Put the checkpoint's state into a freshly built Federation; return the first round to run."""
    check_compatible(ckpt, fed.cfg, fed.k)
    import cma

    h = ckpt.header
    if sorted(h["sites"]) != list(fed.sites):
        log.warning("resuming with sites %s; the checkpoint had %s", fed.sites, h["sites"])
    other_cma = h["cma_version"] != cma.__version__
    if other_cma:
        log.warning(
            "checkpoint written with cma %s, running cma %s: continuation may differ", h["cma_version"], cma.__version__
        )
    try:
        first = fed.load_state_dict(ckpt.state)
    except StateError as exc:  # load() checked the file alone; this run's server or record refused it
        raise _refused(ckpt.path, exc) from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # every field was checked, so only another pycma's layout can get here, or a bug
        if other_cma:
            raise CheckpointError(
                f"checkpoint {ckpt.path} does not fit this pycma (written with cma {h['cma_version']}, running "
                f"{cma.__version__}: {_one_line(exc)}): resume with the cma version that wrote it"
            ) from None
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit this pycma {cma.__version__}, the version that wrote it "
            f"({_one_line(exc)}): it is damaged or not written by this tool; {_FIX}"
        ) from None
    log.info("resumed from %s after round %d", ckpt.path, ckpt.round - 1)
    return first


def resolve_path(path: str, base_dir: str) -> str:
    """A relative --resume (as in an exported job, where the checkpoint travels in the app's config folder)."""
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def open_run(fed: Federation, base_dir: str = "") -> int:
    """Resume ``fed`` if its config asks for it; return the first round to run (0 for a fresh run)."""
    if not fed.cfg.resume:
        return 0
    return restore(fed, load(resolve_path(fed.cfg.resume, base_dir)))
