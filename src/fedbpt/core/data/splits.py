"""Datasets, k-shot sampling and the client partition.

Every site derives its own shard from the shared seed and its site index, so no site ever needs to receive
(or even compute) another site's examples beyond the public k-shot index arithmetic.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np

from fedbpt.core.data.tasks import TaskSpec
from fedbpt.errors import ConfigError, opt

PARTITIONS = ("hsu", "per_class")  # --partition: the non-IID schemes of partition()
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Examples:
    """Texts (one tuple of column values per example) and integer labels."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | list[int]) -> Examples:
        idx = np.asarray(idx, dtype=np.int64)
        return Examples([self.texts[i] for i in idx], self.labels[idx])


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None. A DNS lookup only, so an offline machine fails in
    milliseconds instead of after the hub client's retries. HF_HUB_OFFLINE=1 skips it (cached files are used)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host} does not resolve ({exc.strerror or exc})"
    return None


def _find_local_file(data_dir: str, split: str) -> str:
    for ext in LOCAL_FORMATS:
        path = os.path.join(data_dir, split + ext)
        if os.path.isfile(path):
            return path
    raise ConfigError(
        f"no '{split}' file in {opt('data_dir')} {data_dir}: expected {split}.jsonl, .json, .csv or .parquet in the "
        "hub schema"
    )


def _json_rows(path: str) -> tuple[list, list[str]]:
    """The examples of a local .jsonl/.json file and where each one is ("line 3"), read with the standard library so
    that a bad line is named (datasets reports only that generation failed). A .json file may also hold one JSON
    array of examples or an object of equal-length columns, as datasets' json loader accepts."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}): fix its permissions") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark
    if path.endswith(".json") and raw.lstrip()[:1] in (b"[", b"{"):
        try:
            whole = json.loads(_utf8(raw, path))
        except json.JSONDecodeError as exc:
            if not (raw.lstrip()[:1] == b"{" and exc.msg == "Extra data"):  # "Extra data" after one object: lines
                raise ConfigError(
                    f"{path} is not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}): fix the file"
                ) from None
        else:
            if isinstance(whole, list):
                return whole, [f"item {i + 1}" for i in range(len(whole))]
            if isinstance(whole, dict) and whole and all(isinstance(v, list) for v in whole.values()):
                lengths = {len(v) for v in whole.values()}
                if len(lengths) != 1:
                    raise ConfigError(f"{path} holds columns of different lengths {sorted(lengths)}: fix the file")
                rows = [dict(zip(whole, values)) for values in zip(*whole.values())]
                return rows, [f"row {i + 1}" for i in range(len(rows))]
            # a single object: one example per line (JSON lines) with only one line
    rows, where = [], []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(_utf8(line, path, n)))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path} line {n} is not valid JSON ({exc.msg} at column {exc.colno}): fix or remove that line "
                f"(one JSON object per line)"
            ) from None
        where.append(f"line {n}")
    return rows, where


def _utf8(raw: bytes, path: str, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = line if line is not None else raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}): save the file as UTF-8"
        ) from None


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def _datasets_rows(path: str, fmt: str, split: str, columns: tuple[str, ...]) -> tuple[list, list[str], list[str]]:
    """A local csv or parquet file through datasets; its failures become one line naming the file."""
    import datasets

    if fmt == "csv":  # pandas and arrow report bad bytes in several ways, none naming the line: check it here
        try:
            with open(path, "rb") as f:
                _utf8(f.read(), path)
        except OSError as exc:
            raise ConfigError(f"cannot read {path} ({exc.strerror or exc}): fix its permissions") from None
    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)  # it logs "Failed to read file ..." on stderr before raising
    try:
        ds = datasets.load_dataset(fmt, data_files={split: path}, split=split)
    except Exception as exc:
        if "corresponds to no data" in str(exc):
            raise ConfigError(f"{path} holds no examples: a {split} file needs at least one row") from None
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            raise ConfigError(f"{path} is not UTF-8 text: save the file as UTF-8") from None
        if type(cause).__name__ == "EmptyDataError":
            raise ConfigError(f"{path} is empty: a {split} file needs a header and at least one row") from None
        why = (str(cause).strip().splitlines() or [""])[0][:160]
        raise ConfigError(
            f"cannot read {path} as {fmt} ({type(cause).__name__}: {why}): fix the file, or save it as jsonl"
        ) from None
    finally:
        logger.setLevel(level)
    present = [c for c in columns if c in ds.column_names]
    rows = [dict(zip(present, values)) for values in zip(*(ds[c] for c in present))] if present else [{}] * len(ds)
    return rows, [f"row {i + 1}" for i in range(len(rows))], list(ds.column_names)


def _label(value, task: TaskSpec, at: str) -> int:
    """An integer label of ``task`` (or one of its dropped labels); a float only if integral, never truncated."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        label = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and float(value).is_integer():
        label = int(value)
    else:
        shown = "null" if value is None else repr(value)[:40]
        raise ConfigError(
            f"{at}: label {shown} is not an integer: labels of task {task.name} are 0..{task.num_classes - 1}"
        )
    if not 0 <= label < task.num_classes and label not in task.drop_labels:
        raise ConfigError(
            f"{at}: label {label} is outside 0..{task.num_classes - 1} for task {task.name}: fix the label, or "
            f"pass the {opt('task_name')} the data is for"
        )
    return label


