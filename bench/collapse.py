"""Why the faithful FedBPT collapses under label skew, round by round, and what the robust option changes.

    python -m bench.collapse                        # the held-out planted run: 6 clients, Dir(1.0), k 24, 20 rounds
    python -m bench.collapse --seeds 4711 4712 4713 --rounds 30
    python -m bench.collapse --report_only

Runs the planted task (AG News text) in-process with inprocess.run_in_process for the faithful FedBPT
(``--aggregation fedbpt``), the robust option (``fedbpt_robust``) and FedAvg-BBT, and records per round and client
what the server did with each upload (the summary's ``client_stats``: local fitness, recombination weight, distance
moved, the share of the move pycma kept after clipping, final local step) beside the client's label mix. The label
mix is counted here, in the benchmark's process, from the site's own shard: a site never sends it. Writes
bench/results/collapse.md (tables), collapse_runs.json (every round) and figs/collapse.png.

The readings the tables support: with pycma's rank weights, the client whose shard is most skewed reaches the
lowest local fitness and gets the largest weight; the global prompt then predicts one class; the sent step stays
near sigma0 while the clients' own final steps shrink. For the robust option the tables also count the rounds whose
sent mean lost to the best one so far, and name the round it went back to.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.common import save_figure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "..", "shared", "data", "ag_news")
METHODS = {
    "FedBPT (faithful)": {"aggregation": "fedbpt"},
    "FedBPT robust": {"aggregation": "fedbpt_robust"},
    "FedAvg-BBT": {"aggregation": "fedavg", "perturb": False, "cov_mode": "none"},
}


def run_config(args, seed: int, method: str) -> dict:
    from fedbpt.core.config import RunConfig

    cfg: dict = {}
    cfg.update(
        task_name="planted",
        model_name="tiny-random",
        data_dir=args.data_dir,
        num_clients=args.clients,
        iid=False,
        alpha_dir=args.alpha_dir,
        num_rounds=args.rounds,
        k_shot=args.k_shot,
        seed=seed,
        torch_threads=1,
        attn_implementation="eager",
        test_eval="end",
        model_cache_dir=args.cache,
        cov_mode="diag",  # the saved runs' FedBPT message (FedAvg-BBT sends none)
    )
    cfg.update(METHODS[method])
    return RunConfig.build(**cfg)


def skew(counts: list[int]) -> float:
    """Share of the shard's largest class: 1 / classes is balanced, 1.0 is one class."""
    return max(counts) / max(1, sum(counts))


def run_one(args, seed: int, method: str) -> dict:
    import numpy as np
    import torch

    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool
    from fedbpt.flare.preflight import prepare_config

    torch.set_num_threads(1)
    cfg = prepare_config(run_config(args, seed, method))
    pool = RuntimePool(cfg, args.cache)
    t0 = time.time()
    try:
        summary = run_in_process(cfg, pool)
        mix = {s: np.bincount(rt.train.labels, minlength=2).tolist() for s, rt in pool.runtimes.items()}
    finally:
        pool.close()
    rows = [
        {
            k: r.get(k)
            for k in (
                "round",
                "train_acc",
                "train_loss",
                "sigma",
                "sigma_local_median",
                "clipped",
                "client_stats",
                "restored_to",
            )
        }
        for r in summary.rounds
    ]
    return {
        "method": method,
        "seed": seed,
        "label_mix": mix,
        "rounds": rows,
        "final": {k: summary.final.get(k) for k in ("train_acc", "test_acc")},
        "best": {k: summary.best.get(k) for k in ("round", "dev_acc", "test_acc")},
        "seconds": time.time() - t0,
    }


def weight_of_most_skewed(rec: dict) -> list[float]:
    """Per round, the recombination weight of the client whose shard is most skewed (ties: the larger shard)."""
    mix = rec["label_mix"]
    top = max(mix, key=lambda s: (skew(mix[s]), sum(mix[s])))
    return [r["client_stats"][top]["weight"] for r in rec["rounds"] if top in r["client_stats"]]


