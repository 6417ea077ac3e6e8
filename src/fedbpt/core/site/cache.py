"""A site's set-up kept on its own disk: what it derives from (config, site) is built once, then read back fast.

With ``--threads`` below ``--num_clients`` NVFlare's simulator runs every task in a fresh client process, and a
process keeps nothing of the previous one. What a site derives from the config and its own data is deterministic, so
the first set-up writes it here and every later process reads it instead of rebuilding it:

- the encoded train and dev shards (the training file is not read again, nor the k-shot sample drawn);
- on eval sites the encoded test set and its texts (the masked scorer's no-prompt baseline encodes them again);
- the projection A^T and its std: drawing 25.6 M normal floats and transposing them takes about a second on a CPU,
  while the stored copy is memory-mapped copy-on-write and paged in by the first generation that uses it;
- for a hub model id, the snapshot folder it resolved to, so later processes load that folder with the hub offline.

The model itself is not copied: ``from_pretrained`` on a local folder already memory-maps its safetensors file.

Where: ``<cache_root>/fedbpt_setup/<site>/<entry>/``, where ``cache_root`` is the site's NVFlare workspace root, which
the executor already has. It is the site's own local disk, never another site's (a site's encodings are its private
data): ``<workspace>/<site>`` in the simulator, where it lasts through every respawn of a run and goes with the
workspace; a deployed site's own workspace, where a later job with the same key reuses it.

Key: everything that decides an entry, hashed to name the entry folder and stored whole in its ``meta.json``, compared
on read: the config without the fields in RUN_ONLY (a new field is in the key unless listed there, so a forgotten
one costs a rebuild, never a wrong entry), the site and its own data settings, whether it evaluates, the size and
mtime of each data file read and of each file in the model folder, the versions of the libraries that tokenise and
draw A, and a digest of the source files that build an entry. A dataset from the hub is keyed by its name (the hub
is not asked for a revision). Every file of an entry is checked against its SHA-256 on read: a mismatched, partial
or corrupt entry is rebuilt and replaced, never used. Entries are written to a temporary folder and renamed into
place; a site keeps its KEEP most recently used entries, and the cache removes only folders it wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import numpy as np

from fedbpt.core.data.splits import Examples
from fedbpt.core.models.resolve import TOKENIZER_FILES, WEIGHT_FILES
from fedbpt.core.models.scorer import Encoded

if TYPE_CHECKING:
    from fedbpt.core.config import RunConfig

log = logging.getLogger(__name__)

CACHE_DIR = "fedbpt_setup"
FORMAT = "fedbpt-setup-1"  # the entry layout; changed with it
KEEP = 4  # entries kept per site (other configs of the same site)
MODELS_FILE = "models.json"  # hub id -> the local snapshot folder it resolved to
TMP_PREFIX = ".fedbpt-tmp-"
STALE_TMP_SECONDS = 3600  # a temporary folder this old was left by a killed writer
_ENTRY_NAME = re.compile(r"^[0-9a-f]{32}$")
# Config fields that change how a run proceeds but not what a site derives at set-up (data, encodings, A).
RUN_ONLY = frozenset(
    {
        "job_name", "num_rounds", "min_clients",
        "bound", "batch_size", "device", "loss_type", "local_iter", "local_popsize", "perturb", "perturb_rate", "eq7",
        "eval_clients", "frac", "eval_every", "test_eval", "server_sigma", "local_adaptation", "aggregation",
        "cov_mode", "max_batch_tokens", "attn_implementation", "round_timeout", "torch_threads", "test_threads",
        "model_cache_dir", "checkpoint_every", "resume", "site_metrics",
    }
)  # fmt: skip
# The modules whose code decides an entry's content: any change to them misses every entry.
SOURCES = (  # relative to the core folder
    "config.py",
    "data/splits.py",
    "data/tasks.py",
    "models/resolve.py",
    "models/scorer.py",
    "models/causal.py",
    "site/runtime.py",
    "site/settings.py",
    "site/cache.py",
)
LIBRARIES = ("torch", "transformers", "tokenizers", "numpy")


@dataclass
class Entry:
    """What a site's set-up derived: encodings, test texts (eval sites), A^T (d, n*h) and its std."""

    train: Encoded
    dev: Encoded
    test: Encoded | None
    test_examples: Examples | None
    a_t: np.ndarray
    proj_std: float


def _file_id(path: str) -> list:
    st = os.stat(path)  # follows links: a hub snapshot's files are links to its blobs
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def folder_id(path: str) -> list:
    """Name, size and mtime of every file in a model folder (not its subfolders, not hidden files)."""
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not name.startswith(".") and os.path.isfile(full):
            st = os.stat(full)
            out.append([name, st.st_size, st.st_mtime_ns])
    return out


