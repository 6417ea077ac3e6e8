"""Label skew of the non-IID partition schemes (hsu, per_class) at two Dirichlet alphas, against the IID split.

    PYTHONPATH=src python -m bench.partition      # 20 seeds, 10 clients; seconds on one core

Labels are k-shot-like samples: SST-2-like (2 classes x 40 = 80 examples) and AG-News-like (4 classes x 40). Per
partition: TV = mean over clients of the total-variation distance between the client's class mix and the global
mix (0 = IID mix, 1 - 1/C = single-class at balanced classes); max share = mean over clients of the largest class
share; min / max size = the smallest and largest client, each averaged over seeds (the extremes over all seeds in
brackets); no exact QP = seeds whose hsu size QP had no exact solution, so sizes came from the least-squares fit.
Writes the table to bench/results/partition.md.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from fedbpt.core.data.splits import least_norm_sizes, partition
from fedbpt.core.server.summary import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = {"SST-2-like (2 x 40)": 2, "AG-News-like (4 x 40)": 4}


def label_stats(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> tuple[float, float, int, int]:
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    mixes = np.array([np.bincount(labels[p], minlength=num_classes) / len(p) for p in parts])
    tv = 0.5 * np.abs(mixes - glob).sum(axis=1)
    sizes = [len(p) for p in parts]
    return float(tv.mean()), float(mixes.max(axis=1).mean()), min(sizes), max(sizes)


def exact_qp(labels: np.ndarray, num_clients: int, alpha: float, num_classes: int, seed: int) -> bool:
    """Whether hsu's size QP had an exact solution: repeats hsu's first draw (the client mixes) for this seed."""
    counts = np.bincount(labels, minlength=num_classes)
    mix = np.random.default_rng(seed).dirichlet(alpha * counts / len(labels), size=num_clients)
    return bool(np.abs(mix.T @ least_norm_sizes(mix, counts) - counts).max() < 1e-6)


def table(num_clients: int, seeds: int, per_class_examples: int) -> str:
    rows = [
        f"{num_clients} clients, {seeds} seeds (0..{seeds - 1}), {per_class_examples} examples per class\n",
        "| labels | scheme | alpha | TV from global mix | max class share | min size | max size | no exact QP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, num_classes in DATASETS.items():
        labels = np.repeat(np.arange(num_classes), per_class_examples)
        runs = [("IID", True, 1.0, "hsu")] + [(s, False, a, s) for s in ("hsu", "per_class") for a in (1.0, 0.1)]
        for label, iid, alpha, scheme in runs:
            stats = np.array(
                [
                    label_stats(
                        labels, partition(labels, num_clients, iid, alpha, num_classes, s, scheme=scheme), num_classes
                    )
                    for s in range(seeds)
                ]
            )
            tv, share, lo, hi = stats.mean(axis=0)
            if label == "hsu":
                inexact = sum(not exact_qp(labels, num_clients, alpha, num_classes, s) for s in range(seeds))
                qp = f"{inexact}/{seeds}"
            else:
                qp = "-"
            rows.append(
                f"| {name} | {label} | {'-' if iid else alpha} | {tv:.3f} | {share:.3f} | "
                f"{lo:.1f} [{int(stats[:, 2].min())}] | {hi:.1f} [{int(stats[:, 3].max())}] | {qp} |"
            )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_clients", type=int, default=10)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--per_class", type=int, default=40, help="examples per class")
    p.add_argument("--out", default=os.path.join(HERE, "results", "partition.md"))
    args = p.parse_args(argv)
    text = table(args.num_clients, args.seeds, args.per_class)
    print(text, end="")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out, ("# Partition label skew (python -m bench.partition)\n\n" + text).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
