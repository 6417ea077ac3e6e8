"""FedBPT on a real pretrained model: SmolLM2-135M-Instruct (causal LM) on SST-2, in-process, on the CPU.

    python -m bench.smollm2            # FedBPT, robust FedBPT and FedAvg-BBT x IID and Dir(1.0) x seeds 1-3, plus
                                       # central BBT and FedBPT without Eq. 7 on IID seed 1
    python -m bench.smollm2 --quick    # seed 1, IID: the three federated methods, 3 rounds
    python -m bench.smollm2 --report_only
    python -m bench.smollm2 --splits IID --k_shot 16 --rounds 8 --name smollm2_long   # more shots and rounds, IID

Defaults: 4 clients, 6 rounds, k_shot 10 per class (20 train and 20 dev sentences in all), n = 5, d = 500.

Every run goes through inprocess.run_in_process with site.runtime.RuntimePool (the code the NVFlare job runs). The
test set is the 872 SST-2 validation sentences, scored once per run for the final and the best-dev prompt
(--test_eval end). References on the same 872: the template with no prompt at all, z = 0 (n zero prompt rows),
and the no-prompt logit difference cut at the threshold that is best on the seed's k-shot train + dev pool (what
a prompt that only shifts the label bias could reach). Runs are saved as they finish
(bench/results/smollm2_runs.json) and a rerun resumes the matrix, also with more seeds, splits or the extras;
--fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

from bench.common import save_figure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SPLITS = {"IID": {"iid": True}, "Dir(1.0)": {"iid": False, "alpha_dir": 1.0, "partition": "hsu"}}
METHODS = {
    "FedBPT": {"aggregation": "fedbpt", "perturb": True},
    "FedAvg-BBT": {"aggregation": "fedavg", "perturb": False, "cov_mode": "none"},
    "FedBPT, no Eq. 7": {"aggregation": "fedbpt", "perturb": False},
    "FedBPT robust": {"aggregation": "fedbpt_robust", "perturb": True},
    # the demo preset's server and objective (configs/smollm2_sst2.yaml)
    "FedBPT robust, no Eq. 7": {"aggregation": "fedbpt_robust", "perturb": False},
    # one site holding every client's examples (k_shot per class), the same local search: BBT, same iterations
    "central BBT": {"aggregation": "fedavg", "perturb": False, "cov_mode": "none", "num_clients": 1, "iid": True},
}
MAIN = ("FedBPT", "FedBPT robust", "FedAvg-BBT")  # every split x seed
RUN_SETTINGS = ("rounds", "clients", "k_shot", "n_prompt_tokens", "placement")  # what a saved run was run with
# the settings of the saved matrices, whatever configs/smollm2_sst2.yaml (the demo preset) chooses
PINNED = {
    "prompt_placement": "front",
    "intrinsic_dim": 500,
    "local_iter": 8,
    "local_popsize": 5,
    "sigma": 1.0,
    "dev_shot": None,  # k_shot per class, as the reference (the preset's wider dev came later)
    "cov_mode": "diag",  # FedBPT's runs sent the diagonal (the methods that send none say so)
}
PLACED = {"front": "in front of the sentence", "after_input": "after the sentence, before the cue"}
MATRIX_SHAPE = ("seeds", "splits", "extras", "extra_seeds")  # which runs the matrix holds: a resumed one may grow
EXTRA = ("central BBT", "FedBPT, no Eq. 7")  # IID, seeds 1..--extra_seeds
PAIRED = (  # differences reported per (seed, split)
    ("FedBPT", "FedAvg-BBT"),
    ("FedBPT, no Eq. 7", "FedBPT"),
    ("FedBPT robust", "FedBPT"),
    ("FedBPT robust", "FedAvg-BBT"),
    ("FedBPT robust, no Eq. 7", "FedAvg-BBT"),
    ("FedBPT robust, no Eq. 7", "FedBPT, no Eq. 7"),
)


def run_config(args, seed: int, split: str, method: str) -> dict:
    from fedbpt.core.config import RunConfig, load_preset

    cfg: dict = {}
    cfg.update(load_preset(os.path.join(ROOT, "configs", "smollm2_sst2.yaml")))
    cfg.update(
        data_dir=args.data_dir,
        num_clients=args.clients,
        num_rounds=args.rounds,
        k_shot=args.k_shot,
        n_prompt_tokens=args.n_prompt_tokens,
        seed=seed,
        **dict(PINNED, prompt_placement=args.placement),
        server_sigma="paper",
        perturb_rate=0.5,
        test_eval="end",
        torch_threads=1,
        eval_clients="site-1",
        **SPLITS[split],
    )
    cfg.update(METHODS[method])
    return RunConfig.build(**cfg)


def jobs_for(args) -> list[tuple[int, str, str]]:
    """The matrix's runs; with --methods, those methods on every split and seed (and no others)."""
    if args.methods:
        return [(s, sp, m) for s in range(1, args.seeds + 1) for sp in args.splits for m in args.methods]
    jobs = [(s, sp, m) for s in range(1, args.seeds + 1) for sp in args.splits for m in MAIN]
    if args.extras:
        jobs += [(s, "IID", m) for s in range(1, args.extra_seeds + 1) for m in EXTRA]
    return jobs