def _examples(rows: list, where: list[str], task: TaskSpec, split: str, source: str, columns: list | None) -> Examples:
    """Validated examples from rows (dicts): every text column a string, every label an integer of the task."""
    if not rows:
        raise ConfigError(f"{source} holds no examples: a {split} file needs at least one")
    needed = (*task.text_columns, "label")
    if not isinstance(rows[0], dict):
        raise ConfigError(f"{source} {where[0]} is not an object of columns: each example needs {', '.join(needed)}")
    has = columns if columns is not None else list(rows[0])
    missing = [c for c in needed if c not in has]
    if missing:
        raise ConfigError(
            f"{source}: {split} data for task {task.name} lacks columns {missing} (has {has}): "
            f"use files in the schema of {task.hub_path}"
        )
    texts, labels = [], []
    for row, at in zip(rows, where):
        at = f"{source} {at}"
        if not isinstance(row, dict):
            raise ConfigError(f"{at} is not an object of columns: each example needs {', '.join(needed)}")
        values = []
        for c in task.text_columns:
            if c not in row:
                raise ConfigError(f"{at} has no '{c}': each example needs {', '.join(needed)}")
            v = row[c]
            if not isinstance(v, str):
                empty = v is None or (isinstance(v, float) and v != v)  # csv: an empty cell reads as null or NaN
                shown = "null (or empty)" if empty else f"{type(v).__name__} {repr(v)[:40]}"
                raise ConfigError(f"{at}: '{c}' is {shown}, not text: give every example its text as a string")
            values.append(v)
        if "label" not in row:
            raise ConfigError(f"{at} has no 'label': each example needs {', '.join(needed)}")
        texts.append(tuple(values))
        labels.append(_label(row["label"], task, at))
    return Examples(texts, np.asarray(labels, dtype=np.int64))


def load_split(task: TaskSpec, split: str, data_dir: str | None = None) -> Examples:
    """Load one split from local files (``data_dir``) or the Hugging Face hub.

    Every example is checked: its text columns must be strings, its label an integer in 0..num_classes-1 (or one
    of the task's dropped labels, e.g. SNLI's -1); a bad file, line or value is refused with one line naming it.
    """
    if data_dir:
        if not os.path.isdir(data_dir):
            raise ConfigError(
                f"{opt('data_dir')} {data_dir} is not a directory: point it at a folder with train/test files"
            )
        path = _find_local_file(data_dir, split)
        fmt = LOCAL_FORMATS[os.path.splitext(path)[1]]
        if fmt == "json":
            rows, where = _json_rows(path)
            columns = None
        else:
            rows, where, columns = _datasets_rows(path, fmt, split, (*task.text_columns, "label"))
        source = path
        examples = _examples(rows, where, task, split, source, columns)
    else:
        import datasets  # heavy import: only where data is actually loaded

        datasets.disable_progress_bars()
        why = hub_unreachable()
        if why:
            raise ConfigError(
                f"cannot load {task.hub_path} ({split}) from the Hugging Face hub: {why}; "
                f"pass {opt('data_dir')} DIR with local {split}.jsonl/.csv/.parquet files in the hub schema"
            )
        try:
            ds = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
        except Exception as exc:  # offline, DNS failure, missing repo: all mean the same to the user
            raise ConfigError(
                f"cannot load {task.hub_path} ({split}) from the Hugging Face hub ({type(exc).__name__}): "
                f"pass {opt('data_dir')} DIR with local {split}.jsonl/.csv/.parquet files in the hub schema"
            ) from None
        cols = [c for c in (*task.text_columns, "label") if c in ds.column_names]
        rows = [dict(zip(cols, values)) for values in zip(*(ds[c] for c in cols))] if cols else []
        source = f"{task.hub_path} ({split})"
        examples = _examples(rows, [f"row {i + 1}" for i in range(len(rows))], task, split, source, ds.column_names)
    keep = ~np.isin(examples.labels, task.drop_labels) if task.drop_labels else None
    if keep is None or keep.all():
        return examples
    if not keep.any():
        raise ConfigError(
            f"{source} has no labelled examples (every label is one of {list(task.drop_labels)}, which task "
            f"{task.name} drops): give labels 0..{task.num_classes - 1}"
        )
    return examples.subset(np.flatnonzero(keep))