def skew_weight_correlation(rec: dict) -> float:
    """Spearman correlation, over all (round, client) pairs, between a client's skew and its weight that round."""
    import numpy as np

    xs, ys = [], []
    shares = {s: skew(c) for s, c in rec["label_mix"].items()}
    for r in rec["rounds"]:
        for s, st in r["client_stats"].items():
            xs.append(shares[s])
            ys.append(st["weight"])
    if np.std(ys) == 0 or np.std(xs) == 0:
        return float("nan")
    rx = np.argsort(np.argsort(xs)).astype(float)
    ry = np.argsort(np.argsort(ys)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def report(records: list[dict], args) -> str:
    import numpy as np

    lines = [
        "## Collapse under label skew: the mechanism, measured",
        "",
        f"Planted task (AG News text), {args.clients} clients, Dir({args.alpha_dir}) Hsu partition, k_shot "
        f"{args.k_shot}, {args.rounds} rounds, d = 500; Eq. 7 on for both FedBPTs, diagonal covariance sent. "
        "Command: `python -m bench.collapse` (options in its --help).",
        "",
        "### Per seed",
        "",
        "| seed | method | train acc r0 -> r1 -> r2 -> r3 -> final | max train | sent step at end | median final "
        "local step at end | weight of the most skewed client (mean over rounds) | Spearman(skew, weight) "
        "| clipped per round | rounds sent back to the best mean | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        accs = [r["train_acc"] for r in rec["rounds"]]
        path = " -> ".join(f"{a:.3f}" for a in accs[:4]) + f" -> {rec['final']['train_acc']:.3f}"
        last = rec["rounds"][-1]
        w = weight_of_most_skewed(rec)
        corr = skew_weight_correlation(rec)
        clipped = np.mean([r["clipped"] or 0 for r in rec["rounds"]])
        back = sum(r.get("restored_to") is not None for r in rec["rounds"])  # robust FedBPT's incumbent
        lines.append(
            f"| {rec['seed']} | {rec['method']} | {path} | {max(accs + [rec['final']['train_acc']]):.3f} "
            f"| {last['sigma']:.3f} | {last['sigma_local_median']:.3f} | {np.mean(w):.3f} "
            f"| {'-' if np.isnan(corr) else f'{corr:+.2f}'} | {clipped:.1f} | {back} | {rec['seconds']:.0f} |"
        )
    lines += ["", "### Round by round, first seed (label mix counted in the benchmark; never sent by a site)", ""]
    first = records[0]["seed"]
    for rec in [r for r in records if r["seed"] == first]:
        sites = sorted(rec["label_mix"], key=lambda s: int(s.split("-")[1]))
        lines += [
            f"#### {rec['method']}",
            "",
            "| round | train acc | sent step | median final local step | back to round | "
            + " | ".join(f"{s} {rec['label_mix'][s]}: fitness / weight / moved / kept" for s in sites)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(sites),
        ]
        for r in rec["rounds"][: args.table_rounds]:
            cells = []
            for s in sites:
                st = r["client_stats"].get(s)
                cells.append(
                    "-"
                    if st is None
                    else f"{st['fitness']:.3f} / {st['weight']:.2f} / {st['moved']:.1f} / {st['kept']:.2f}"
                )
            back = "-" if r.get("restored_to") is None else str(r["restored_to"])
            lines.append(
                f"| {r['round']} | {r['train_acc']:.3f} | {r['sigma']:.3f} | {r['sigma_local_median']:.3f} | {back} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = {m: c for m, c in zip(METHODS, ("tab:red", "tab:blue", "tab:gray"))}
    for rec in records:
        c = colors[rec["method"]]
        label = rec["method"] if rec["seed"] == records[0]["seed"] else None
        acc = [r["train_acc"] for r in rec["rounds"]] + [rec["final"]["train_acc"]]
        axes[0].plot(range(len(acc)), acc, color=c, alpha=0.8, label=label)
        axes[1].plot([r["sigma"] for r in rec["rounds"]], color=c, alpha=0.8, label=label)
        if rec["method"] != "FedAvg-BBT":
            axes[1].plot([r["sigma_local_median"] for r in rec["rounds"]], color=c, ls=":", alpha=0.8)
            axes[2].plot(weight_of_most_skewed(rec), color=c, alpha=0.8, label=label)
    axes[0].set(title="global train accuracy", xlabel="round", ylim=(0.4, 1.02))
    axes[1].set(title="sent step (solid) and median final local step (dotted)", xlabel="round", yscale="log")
    axes[2].set(title="weight of the most label-skewed client", xlabel="round", ylim=(0, 1))
    axes[2].axhline(1.0 / records[0].get("clients", 6), color="k", lw=0.5)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[4711, 4712, 4713])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--alpha_dir", type=float, default=1.0)
    p.add_argument("--k_shot", type=int, default=24)
    p.add_argument("--table_rounds", type=int, default=8, help="rounds shown in the round-by-round tables")
    p.add_argument("--data_dir", default=DATA if os.path.isdir(DATA) else None, help="default ../shared/data/ag_news")
    p.add_argument("--cache", default="/tmp/fedbpt-bench-cache", help="where planted bundles are built")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--figs", default=os.path.join(ROOT, "figs"))
    p.add_argument("--report_only", action="store_true", help="redo tables and plot from OUT/collapse_runs.json")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.clients < 2 or args.k_shot < 1 or args.alpha_dir <= 0:
        print("error: --rounds and --k_shot must be >= 1, --clients >= 2, --alpha_dir > 0", file=sys.stderr)
        return 2
    path = os.path.join(args.out, "collapse_runs.json")
    records: list[dict] = []
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        same = {k: saved["args"].get(k) for k in ("rounds", "clients", "alpha_dir", "k_shot")}
        if args.report_only or same == {k: getattr(args, k) for k in same}:
            records = saved["records"]
    elif args.report_only:
        print(f"error: {path} does not exist: run the benchmark first (without --report_only)", file=sys.stderr)
        return 2
    if not args.report_only:
        from fedbpt.core.server.summary import atomic_write

        done = {(r["method"], r["seed"]) for r in records}
        for seed in args.seeds:
            for method in METHODS:
                if (method, seed) in done:
                    continue
                rec = run_one(args, seed, method)
                rec["clients"] = args.clients
                records.append(rec)
                print(
                    f"[seed {seed}] {method}: final train {rec['final']['train_acc']:.3f} ({rec['seconds']:.0f}s)",
                    flush=True,
                )
                os.makedirs(args.out, exist_ok=True)
                data = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "figs")}, "records": records}
                atomic_write(path, json.dumps(data, indent=1).encode())
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(key=lambda r: (r["seed"], order[r["method"]]))
    text = report(records, args)
    with open(os.path.join(args.out, "collapse.md"), "w") as f:
        f.write(text)
    plot(records, os.path.join(args.figs, "collapse.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
