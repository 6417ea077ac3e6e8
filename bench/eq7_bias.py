"""Eq. 7 against a pure label-bias shift, on SmolLM2-135M and SST-2: what each local objective rewards.

    python -m bench.eq7_bias                       # the bench.smollm2 long setting (4 clients x 8 sentences), seed 1
    python -m bench.eq7_bias --seeds 1 2 3 --draws 8

SmolLM2's template without a prompt ranks SST-2 sentiment (AUC 0.81) but calls 85% of the sentences great, so a
prompt that only lowers the " great" logit gains most of what the calibrated threshold gains. This scores each
client's k-shot train shard once at z = 0 (where every search starts), clean and perturbed (r_p = 0.5, the
copies the job draws in its first rounds), adds a bias b to the " great" logit and evaluates, as functions of b,
the clean loss (FedBPT without Eq. 7, FedAvg-BBT) and Eq. 7 in both forms (the job's objective), each client's
objective averaged over clients. It prints and saves each objective's best b, the k-shot train and the test
(872 sentences) accuracy there, and how far each objective moves between b = 0 and the clean loss's best b.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

from bench.common import save_figure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OBJECTIVES = ("clean loss", "Eq. 7 mean_ratio", "Eq. 7 per_example")


def objective_curves(clean: list, perturbed: list, biases) -> dict:
    """Each objective as a function of the bias on label 1, averaged over clients.

    ``clean[k]`` is client k's (logits (N, 2), labels (N,)); ``perturbed[k]`` a list of its perturbed copies'
    logits (N, 2) (same labels). Eq. 7 is averaged over the copies, as the rounds redraw them.
    """
    import numpy as np

    from fedbpt.core.algorithm.search import eq7_fitness
    from fedbpt.core.models.scorer import example_losses

    b = np.asarray(biases, dtype=np.float64)
    shift = np.stack([np.zeros_like(b), b], -1)[:, None, :]  # (B, 1, 2)
    out = {name: np.zeros(len(b)) for name in OBJECTIVES}
    for (logits, labels), copies in zip(clean, perturbed):
        lc = example_losses(logits[None] + shift, labels, "ce")  # (B, N)
        out["clean loss"] += lc.mean(-1) / len(clean)
        lps = [example_losses(p[None] + shift, labels, "ce") for p in copies]
        for form in ("mean_ratio", "per_example"):
            out[f"Eq. 7 {form}"] += np.mean([eq7_fitness(lc, lp, form) for lp in lps], 0) / len(clean)
    return out


def accuracy_at(logits, labels, b: float) -> float:
    import numpy as np

    return float(np.mean((logits[:, 1] + b > logits[:, 0]) == (labels == 1)))


def measure(seed: int, args, test_cache: dict) -> dict:
    """``test_cache``: the test logits at z = 0, the same for every seed (z = 0 adds zero rows whatever A is)."""
    import numpy as np

    from bench.smollm2 import run_config
    from fedbpt.core.algorithm.search import perturb
    from fedbpt.core.site.runtime import RuntimePool

    bench_args = SimpleNamespace(
        data_dir=args.data_dir, clients=args.clients, rounds=1, k_shot=args.k_shot, n_prompt_tokens=5
    )
    cfg = run_config(bench_args, seed, "IID", "FedBPT")
    d = cfg.intrinsic_dim
    z0 = np.zeros(d)
    pool = RuntimePool(cfg, args.cache)
    try:
        clean, perturbed = [], []
        for i in range(1, cfg.num_clients + 1):
            site = pool(f"site-{i}")
            clean.append((site.scorer.label_logits(z0, site.train)[0], site.train.labels))
            copies = []
            for r in range(args.draws):  # the job's own draws: rng([seed, client index, round, 1])
                rng = np.random.default_rng([cfg.seed, site.index, r, 1])
                enc = perturb(site.train, cfg.perturb_rate, site.scorer.ordinary_ids, rng)
                copies.append(site.scorer.label_logits(z0, enc)[0])
            perturbed.append(copies)
        if not test_cache:
            site1 = pool("site-1")
            test_cache.update(logits=site1.scorer.label_logits(z0, site1.test)[0], labels=site1.test.labels)
    finally:
        pool.close()
    biases = np.round(np.arange(args.bias_min, args.bias_max + 1e-9, args.bias_step), 6)
    curves = objective_curves(clean, perturbed, biases)
    train_logits = np.concatenate([lg for lg, _ in clean])
    train_labels = np.concatenate([y for _, y in clean])
    test_logits, test_labels = test_cache["logits"], test_cache["labels"]
    i0 = int(np.argmin(np.abs(biases)))
    ic = int(np.argmin(curves["clean loss"]))
    rows = {}
    for name, f in curves.items():
        i = int(np.argmin(f))
        rows[name] = {
            "best_bias": float(biases[i]),
            "train_acc": accuracy_at(train_logits, train_labels, biases[i]),
            "test_acc": accuracy_at(test_logits, test_labels, biases[i]),
            "at_0": float(f[i0]),
            "at_best": float(f[i]),
            "at_clean_best": float(f[ic]),
            "relative_drop_0_to_clean_best": float((f[i0] - f[ic]) / f[i0]),
        }
    return {
        "seed": seed,
        "draws": args.draws,
        "train_n": int(len(train_labels)),
        "test_n": int(len(test_labels)),
        "test_acc_z0": accuracy_at(test_logits, test_labels, 0.0),
        "biases": biases.tolist(),
        "curves": {k: v.tolist() for k, v in curves.items()},
        "objectives": rows,
    }


def table(results: list[dict], meta: dict) -> str:
    lines = [
        "## Eq. 7 against a label-bias shift (SmolLM2-135M, SST-2, z = 0)",
        "",
        f"`python -m bench.eq7_bias {meta['argv']}`; {meta['clients']} clients x "
        f"{results[0]['train_n'] // meta['clients']} train sentences (k_shot {meta['k_shot']}, the bench.smollm2 long "
        f"setting), {results[0]['draws']} perturbed "
        f'copies per client (r_p = 0.5); bias b added to the " great" logit; test = {results[0]["test_n"]} SST-2 '
        f"validation sentences. {meta['machine']}; {meta['seconds']:.0f} s.",
        "",
        "| seed | objective | best b | k-shot train acc at best b | test acc at best b | value at b = 0 "
        "| value at the clean loss's best b | change, b = 0 to the clean loss's best b |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, o in r["objectives"].items():
            lines.append(
                f"| {r['seed']} | {name} | {o['best_bias']:+.2f} | {100 * o['train_acc']:.1f} "
                f"| {100 * o['test_acc']:.1f} | {o['at_0']:.4f} | {o['at_clean_best']:.4f} "
                f"| {-100 * o['relative_drop_0_to_clean_best']:+.1f}% |"
            )
    lines.append("")
    lines.append(f"Test accuracy at b = 0 (the z = 0 prompt): {100 * results[0]['test_acc_z0']:.1f}.")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, style in zip(OBJECTIVES, ("-", "--", ":")):
        for r, color in zip(results, ("C0", "C1", "C2", "C3", "C4")):
            f = np.asarray(r["curves"][name])
            ax.plot(
                r["biases"],
                f / f[int(np.argmin(np.abs(r["biases"])))],
                ls=style,
                color=color,
                lw=1.4,
                label=f"{name}, seed {r['seed']}",
            )
    ax.axvline(0, color="k", lw=0.8)
    ax.set_ylim(0.75, 1.25)  # the clean loss leaves this band far from b = 0; the Eq. 7 curves stay inside it
    ax.set_xlabel('bias b on the " great" logit (z = 0 prompt)')
    ax.set_ylabel("objective / its value at b = 0 (lower is better)")
    ax.set_title("SmolLM2-135M, SST-2: what each local objective rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--k_shot", type=int, default=16)
    p.add_argument("--draws", type=int, default=4, help="perturbed copies per client (the first rounds' draws)")
    p.add_argument("--bias_min", type=float, default=-8.0)
    p.add_argument("--bias_max", type=float, default=4.0)
    p.add_argument("--bias_step", type=float, default=0.05)
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data", "sst2"))
    p.add_argument("--cache", default="/tmp/fedbpt-bench-cache")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--figs", default=os.path.join(ROOT, "figs"))
    p.add_argument("--report_only", action="store_true", help="table and plot again from the saved JSON")
    args = p.parse_args(argv)
    if args.report_only:
        path = os.path.join(args.out, "eq7_bias.json")
        if not os.path.isfile(path):
            print(f"error: {path} does not exist: run the benchmark first (without --report_only)", file=sys.stderr)
            return 2
        with open(path) as f:
            saved = json.load(f)
        return write(saved["results"], saved["meta"], args)
    if not os.path.isdir(args.data_dir):
        print(f"error: --data_dir {args.data_dir} is not a folder: point it at SST-2 jsonl files", file=sys.stderr)
        return 2
    if min(args.clients, args.k_shot, args.draws, *args.seeds) < 1 or not args.bias_min < 0 < args.bias_max:
        print(
            "error: --clients, --k_shot, --draws, --seeds must be >= 1 and --bias_min < 0 < --bias_max", file=sys.stderr
        )
        return 2
    if args.bias_step <= 0:
        print("error: --bias_step must be > 0", file=sys.stderr)
        return 2
    args.data_dir = os.path.abspath(args.data_dir)
    from bench.smollm2 import machine

    t0 = time.time()
    test_cache: dict = {}
    results = [measure(s, args, test_cache) for s in args.seeds]
    meta = {
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "clients": args.clients,
        "k_shot": args.k_shot,
        "machine": machine().replace(" per worker", ""),  # the sites' torch_threads: 1
        "seconds": time.time() - t0,
    }
    return write(results, meta, args)


def write(results: list[dict], meta: dict, args) -> int:
    from fedbpt.core.server.summary import atomic_write

    text = table(results, meta)
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "eq7_bias.json"), json.dumps({"meta": meta, "results": results}).encode())
    atomic_write(os.path.join(args.out, "eq7_bias.md"), text.encode())
    plot(results, os.path.join(args.figs, "eq7_bias.png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