def best_threshold(diff, labels) -> float:
    """The cut on the label-1 minus label-0 logit difference with the best accuracy on (diff, labels)."""
    import numpy as np

    order = np.argsort(diff, kind="stable")
    d, y = np.asarray(diff)[order], np.asarray(labels)[order]
    # predict 1 above cut i (between d[i-1] and d[i]): zeros below + ones above
    right = np.concatenate([[0], np.cumsum(y == 0)]) + (y == 1).sum() - np.concatenate([[0], np.cumsum(y == 1)])
    i = int(np.argmax(right))
    cuts = np.concatenate([[d[0] - 1.0], (d[:-1] + d[1:]) / 2, [d[-1] + 1.0]])
    return float(cuts[i])


def references(args, seeds: list[int]) -> dict:
    """No prompt and z = 0 on the test set (neither depends on the seed), and per seed the no-prompt logit
    difference cut at the threshold that is best on that seed's k-shot train + dev pool."""
    import numpy as np

    from fedbpt.core.algorithm.search import concat
    from fedbpt.core.models.resolve import resolve_model
    from fedbpt.core.site.runtime import RuntimePool, build_scorer

    out, test_logits = {}, None
    for seed in seeds:
        cfg = run_config(args, seed, "IID", "FedBPT")
        pool = RuntimePool(cfg, args.cache)
        try:
            sites = [pool(f"site-{i}") for i in range(1, cfg.num_clients + 1)]
            test, d = sites[0].test, cfg.intrinsic_dim
            kshot = sites[0].train
            for enc in [s.train for s in sites[1:]] + [s.dev for s in sites]:
                kshot = concat(kshot, enc)
            # n = 0: the start token and the template alone (the encodings carry no prompt rows, so they fit it)
            bare = build_scorer(cfg.replace(n_prompt_tokens=0), resolve_model(cfg.model_name), sites[0].task, "cpu")
            if test_logits is None:
                zero = sites[0].scorer.label_logits(np.zeros(d), test)[0]
                test_logits = bare.label_logits(np.zeros(d), test)[0], zero, test.labels
            raw_pool = bare.label_logits(np.zeros(d), kshot)[0]
            bare.close()
        finally:
            pool.close()
        raw_test, zero, y = test_logits
        cut = best_threshold(raw_pool[:, 1] - raw_pool[:, 0], kshot.labels)
        out[str(seed)] = {
            "no_prompt": float(np.mean(raw_test.argmax(-1) == y)),
            "zero_prompt": float(np.mean(zero.argmax(-1) == y)),
            "calibrated_no_prompt": float(np.mean(((raw_test[:, 1] - raw_test[:, 0]) > cut) == (y == 1))),
            "threshold": cut,
            "pool_n": int(len(kshot)),
            "test_n": int(len(y)),
            "no_prompt_predicted_positive": float(np.mean(raw_test.argmax(-1) == 1)),
        }
    return out


