"""Datasets, k-shot sampling and the client partition.

Every site derives its own shard from the shared seed and its site index, so no site ever needs to receive
(or even compute) another site's examples beyond the public k-shot index arithmetic.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np

from fedbpt.tasks import ConfigError, TaskSpec

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
        f"no '{split}' file in --data_dir {data_dir}: expected {split}.jsonl, .json, .csv or .parquet in the hub schema"
    )


def load_split(task: TaskSpec, split: str, data_dir: str | None = None) -> Examples:
    """Load one split from local files (``data_dir``) or the Hugging Face hub."""
    import datasets  # heavy import: only where data is actually loaded

    datasets.disable_progress_bars()
    if data_dir:
        if not os.path.isdir(data_dir):
            raise ConfigError(f"--data_dir {data_dir} is not a directory: point it at a folder with train/test files")
        path = _find_local_file(data_dir, split)
        fmt = LOCAL_FORMATS[os.path.splitext(path)[1]]
        ds = datasets.load_dataset(fmt, data_files={split: path}, split=split)
    else:
        why = hub_unreachable()
        if why:
            raise ConfigError(
                f"cannot load {task.hub_path} ({split}) from the Hugging Face hub: {why}; "
                f"pass --data_dir DIR with local {split}.jsonl/.csv/.parquet files in the hub schema"
            )
        try:
            ds = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
        except Exception as exc:  # offline, DNS failure, missing repo: all mean the same to the user
            raise ConfigError(
                f"cannot load {task.hub_path} ({split}) from the Hugging Face hub ({type(exc).__name__}): "
                f"pass --data_dir DIR with local {split}.jsonl/.csv/.parquet files in the hub schema"
            ) from None
    missing = [c for c in (*task.text_columns, "label") if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{split} data for task {task.name} lacks columns {missing} (has {ds.column_names}): "
            f"use files in the schema of {task.hub_path}"
        )
    labels = np.asarray(ds["label"], dtype=np.int64)
    columns = [ds[c] for c in task.text_columns]
    texts = [tuple(str(v) for v in row) for row in zip(*columns)]
    keep = ~np.isin(labels, task.drop_labels) if task.drop_labels else np.ones(len(labels), dtype=bool)
    bad = labels[keep][(labels[keep] < 0) | (labels[keep] >= task.num_classes)]
    if bad.size:
        raise ConfigError(
            f"{split} data has label {int(bad[0])} outside 0..{task.num_classes - 1} for task {task.name}"
        )
    examples = Examples(texts, labels)
    return examples if keep.all() else examples.subset(np.flatnonzero(keep))


def k_shot_indices(labels: np.ndarray, k_shot: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle; the first k per class form train, the next k per class form dev."""
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < 2 * k_shot:
        c = int(counts.argmin())
        raise ConfigError(
            f"--k_shot {k_shot} needs {2 * k_shot} training examples of class {c} (train + dev), "
            f"the data has {counts[c]}: lower --k_shot to at most {counts.min() // 2}"
        )
    order = np.random.default_rng(seed).permutation(len(labels))
    train, dev = [], []
    for c in range(num_classes):
        of_c = order[labels[order] == c]
        train.append(of_c[:k_shot])
        dev.append(of_c[k_shot : 2 * k_shot])
    # keep the shuffled order rather than grouping by class
    train_idx = order[np.isin(order, np.concatenate(train))]
    dev_idx = order[np.isin(order, np.concatenate(dev))]
    return train_idx, dev_idx


def partition(
    labels: np.ndarray, num_clients: int, iid: bool, alpha: float, num_classes: int, seed: int
) -> list[np.ndarray]:
    """Split positions 0..len(labels)-1 among clients: even IID split or Dirichlet label skew.

    Non-IID draws one Dirichlet(alpha) vector per class; every client is guaranteed at least one example by
    moving single examples from the largest shard (deterministic, no solver).
    """
    n = len(labels)
    if n < num_clients:
        raise ConfigError(
            f"{n} examples cannot give {num_clients} clients one each: raise --k_shot or lower --num_clients"
        )
    rng = np.random.default_rng(seed)
    if iid:
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_clients)]
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for k, part in enumerate(np.split(idx, cuts)):
            shards[k].extend(part.tolist())
    for k in range(num_clients):
        if not shards[k]:
            donor = max(range(num_clients), key=lambda j: (len(shards[j]), -j))
            shards[k].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


SITE_PATTERN = re.compile(r"^site-(\d+)$")


def site_index(site_name: str, num_clients: int) -> int:
    """site-1 -> shard 0. Other naming schemes need an explicit index (see the deployment docs)."""
    m = SITE_PATTERN.match(site_name)
    if not m or not 1 <= int(m.group(1)) <= num_clients:
        raise ConfigError(
            f"site '{site_name}' has no shard: simulator sites are named site-1..site-{num_clients}; "
            f"set FEDBPT_SITE_INDEX or give the site its own --data_dir"
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
) -> SiteData:
    """This site's train and dev shards of the k-shot sample."""
    full = full_train if full_train is not None else load_split(task, "train", data_dir)
    train_idx, dev_idx = k_shot_indices(full.labels, k_shot, task.num_classes, seed)
    train, dev = full.subset(train_idx), full.subset(dev_idx)
    train_parts = partition(train.labels, num_clients, iid, alpha, task.num_classes, seed + 1)
    dev_parts = partition(dev.labels, num_clients, iid, alpha, task.num_classes, seed + 2)
    return SiteData(train.subset(train_parts[index]), dev.subset(dev_parts[index]))