def k_shot_indices(
    labels: np.ndarray, k_shot: int, num_classes: int, seed: int, dev_shot: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle; the first k per class form train, the next ``dev_shot`` (default k, as the reference) per
    class form dev. Train does not depend on ``dev_shot``."""
    dev_shot = k_shot if dev_shot is None else dev_shot
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < k_shot + dev_shot:
        c = int(counts.argmin())
        fix = (
            f"{opt('k_shot')} to at most {counts.min() // 2}"
            if dev_shot == k_shot
            else f"{opt('k_shot')} or {opt('dev_shot')}"
        )
        raise ConfigError(
            f"{opt('k_shot')} {k_shot} needs {k_shot + dev_shot} training examples of class {c} (train + dev), "
            f"the data has {counts[c]}: lower {fix}"
        )
    order = np.random.default_rng(seed).permutation(len(labels))
    train, dev = [], []
    for c in range(num_classes):
        of_c = order[labels[order] == c]
        train.append(of_c[:k_shot])
        dev.append(of_c[k_shot : k_shot + dev_shot])
    # keep the shuffled order rather than grouping by class
    train_idx = order[np.isin(order, np.concatenate(train))]
    dev_idx = order[np.isin(order, np.concatenate(dev))]
    return train_idx, dev_idx


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0 (Lawson-Hanson active set): finite and exact up to rounding, with no solver
    dependency. The passive columns stay linearly independent, so the answer is a basic solution."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(np.abs(a).sum(axis=0).max(), 1.0)
    for _ in range(3 * n + 10):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                break
            # step back along x -> z to the first passive variable that would turn negative, and drop it
            bad = passive & (z <= tol)
            step = np.min(x[bad] / np.maximum(x[bad] - z[bad], 1e-300))  # 0 when a just-added variable fails
            x = x + step * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
    return x


def least_norm_sizes(mix: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Client sizes x >= 0 of least ||x|| with sum_k mix[k, c] x_k = counts[c] for every class c (Hsu et al. 2019).

    ``mix`` is clients x classes, rows on the simplex. Solved exactly as a least-distance program through NNLS
    (Lawson & Hanson, ch. 23) on the class shares, so the scale is O(1) whatever the counts. When no x >= 0 meets
    the counts (more classes than clients, or the global mix outside the cone of the client mixes) the QP has no
    solution, which the reference's cvxopt call cannot handle; the sizes then fall back to the nonnegative
    least-squares fit of the counts (see class_takes for the over-asked classes).
    """
    mix = np.asarray(mix, dtype=float)
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    a, b = mix.T, counts / total  # classes x clients; shares sum to 1, and so do the sizes when feasible
    k = a.shape[1]
    # min ||x|| s.t. g x >= h, with the equalities as two inequalities each: x = -r[:k] / r[k] where r = e u - f,
    # u = NNLS(e = [g^T; h^T], f = e_{k+1}); r = 0 means infeasible, and ||r||^2 = 1 / (1 + ||x||^2) >= 1/2 otherwise
    g = np.vstack([a, -a, np.eye(k)])
    h = np.concatenate([b, -b, np.zeros(k)])
    e = np.vstack([g.T, h[None, :]])
    f = np.zeros(k + 1)
    f[k] = 1.0
    r = e @ _nnls(e, f) - f
    if r @ r > 0.25:
        x = np.maximum(-r[:k] / r[k], 0.0)
        if np.abs(a @ x - b).max() < 1e-6:
            return x * total
    return _nnls(a, b) * total


def _give_empty_clients_one(shards: list[list[int]]) -> None:
    """Every client must hold an example: move single examples from the largest shard (ties: lowest index)."""
    for k in range(len(shards)):
        if not shards[k]:
            donor = max(range(len(shards)), key=lambda j: (len(shards[j]), -j))
            shards[k].append(shards[donor].pop())


def _per_class(labels: np.ndarray, num_clients: int, alpha: float, num_classes: int, rng) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for k, part in enumerate(np.split(idx, cuts)):
            shards[k].extend(part.tolist())
    return shards


def class_takes(want: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Whole examples per client (rows) and class: floor(want). Only the sizes' infeasible fallback can ask for more
    of a class than there is; then that class's requests shrink in proportion, so no client is favoured by order."""
    want = np.asarray(want, dtype=float)
    asked = want.sum(axis=0)
    want = want * np.where(asked > counts, counts / np.maximum(asked, 1e-300), 1.0)
    return np.floor(want + 1e-9).astype(np.int64)  # 1e-9: a request of 2.9999999999 is 3 examples


def _hsu(labels: np.ndarray, num_clients: int, alpha: float, num_classes: int, rng) -> list[list[int]]:
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    mix = np.zeros((num_clients, num_classes))
    mix[:, present] = rng.dirichlet(alpha * counts[present] / len(labels), size=num_clients)
    take = class_takes(mix * least_norm_sizes(mix, counts)[:, None], counts)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    rest: list[int] = []
    for c in range(num_classes):
        parts = np.split(rng.permutation(np.flatnonzero(labels == c)), np.cumsum(take[:, c]))
        for k in range(num_clients):
            shards[k].extend(parts[k].tolist())
        rest.extend(parts[num_clients].tolist())
    for i, k in zip(rest, rng.integers(0, num_clients, size=len(rest))):
        shards[k].append(i)
    return shards


def partition(
    labels: np.ndarray,
    num_clients: int,
    iid: bool,
    alpha: float,
    num_classes: int,
    seed: int,
    scheme: str = "hsu",
) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 among clients: an even IID split, or Dirichlet label skew.

    ``scheme`` picks the non-IID split. hsu (the reference's ``Dirichlet_noniid``, Hsu et al. 2019): each client
    draws its class mix q_k ~ Dir(alpha * p), p the class shares of ``labels``; sizes x are the least-norm x >= 0
    with sum_k q_k[c] x_k = n_c (see least_norm_sizes); client k gets floor(q_k[c] x_k) of a seeded shuffle of class
    c, and the leftovers go to uniformly drawn clients. per_class: each class is split over clients by one
    Dir(alpha * 1) vector (the same alpha gives a different skew). Either way every client is guaranteed an example
    by moving single examples from the largest shard. All draws come from one generator seeded with ``seed``.
    """
    n = len(labels)
    if n < num_clients:
        raise ConfigError(
            f"{n} examples cannot give {num_clients} clients one each: raise {opt('k_shot')} or lower "
            f"{opt('num_clients')}"
        )
    rng = np.random.default_rng(seed)
    if iid:
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "hsu":
        shards = _hsu(labels, num_clients, alpha, num_classes, rng)
    elif scheme == "per_class":
        shards = _per_class(labels, num_clients, alpha, num_classes, rng)
    else:
        raise ConfigError(f"unknown {opt('partition')} {scheme!r}: use hsu or per_class")
    _give_empty_clients_one(shards)
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


SITE_PATTERN = re.compile(r"^site-(\d+)$")


def site_index(site_name: str, num_clients: int) -> int:
    """site-1 -> shard 0. Other naming schemes need an explicit index (see the deployment docs)."""
    m = SITE_PATTERN.match(site_name)
    if not m or not 1 <= int(m.group(1)) <= num_clients:
        raise ConfigError(
            f"site '{site_name}' has no shard: simulator sites are named site-1..site-{num_clients}; "
            f"set FEDBPT_SITE_INDEX or give the site its own {opt('data_dir')}"
        )
    return int(m.group(1)) - 1


@dataclass
class SiteData:
    train: Examples
    dev: Examples


def site_data(
    task: TaskSpec,
    data_dir: str | None,
    k_shot: int,
    num_clients: int,
    index: int,
    iid: bool,
    alpha: float,
    seed: int,
    full_train: Examples | None = None,
    scheme: str = "hsu",
    dev_shot: int | None = None,
) -> SiteData:
    """This site's train and dev shards of the k-shot sample. ``scheme`` (hsu / per_class) is the non-IID partition
    of the train split; dev is always split IID, as the reference keeps it."""
    full = full_train if full_train is not None else load_split(task, "train", data_dir)
    train_idx, dev_idx = k_shot_indices(full.labels, k_shot, task.num_classes, seed, dev_shot)
    train, dev = full.subset(train_idx), full.subset(dev_idx)
    train_parts = partition(train.labels, num_clients, iid, alpha, task.num_classes, seed + 1, scheme=scheme)
    dev_parts = partition(dev.labels, num_clients, True, alpha, task.num_classes, seed + 2)
    return SiteData(train.subset(train_parts[index]), dev.subset(dev_parts[index]))