def run_one(job: tuple, args) -> dict:
    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool

    seed, split, method = job
    cfg = run_config(args, seed, split, method)
    t0 = time.time()
    pool = RuntimePool(cfg, args.cache)
    try:
        summary = run_in_process(cfg, pool)
    finally:
        pool.close()
    seconds = time.time() - t0
    keys = ("round", "train_acc", "train_loss", "dev_acc", "sigma", "restored_to")
    rows = [{k: r.get(k) for k in keys} for r in summary.rounds]
    rec = {
        "seed": seed,
        "split": split,
        "method": method,
        "rounds": rows,
        "final": {k: summary.final.get(k) for k in ("train_acc", "dev_acc", "test_acc")},
        "best": {k: summary.best.get(k) for k in ("round", "dev_acc", "test_acc")},
        "seconds": seconds,
    }
    print(
        f"[{split} seed {seed}] {method}: best-dev round {rec['best']['round']}, test @ best dev "
        f"{rec['best']['test_acc']:.4f}, final test {rec['final']['test_acc']:.4f} ({seconds:.0f}s)",
        flush=True,
    )
    return rec


def _load(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save(path: str, data: dict) -> None:
    from fedbpt.core.server.summary import atomic_write

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1).encode())


def _ms(values: list[float], pct: bool = True) -> str:
    import numpy as np

    v = np.array([x for x in values if x is not None], dtype=float) * (100.0 if pct else 1.0)
    if not len(v):
        return "-"
    return f"{v[0]:.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def tables(data: dict) -> str:
    import numpy as np

    refs = {int(k): v for k, v in data["references"].items()}
    recs = data["records"]
    a = data["args"]
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32), SST-2, {a['clients']} clients, {a['rounds']} rounds, "
        f"k_shot {a['k_shot']} per class (train and again dev), n = {a['n_prompt_tokens']} prompt tokens, d = 500, "
        f"I = 8, lambda = 5; the prompt {PLACED[a.get('placement', 'front')]}; test = the "
        f"{next(iter(refs.values()))['test_n']} SST-2 validation sentences. Accuracy %, "
        "mean ± std over seeds. Margins are against no prompt on the same seed.",
        f"Machine: {data['machine']}; load average {data['load_start']} at the start, {data.get('load_end')} at the "
        f"end; wall {data.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        "| seed | no prompt | z = 0 | calibrated no prompt (threshold on the k-shot pool) "
        "| no prompt predicts positive |",
        "|---|---|---|---|---|",
    ]
    for s in sorted(refs):
        r = refs[s]
        lines.append(
            f"| {s} | {100 * r['no_prompt']:.1f} | {100 * r['zero_prompt']:.1f} "
            f"| {100 * r['calibrated_no_prompt']:.1f} | {100 * r['no_prompt_predicted_positive']:.0f}% |"
        )
    lines += [
        "",
        "| split | method | seeds | test @ best dev | margin over no prompt (per seed) | best-dev round | final test "
        "| final train | seconds per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split in SPLITS:
        for m in METHODS:
            rs = sorted((r for r in recs if r["split"] == split and r["method"] == m), key=lambda r: r["seed"])
            if not rs:
                continue
            margins = [100 * (r["best"]["test_acc"] - refs[r["seed"]]["no_prompt"]) for r in rs]
            lines.append(
                f"| {split} | {m} | {len(rs)} | {_ms([r['best']['test_acc'] for r in rs])} "
                f"| {np.mean(margins):+.1f} ({', '.join(f'{x:+.1f}' for x in margins)}) "
                f"| {_ms([r['best']['round'] for r in rs], pct=False)} | {_ms([r['final']['test_acc'] for r in rs])} "
                f"| {_ms([r['final']['train_acc'] for r in rs])} | {np.mean([r['seconds'] for r in rs]):.0f} |"
            )
    for a_m, b_m in PAIRED:
        pairs = []
        for r in recs:
            if r["method"] != a_m:
                continue
            other = [o for o in recs if o["method"] == b_m and o["seed"] == r["seed"] and o["split"] == r["split"]]
            if other:
                pairs.append(100 * (r["best"]["test_acc"] - other[0]["best"]["test_acc"]))
        if pairs:
            lines += [
                "",
                f"{a_m} minus {b_m}, test @ best dev, paired over {len(pairs)} (seed, split): {np.mean(pairs):+.1f} "
                f"points [{min(pairs):+.1f}, {max(pairs):+.1f}].",
            ]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    refs = {int(k): v for k, v in data["references"].items()}
    fig, axes = plt.subplots(3, len(SPLITS), figsize=(5.5 * len(SPLITS), 10.5), sharex=True, squeeze=False)
    for col, split in enumerate(SPLITS):
        ax, ax_loss, ax_sigma = axes[0][col], axes[1][col], axes[2][col]
        for m in METHODS:
            rs = [r for r in data["records"] if r["split"] == split and r["method"] == m]
            if not rs:
                continue
            acc = np.array([[x["dev_acc"] for x in r["rounds"]] + [r["final"]["dev_acc"]] for r in rs], dtype=float)
            x = np.arange(acc.shape[1])
            (line,) = ax.plot(x, 100 * acc.mean(0), label=f"{m}: global dev", lw=1.6)
            ax.fill_between(x, 100 * acc.min(0), 100 * acc.max(0), alpha=0.12, color=line.get_color())
            best = [(r["best"]["round"], 100 * r["best"]["test_acc"]) for r in rs if r["best"]["test_acc"] is not None]
            if best:
                bx, by = zip(*best)
                ax.scatter(bx, by, marker="x", color=line.get_color(), label=f"{m}: test of the best-dev prompt")
            loss = np.array([[x["train_loss"] for x in r["rounds"]] for r in rs], dtype=float)
            ax_loss.plot(np.arange(loss.shape[1]), loss.mean(0), color=line.get_color(), lw=1.6, label=m)
            ax_loss.fill_between(np.arange(loss.shape[1]), loss.min(0), loss.max(0), alpha=0.12, color=line.get_color())
            sigma = np.array([[x["sigma"] for x in r["rounds"]] for r in rs], dtype=float)
            ax_sigma.plot(np.arange(sigma.shape[1]), sigma.mean(0), color=line.get_color(), lw=1.6, label=m)
        for key, style, name in (
            ("no_prompt", "--", "no prompt"),
            ("calibrated_no_prompt", ":", "calibrated no prompt"),
        ):
            if refs:
                mean = 100 * np.mean([r[key] for r in refs.values()])
                ax.axhline(mean, color="k" if key == "no_prompt" else "grey", ls=style, lw=1, label=f"{name} (test)")
        ax.set_title(f"SmolLM2-135M, SST-2, {split}")
        ax.grid(alpha=0.3)
        ax_loss.grid(alpha=0.3)
        ax_sigma.set(xlabel="round", yscale="log")
        ax_sigma.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy % (mean over seeds; band: min-max)")
    axes[1][0].set_ylabel("global train loss (ce; mean, band: min-max)")
    axes[2][0].set_ylabel("step sent to the clients (mean over seeds)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    axes[1][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def report(data: dict, args) -> int:
    from fedbpt.core.server.summary import atomic_write

    text = "## FedBPT on SmolLM2-135M (SST-2)\n\n" + tables(data)
    atomic_write(os.path.join(args.out, f"{args.name}.md"), text.encode())
    plot(data, os.path.join(args.figs, f"{args.name}.png"))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default 3; --quick: 1)")
    p.add_argument("--splits", nargs="+", choices=list(SPLITS), default=None, help="default both; --quick: IID")
    p.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"{', '.join(EXTRA)} on IID (default on; --quick: off)",
    )
    p.add_argument("--extra_seeds", type=int, default=1, help="the extras on seeds 1..N (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default 6; --quick: 3)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--k_shot", type=int, default=10, help="examples per class in train (and again in dev)")
    p.add_argument("--n_prompt_tokens", type=int, default=5)
    p.add_argument("--placement", choices=("front", "after_input"), default="front", help="where the prompt goes")
    p.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=None, help="only these methods, on every split and seed"
    )
    p.add_argument("--quick", action="store_true", help="seed 1, IID, the three federated methods, 3 rounds")
    p.add_argument("--workers", type=int, default=2, help="processes, one torch thread each")
    p.add_argument("--fresh", action="store_true", help="ignore saved runs and start the matrix over")
    default_data = os.path.join(ROOT, "..", "shared", "data", "sst2")
    p.add_argument("--data_dir", default=default_data)
    p.add_argument("--cache", default="/tmp/fedbpt-bench-cache")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--figs", default=os.path.join(ROOT, "figs"))
    p.add_argument("--name", default=None, help="results stem under --out and --figs (default smollm2[_quick])")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    for key, full, quick in (("name", "smollm2", "smollm2_quick"), ("rounds", 6, 3), ("seeds", 3, 1)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.splits is None:
        args.splits = ["IID"] if args.quick else list(SPLITS)
    args.splits = [s for s in SPLITS if s in args.splits]
    if args.extras is None:
        args.extras = not args.quick
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        print(f"error: --name {args.name!r} must be a plain file stem (letters, digits, _ . -)", file=sys.stderr)
        return 2
    path = os.path.join(args.out, f"{args.name}_runs.json")
    if args.report_only:
        data = _load(path)
        if data is None:
            print(f"error: {path} does not exist: run the benchmark first (without --report_only)", file=sys.stderr)
            return 2
        return report(data, args)
    if not os.path.isdir(args.data_dir):
        print(f"error: --data_dir {args.data_dir} is not a folder: point it at SST-2 jsonl files", file=sys.stderr)
        return 2
    if (
        min(args.seeds, args.extra_seeds, args.rounds, args.clients, args.k_shot, args.n_prompt_tokens, args.workers)
        < 1
    ):
        print(
            "error: --seeds, --extra_seeds, --rounds, --clients, --k_shot, --n_prompt_tokens, --workers must be >= 1",
            file=sys.stderr,
        )
        return 2
    args.data_dir = os.path.abspath(args.data_dir)
    from fedbpt.core.models.resolve import resolve_model

    resolve_model("smollm2-135m")  # converted once here, not in every worker
    settings = {k: getattr(args, k) for k in RUN_SETTINGS + MATRIX_SHAPE}
    data = None if args.fresh else _load(path)
    if data is not None and any(data["args"].get(k, "front") != settings[k] for k in RUN_SETTINGS):
        print(
            f"error: {path} holds runs with other settings {data['args']}: pass --fresh to start over", file=sys.stderr
        )
        return 2
    if data is None:
        data = {"args": settings, "machine": machine(), "load_start": load(), "references": {}, "records": []}
    data["args"] = settings  # more seeds, splits or the extras: the saved runs stay and the rest are added
    t0 = time.time() - data.get("wall_seconds", 0.0)
    jobs = jobs_for(args)
    seeds = sorted({s for s, _, _ in jobs})
    todo_refs = [s for s in seeds if str(s) not in data["references"]]
    done = {(r["seed"], r["split"], r["method"]) for r in data["records"]}
    todo = [j for j in jobs if j not in done]
    print(f"{len(done)} runs saved, {len(todo)} to go; references for seeds {todo_refs}", flush=True)
    tasks = ([("ref", todo_refs)] if todo_refs else []) + [("run", j) for j in todo]

    def record(kind, key, out) -> None:
        if kind == "ref":
            data["references"].update(out)
        else:
            data["records"].append(out)
        data["wall_seconds"] = time.time() - t0
        data["load_end"] = load()
        save(path, data)

    if args.workers == 1:
        for kind, key in tasks:
            record(kind, key, _task((kind, key, args)))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for kind, key, out in pool.imap_unordered(_task_keyed, [(k, key, args) for k, key in tasks]):
                record(kind, key, out)
    return report(data, args)


def _task(t: tuple):
    kind, key, args = t
    import torch

    torch.set_num_threads(1)
    return references(args, key) if kind == "ref" else run_one(key, args)


def _task_keyed(t: tuple):
    return t[0], t[1], _task(t)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread per worker"


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