def _code_digest() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for name in SOURCES:
        try:
            with open(os.path.join(here, name), "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError:  # a job's copy of the package may hold only the modules it imports
            h.update(f"no {name}".encode())
    return h.hexdigest()


def _library_versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def data_files(task, data_dir: str | None, splits: tuple[str, ...]) -> list:
    """Identity of the files ``load_split`` reads for ``splits``: path, size, mtime; a hub dataset by its name."""
    from fedbpt.core.data.splits import _find_local_file

    if not data_dir:
        return [["hub", task.hub_path, task.hub_config, split] for split in splits]
    return [_file_id(_find_local_file(data_dir, split)) for split in splits]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _pack(enc: Encoded, split: str, arrays: dict) -> dict:
    arrays[f"{split}_ids"] = np.concatenate(enc.ids) if enc.ids else np.zeros(0, dtype=np.int64)
    arrays[f"{split}_text_mask"] = np.concatenate(enc.text_mask) if enc.text_mask else np.zeros(0, dtype=bool)
    arrays[f"{split}_lengths"] = np.asarray(enc.lengths, dtype=np.int64)
    arrays[f"{split}_mask_pos"] = np.asarray(enc.mask_pos)
    arrays[f"{split}_labels"] = np.asarray(enc.labels)
    return {"dropped": int(enc.dropped)}


def _unpack(arrays, split: str, dropped: int) -> Encoded:
    lengths = arrays[f"{split}_lengths"]
    cuts = np.cumsum(lengths)[:-1]
    ids, mask = arrays[f"{split}_ids"], arrays[f"{split}_text_mask"]
    if len(ids) != int(lengths.sum()) or len(mask) != len(ids):
        raise ValueError(f"{split}: {len(ids)} ids and {len(mask)} mask entries for {int(lengths.sum())} tokens")
    n = len(lengths)
    return Encoded(
        list(np.split(ids, cuts)) if n else [],
        list(np.split(mask, cuts)) if n else [],
        arrays[f"{split}_mask_pos"],
        arrays[f"{split}_labels"],
        dropped,
    )


class SetupCache:
    """One site's entries under ``<cache_root>/fedbpt_setup/<site>``."""

    def __init__(self, cache_root: str, site: str) -> None:
        self.site = site
        self.dir = os.path.join(cache_root, CACHE_DIR, site)

    # ---- key -------------------------------------------------------------------------------------------
    def key(self, cfg: RunConfig, local, is_eval: bool, model_path: str, task) -> dict:
        """Everything that decides this site's entry (``local``: its core.site.settings.SiteSettings)."""
        splits = ("train", task.test_split) if is_eval else ("train",)
        return {
            "format": FORMAT,
            "site": self.site,
            "config": {k: v for k, v in sorted(cfg.model_dump().items()) if k not in RUN_ONLY and k != "model_name"},
            "local": [local.data_dir, local.shard, local.seed_index],
            "eval": bool(is_eval),
            "data": data_files(task, local.data_dir, splits),
            "model": [os.path.abspath(model_path), folder_id(model_path)],
            "libraries": _library_versions(),
            "code": _code_digest(),
        }

    @staticmethod
    def _name(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    # ---- read ------------------------------------------------------------------------------------------
    def read(self, key: dict) -> Entry | None:
        """The entry for ``key``, or None when there is none or it does not check out (then it is rebuilt)."""
        path = os.path.join(self.dir, self._name(key))
        if not os.path.isdir(path):
            return None
        try:
            entry = self._read(path, key)
        except Exception as exc:  # OSError, ValueError, KeyError, a damaged npz: never use it
            log.warning("%s: set-up cache entry %s is unusable (%s); rebuilding it", self.site, path, exc)
            return None
        try:
            os.utime(os.path.join(path, "meta.json"))  # most recently used: kept longest
        except OSError:
            pass
        return entry

    def _read(self, path: str, key: dict) -> Entry:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("key") != json.loads(json.dumps(key)):
            raise ValueError("its key does not match")
        files = meta["files"]
        for name, digest in files.items():
            if _sha256(os.path.join(path, name)) != digest:
                raise ValueError(f"{name} does not match its checksum")
        with np.load(os.path.join(path, "encodings.npz"), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        encs = {s: _unpack(arrays, s, meta["splits"][s]["dropped"]) for s in meta["splits"]}
        test_examples = None
        if "test_examples.json" in files:
            with open(os.path.join(path, "test_examples.json")) as f:
                raw = json.load(f)
            test_examples = Examples([tuple(t) for t in raw["texts"]], np.asarray(raw["labels"], dtype=np.int64))
        a_t = np.load(os.path.join(path, "projection.npy"), mmap_mode="c", allow_pickle=False)
        if a_t.ndim != 2 or a_t.dtype != np.float32:
            raise ValueError(f"projection has shape {a_t.shape} and dtype {a_t.dtype}")
        if key["eval"] != ("test" in encs and test_examples is not None):
            raise ValueError("its test set does not match the site's role")
        return Entry(encs["train"], encs["dev"], encs.get("test"), test_examples, a_t, float(meta["proj_std"]))

    # ---- write -----------------------------------------------------------------------------------------
    def write(self, key: dict, entry: Entry) -> str | None:
        """Store ``entry`` under ``key`` (atomically); returns its folder, or None if it could not be written (the
        run goes on without it)."""
        final = os.path.join(self.dir, self._name(key))
        try:
            os.makedirs(self.dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.dir)
        except OSError as exc:
            log.warning("%s: cannot write the set-up cache in %s (%s); continuing without it", self.site, self.dir, exc)
            return None
        try:
            arrays: dict = {}
            splits = {"train": _pack(entry.train, "train", arrays), "dev": _pack(entry.dev, "dev", arrays)}
            if entry.test is not None:
                splits["test"] = _pack(entry.test, "test", arrays)
            np.savez(os.path.join(tmp, "encodings.npz"), **arrays)
            np.save(os.path.join(tmp, "projection.npy"), np.ascontiguousarray(entry.a_t, dtype=np.float32))
            names = ["encodings.npz", "projection.npy"]
            if entry.test_examples is not None:
                with open(os.path.join(tmp, "test_examples.json"), "w") as f:
                    json.dump({"texts": entry.test_examples.texts, "labels": entry.test_examples.labels.tolist()}, f)
                names.append("test_examples.json")
            meta = {
                "format": FORMAT,
                "key": key,
                "files": {n: _sha256(os.path.join(tmp, n)) for n in names},
                "splits": splits,
                "proj_std": float(entry.proj_std),
                "created": time.time(),
            }
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
            self._replace(tmp, final)
        except OSError as exc:
            log.warning("%s: cannot write the set-up cache in %s (%s); continuing without it", self.site, self.dir, exc)
            return None
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune(keep=final)
        return final

    def _replace(self, tmp: str, final: str) -> None:
        """Rename ``tmp`` to ``final``; an existing (unusable) ``final`` is moved aside first and removed."""
        if os.path.isdir(final):
            aside = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.dir)
            os.rename(final, os.path.join(aside, "old"))
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not another writer's identical entry: a real failure
                raise

    def _prune(self, keep: str) -> None:
        """Keep the KEEP most recently used entries of this site; remove temporary folders left by killed writers."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        entries, now = [], time.time()
        for name in names:
            path = os.path.join(self.dir, name)
            try:
                if name.startswith(TMP_PREFIX) and now - os.stat(path).st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                elif _ENTRY_NAME.match(name) and os.path.isfile(os.path.join(path, "meta.json")):
                    with open(os.path.join(path, "meta.json")) as f:
                        if json.load(f).get("format", "").startswith("fedbpt-setup-"):
                            entries.append((os.stat(os.path.join(path, "meta.json")).st_mtime, path))
            except (OSError, ValueError, AttributeError):
                continue
        entries.sort(reverse=True)
        for _, path in entries[KEEP:]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- hub models ------------------------------------------------------------------------------------
    def _models(self) -> dict:
        try:
            with open(os.path.join(self.dir, MODELS_FILE)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def local_model(self, name: str) -> str | None:
        """The local folder a hub id resolved to at an earlier set-up, if it is still whole; None otherwise."""
        if os.path.isdir(name):
            return name
        folder = self._models().get(name)
        return folder if isinstance(folder, str) and complete_model_folder(folder) else None

    def record_model(self, name: str) -> str | None:
        """After a set-up loaded hub id ``name``: record the local snapshot folder it resolved to (None if the
        files are not all in the hub cache)."""
        if os.path.isdir(name):
            return name
        try:
            from huggingface_hub import try_to_load_from_cache

            config = try_to_load_from_cache(name, "config.json")
        except Exception:  # an id the hub client refuses: nothing to record
            return None
        if not isinstance(config, str) or not complete_model_folder(os.path.dirname(config)):
            return None
        folder = os.path.dirname(config)
        models = self._models()
        if models.get(name) == folder:
            return folder
        models[name] = folder
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.dir)
            with os.fdopen(fd, "w") as f:
                json.dump(models, f)
            os.replace(tmp, os.path.join(self.dir, MODELS_FILE))
        except OSError as exc:
            log.warning("%s: cannot record the model folder of %s (%s)", self.site, name, exc)
        return folder


def complete_model_folder(path: str) -> bool:
    """A folder with a config, weights and a tokenizer vocabulary (names only; the load checks the contents)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    names = set(os.listdir(path))
    return bool(names & set(WEIGHT_FILES)) and bool(names & set(TOKENIZER_FILES))
