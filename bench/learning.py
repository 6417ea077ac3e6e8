"""Learning yardstick: FedBPT's step-size rules, its ablations and FedAvg-BBT on the synthetic `planted` task.

    python -m bench.learning                      # the matrix (3 seeds x 5 splits, 30 rounds, 10 clients) and
                                                  # one 100-round run per split and rule
    python -m bench.learning --seeds 1 --rounds 8 --long_rounds 0  # a quick look
    python -m bench.learning --perturb_rates 0.25,0.5,0.75  # FedBPT with the shipped defaults at these rates
    python -m bench.learning --cov_modes none,diag,full --splits "Dir(1.0) hsu"  # faithful and robust per mode

Every run goes through inprocess.run_in_process with site.runtime.RuntimePool (the same Federation and SiteRuntime
code the NVFlare job runs, without the simulator's process overhead). Writes bench/results/NAME.md (tables),
bench/results/NAME_runs.json (every round of every run) and figs/NAME_train_acc.png; NAME is learning,
learning_perturb for a perturbation-rate sweep, or learning_cov for a covariance-mode sweep.

The planted task is a synthetic optimisation check (src/fedbpt/planted.py): numbers here say whether the search
and the aggregation fit all clients' data, not how well anything understands language.
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

SPLITS = {
    "IID": {"iid": True},
    "Dir(1.0) hsu": {"iid": False, "alpha_dir": 1.0, "partition": "hsu"},
    "Dir(1.0) per-class": {"iid": False, "alpha_dir": 1.0, "partition": "per_class"},
    "Dir(0.1) hsu": {"iid": False, "alpha_dir": 0.1, "partition": "hsu"},
    "Dir(0.1) per-class": {"iid": False, "alpha_dir": 0.1, "partition": "per_class"},
}
# The FedBPT base of every variant: the paper's perturbation (rate 0.5), diagonal covariance on the wire, local CSA.
BASE = {
    "aggregation": "fedbpt",
    "server_sigma": "paper",
    "local_adaptation": "csa",
    "perturb": True,
    "perturb_rate": 0.5,
    "cov_mode": "diag",
}
METHODS = {
    "FedBPT, paper rule (Eq. 6)": {},
    "FedBPT, reference rule": {"server_sigma": "reference"},
    "FedBPT, eq6_sent (ablation)": {"server_sigma": "eq6_sent"},
    "FedBPT, paper rule, local TPA": {"local_adaptation": "tpa"},
    "FedAvg-BBT": {"aggregation": "fedavg", "perturb": False, "cov_mode": "none"},
    "FedBPT robust": {"aggregation": "fedbpt_robust"},
    "FedBPT robust, no Eq. 7": {"aggregation": "fedbpt_robust", "perturb": False},
}
# The partition question needs only the two rules on the per-class splits.
PER_CLASS_METHODS = ("FedBPT, paper rule (Eq. 6)", "FedBPT, reference rule")
LONG_METHODS = ("FedBPT, paper rule (Eq. 6)", "FedBPT, reference rule", "FedBPT robust")
QUICK = ("FedAvg-BBT", "FedBPT, paper rule (Eq. 6)", "FedBPT, reference rule", "FedBPT robust")
PAIRS = (
    ("FedBPT, paper rule (Eq. 6)", "FedBPT, reference rule"),
    ("FedBPT, paper rule (Eq. 6)", "FedBPT, eq6_sent (ablation)"),
    ("FedBPT, paper rule (Eq. 6)", "FedBPT, paper rule, local TPA"),
    ("FedBPT, paper rule (Eq. 6)", "FedAvg-BBT"),
    ("FedBPT, reference rule", "FedAvg-BBT"),
    ("FedBPT robust", "FedBPT, paper rule (Eq. 6)"),
    ("FedBPT robust", "FedAvg-BBT"),
    ("FedBPT robust, no Eq. 7", "FedAvg-BBT"),
)
# The perturbation sweep varies the rate of FedBPT as job.py ships it.
SHIPPED: dict = {}
# Options that decide a site's data and model: runs that agree on them can share a RuntimePool.
DATA_KEYS = (
    "task_name",
    "data_dir",
    "seed",
    "num_clients",
    "k_shot",
    "iid",
    "alpha_dir",
    "partition",
    "n_prompt_tokens",
)


def base_config(args, seed: int, split: str) -> dict:
    from fedbpt.core.config import RunConfig

    cfg: dict = {}
    cfg.update(
        task_name="planted",
        model_name="tiny-random",
        data_dir=args.data_dir,
        num_clients=args.clients,
        num_rounds=args.rounds,
        k_shot=args.k_shot,
        n_prompt_tokens=args.n_prompt_tokens,
        intrinsic_dim=500,
        seed=seed,
        torch_threads=1,
        attn_implementation="eager",  # faster than sdpa on small passes of this 32-wide model (README)
        test_eval="end",  # the test set is scored once, for the final and the best-dev prompt (README)
        model_cache_dir=args.cache,
        **SPLITS[split],
        **BASE,
    )
    return RunConfig.build(**cfg)


_POOL: dict = {}  # per worker process: the (seed, split) whose sites are set up, and their RuntimePool


def site_pool(args, seed: int, split: str):
    """The sites of one (seed, split), set up once per worker: data, encodings and model are shared by its methods."""
    import torch

    from fedbpt.core.site.runtime import RuntimePool
    from fedbpt.flare.preflight import prepare_config

    if _POOL.get("key") != (seed, split):
        if "pool" in _POOL:
            _POOL["pool"].close()
        torch.set_num_threads(1)
        _POOL.update(key=(seed, split), pool=RuntimePool(prepare_config(base_config(args, seed, split)), args.cache))
    return _POOL["pool"]


def run_one(job: tuple) -> dict:
    """One method on one (seed, split), in a worker that keeps the sites of its last (seed, split)."""
    from fedbpt.core.server.inprocess import run_in_process

    args, seed, split, name, options, rounds = job
    pool = site_pool(args, seed, split)
    cfg = dict(pool.cfg, num_rounds=rounds, **options)  # only search options differ between methods (DATA_KEYS agree)
    t0 = time.time()
    summary = run_in_process(cfg, _Pooled(pool, cfg))
    rows = [
        {
            k: r.get(k)
            for k in (
                "round",
                "train_acc",
                "train_loss",
                "dev_acc",
                "test_acc",
                "sigma",
                "sigma_before_tell",
                "sigma_local_median",
                "bytes_down",
                "bytes_up",
            )
        }
        for r in summary.rounds
    ]
    seconds = time.time() - t0
    print(
        f"[{split} seed {seed}, {rounds} rounds] {name}: final train {summary.final['train_acc']:.3f} "
        f"test {summary.final['test_acc']:.3f} ({seconds:.0f}s)",
        flush=True,
    )
    return {
        "method": name,
        "seed": seed,
        "split": split,
        "num_rounds": rounds,
        "rounds": rows,
        "final": {k: summary.final.get(k) for k in ("train_acc", "dev_acc", "test_acc")},
        "best": {k: summary.best.get(k) for k in ("round", "dev_acc", "test_acc")},
        "seconds": seconds,
    }


class _Pooled:
    """The pool's runtimes with one method's config: sites set up later in the run get it too."""

    def __init__(self, pool, cfg: dict) -> None:
        self.pool, self.cfg = pool, cfg

    def __call__(self, site: str):
        rt = self.pool(site)
        rt.cfg = self.cfg
        return rt


def matrix(args) -> tuple[dict, list]:
    """The methods to run (name -> options over BASE) and the paired differences to report."""
    if args.cov_modes:
        modes = [m for m in ("none", "diag", "full") if m in args.cov_modes.split(",")]
        methods = {
            f"{name}, cov {mode}": dict(METHODS[name], cov_mode=mode)
            for name in ("FedBPT, paper rule (Eq. 6)", "FedBPT robust")
            for mode in modes
        }
        pairs = [
            (f"{name}, cov {mode}", f"{name}, cov none")
            for name in ("FedBPT, paper rule (Eq. 6)", "FedBPT robust")
            for mode in modes
            if mode != "none" and "none" in modes
        ]
        return methods, pairs
    if args.perturb_rates:
        rates = sorted({float(r) for r in args.perturb_rates.split(",")})
        methods = {
            f"FedBPT, perturbation {r:g}": dict(
                SHIPPED, perturb=r > 0, perturb_rate=r if r > 0 else BASE["perturb_rate"]
            )
            for r in rates
        }
        ref = "FedBPT, perturbation 0.5" if 0.5 in rates else next(iter(methods))
        return methods, [(m, ref) for m in methods if m != ref]
    methods = {m: METHODS[m] for m in (QUICK if args.quick else METHODS)}
    return methods, [(a, b) for a, b in PAIRS if a in methods and b in methods]


def jobs_for(args, seeds: list[int], splits: list[str], methods: dict) -> list[tuple]:
    """Long runs first (the queue's tail is then short), then each (seed, split)'s methods, heaviest first.

    The per-class splits ask only whether the partition changes the rules' comparison: they run the two rules,
    and no long runs.
    """
    jobs = []
    if args.long_rounds and not (args.perturb_rates or args.cov_modes):
        long_splits = [sp for sp in splits if "per-class" not in sp]
        jobs += [(args, 1, sp, m, methods[m], args.long_rounds) for sp in long_splits for m in LONG_METHODS]
    for s in seeds:
        for sp in splits:
            for m in heavy_first(methods):
                if args.perturb_rates or args.cov_modes or "per-class" not in sp or m in PER_CLASS_METHODS:
                    jobs.append((args, s, sp, m, methods[m], args.rounds))
    return jobs


def heavy_first(methods: dict) -> list[str]:
    """Full covariance and perturbation cost the most per run: start them first so the last jobs are short."""
    opts = {m: dict(BASE, **o) for m, o in methods.items()}
    return sorted(methods, key=lambda m: -((opts[m]["cov_mode"] == "full") + opts[m]["perturb"]))


def ensure_bundles(args, seeds: list[int]) -> dict:
    from fedbpt.research.planted import ensure_bundle

    return {s: ensure_bundle(base_config(args, s, "IID"), args.cache).meta for s in seeds}


# ---- analysis ---------------------------------------------------------------------------------------------------
def rounds_to_90(rec: dict) -> int | None:
    """First round whose global train accuracy reaches 90% of the final one."""
    target = 0.9 * rec["final"]["train_acc"]
    for r in rec["rounds"]:
        if r["train_acc"] is not None and r["train_acc"] >= target:
            return r["round"]
    return None


def train_at_best(rec: dict) -> float | None:
    """Global train accuracy of the prompt chosen by dev (the final one if the best round is the last)."""
    for r in rec["rounds"]:
        if r["round"] == rec["best"]["round"]:
            return r["train_acc"]
    return rec["final"]["train_acc"]


def _ms(values: list[float], pct: bool = True) -> str:
    import numpy as np

    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "-"
    f = 100.0 if pct else 1.0
    if len(v) == 1:
        return f"{f * v[0]:.1f}"
    return f"{f * v.mean():.1f} ± {f * v.std(ddof=1):.1f}"


def _num_rounds(rec: dict, args) -> int:
    return rec.get("num_rounds", args.rounds)


def sent_sigma(rec: dict) -> float:
    """The step sent to the clients after the last round (round rows hold what each round's aggregation produced)."""
    return rec["rounds"][-1]["sigma"]


def long_table(records: list[dict]) -> list[str]:
    """The long runs: where the sent step goes, and what the accuracy does meanwhile."""
    if not records:
        return []
    marks = [r for r in (10, 30, 60) if r < len(records[0]["rounds"])]
    lines = [
        f"### {len(records[0]['rounds'])}-round runs (seed 1): sent step after rounds {', '.join(map(str, marks))} and "
        "the last, and accuracy (%)",
        "",
        "| split | rule | "
        + " | ".join(f"sigma @ {m}" for m in marks)
        + " | sigma @ end | train (final) | test (final) | best-dev round | train @ best dev | test @ best dev |",
        "|---|---|" + "---|" * (len(marks) + 6),
    ]
    for r in records:
        sig = " | ".join(f"{r['rounds'][m - 1]['sigma']:.3g}" for m in marks)
        lines.append(
            f"| {r['split']} | {r['method']} | {sig} | {sent_sigma(r):.3g} | {100 * r['final']['train_acc']:.1f} "
            f"| {100 * r['final']['test_acc']:.1f} | {r['best']['round']} | {100 * train_at_best(r):.1f} "
            f"| {100 * r['best']['test_acc']:.1f} |"
        )
    return lines + [""]


def _ms3(values: list[float]) -> str:
    """Mean ± std of positive numbers that may span decades (step sizes), to 3 significant digits."""
    import numpy as np

    v = np.array(values, dtype=float)
    return f"{v.mean():.3g}" if len(v) == 1 else f"{v.mean():.3g} ± {v.std(ddof=1):.2g}"


def tables(records: list[dict], metas: dict, args, wall: float, methods: dict, pairs: list) -> str:
    import numpy as np

    long_runs = [r for r in records if _num_rounds(r, args) != args.rounds]
    records = [r for r in records if _num_rounds(r, args) == args.rounds]
    methods = [m for m in methods if any(r["method"] == m for r in records)]
    splits = [s for s in SPLITS if any(r["split"] == s for r in records)]
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"Planted task (synthetic), {args.clients} clients, {args.rounds} rounds, k_shot {args.k_shot} per class, "
        f"n = {args.n_prompt_tokens} prompt tokens, d = 500, seeds {seeds}; mean ± std over seeds "
        f"(accuracy in %). Train = the global prompt on the union of all clients' training shards "
        f"(local-only: mean over clients of each one's own prompt). Final = after the last round; "
        f"best-dev = the round with the highest dev accuracy. Wall time {wall / 60:.1f} min.",
        "",
    ]
    for split in splits:
        lines += [
            f"### {split}",
            "",
            "| method | train (final) | dev (final) | test (final) | train @ best dev | test @ best dev "
            "| best-dev round | rounds to 90% of final train | sent sigma after last round "
            "| bytes down per client-round | bytes up |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        zero = [r for r in records if r["split"] == split and r["method"] == methods[0]]
        z0 = [z["rounds"][0] for z in zero]
        # with test_eval end no round scores the test set: the bundle holds the zero prompt's test accuracy
        z0_test = [
            r["test_acc"] if r["test_acc"] is not None else metas[z["seed"]]["test"]["zero_acc"]
            for z, r in zip(zero, z0)
        ]
        lines.append(
            f"| manual prompt (z = 0) | {_ms([r['train_acc'] for r in z0])} | {_ms([r['dev_acc'] for r in z0])} "
            f"| {_ms(z0_test)} | - | - | - | - | - | 0 | 0 |"
        )
        cz = [metas[s]["test"]["calibrated_zero_acc"] for s in seeds]
        czt = [metas[s]["train"]["calibrated_zero_acc"] for s in seeds]
        lines.append(
            f"| calibrated zero prompt (offset ceiling) | {_ms(czt)} (pool) | - | {_ms(cz)} | - | - | - | - | - | - "
            "| - |"
        )
        for m in methods:
            rs = [r for r in records if r["split"] == split and r["method"] == m]
            if not rs:
                continue
            down = [np.mean([x["bytes_down"] for x in r["rounds"]]) for r in rs]
            up = [np.mean([x["bytes_up"] for x in r["rounds"]]) for r in rs]
            lines.append(
                f"| {m} | {_ms([r['final']['train_acc'] for r in rs])} | {_ms([r['final']['dev_acc'] for r in rs])} "
                f"| {_ms([r['final']['test_acc'] for r in rs])} | {_ms([train_at_best(r) for r in rs])} "
                f"| {_ms([r['best']['test_acc'] for r in rs])} "
                f"| {_ms([r['best']['round'] for r in rs], pct=False)} "
                f"| {_ms([rounds_to_90(r) for r in rs], pct=False)} | {_ms3([sent_sigma(r) for r in rs])} "
                f"| {int(np.mean(down)):,} | {int(np.mean(up)):,} |"
            )
        lines.append("")
    lines += [
        "### Paired differences (points; a minus b on the same seed and split; mean [min, max] over pairs)",
        "",
        "Final train = global train accuracy after the last round; mean train = its mean over rounds 1..T "
        "(less sensitive to where a drifting run happens to end); test @ best dev = the prompt chosen by dev.",
        "",
        "| a minus b | final train | mean train over rounds | test @ best dev | pairs |",
        "|---|---|---|---|---|",
    ]
    metrics = (
        lambda r: r["final"]["train_acc"],
        lambda r: float(np.mean([x["train_acc"] for x in r["rounds"][1:]] + [r["final"]["train_acc"]])),
        lambda r: r["best"]["test_acc"],
    )
    for a, b in pairs:
        diffs = [[] for _ in metrics]
        for r in records:
            other = [o for o in records if o["method"] == b and o["seed"] == r["seed"] and o["split"] == r["split"]]
            if r["method"] != a or not other:
                continue
            for i, f in enumerate(metrics):
                diffs[i].append(100 * (f(r) - f(other[0])))
        if diffs[0]:
            cells = " | ".join(f"{np.mean(d):+.1f} [{np.min(d):+.1f}, {np.max(d):+.1f}]" for d in diffs)
            lines.append(f"| {a} minus {b} | {cells} | {len(diffs[0])} |")
    lines.append("")
    lines += long_table(long_runs)
    lines += [
        "### Planted tasks (one per seed)",
        "",
        "| seed | draws | test: zero prompt | test: calibrated zero | test label-1 share |",
    ]
    lines.append("|---|---|---|---|---|")
    for s in seeds:
        t = metas[s]["test"]
        lines.append(
            f"| {s} | {metas[s]['draws']} | {100 * t['zero_acc']:.1f} | {100 * t['calibrated_zero_acc']:.1f} "
            f"| {t['label1_share']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str, methods: dict, args) -> None:
    """Global train accuracy (top) and the step sent to the clients (bottom, log scale) per round and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    splits = [s for s in SPLITS if any(r["split"] == s for r in records)]
    methods = [m for m in methods if any(r["method"] == m for r in records)]
    fig, axes = plt.subplots(2, len(splits), figsize=(4.4 * len(splits), 7.0), sharey="row", squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}  # one colour per method in every panel
    for col, split in enumerate(splits):
        for m in methods:
            rs = [r for r in records if r["split"] == split and r["method"] == m]
            if not rs:
                continue
            acc = np.array([[x["train_acc"] for x in r["rounds"]] + [r["final"]["train_acc"]] for r in rs], dtype=float)
            sig = np.array([[x["sigma"] for x in r["rounds"]] for r in rs], dtype=float)
            x = np.arange(acc.shape[1])
            axes[0][col].plot(x, acc.mean(0), label=m, lw=1.5, color=colors[m])
            axes[0][col].fill_between(x, acc.min(0), acc.max(0), alpha=0.12, color=colors[m])
            axes[1][col].plot(np.arange(1, sig.shape[1] + 1), sig.mean(0), lw=1.5, color=colors[m])
        axes[0][col].set_title(f"planted task, {split}", fontsize=9)
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("round")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("global train accuracy (mean; band: min-max)")
    axes[1][0].set_ylabel("sigma sent to the clients (mean)")
    handles = [plt.Line2D([], [], color=colors[m], lw=1.5) for m in methods]
    fig.legend(handles, methods, loc="lower center", ncol=min(len(methods), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path)


def communication(d: int = 500) -> str:
    """Bytes of each message kind at d, as payload bytes and as NVFlare FOBS-serialised Shareables."""
    import pickle
    import warnings

    import numpy as np
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    from fedbpt.core.algorithm.baselines import LocalStates
    from fedbpt.core.algorithm.search import GlobalState, make_es
    from fedbpt.core.wire import encode_state, encode_update, payload_bytes

    common_decomposers.register()  # numpy arrays, as an NVFlare server or client process registers them

    def fobs_bytes(msg: dict) -> int:
        return len(fobs.dumps(DXO(data_kind=DataKind.COLLECTION, data=msg).to_shareable()))

    rng = np.random.default_rng(0)
    a = rng.standard_normal((d, d))
    state = GlobalState(1, rng.standard_normal(d), 0.9, a @ a.T / d)
    rows = []
    for mode in ("full", "diag", "none"):
        msg = {"state": encode_state(state, mode), "evaluate": 1}
        rows.append((f"FedBPT down, --cov_mode {mode}", payload_bytes(msg), fobs_bytes(msg)))
    sites = tuple(f"site-{i}" for i in range(1, 11))
    local = LocalStates(1, rng.standard_normal((10, d)), 0.9, None, sites=sites, sigmas=np.ones(10))
    msg = {"state": encode_state(local, "none"), "evaluate": 1}
    rows.append(("local-only down (all 10 prompts, for the union evaluation)", payload_bytes(msg), fobs_bytes(msg)))
    up = encode_update(
        rng.standard_normal(d),
        0.5,
        np.ones(8),
        5,
        8,
        0.9,
        seconds_search=1.0,
        seconds_eval=0.1,
        train_loss=0.5,
        train_n=8,
        train_confusion=np.zeros((2, 2), dtype=np.int64),
    )
    rows.append(("every method up (mean, fitness, 8 sigmas, train metrics)", payload_bytes(up), fobs_bytes(up)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es = make_es(np.zeros(d), 1.0, 10, 1, 0.0)
        es.tell(es.ask(), list(range(10)))
    rows.append(("pickled pycma CMAEvolutionStrategy (cma 4.5, d = 500, after one tell)", len(pickle.dumps(es)), None))
    lines = ["| message (d = 500) | payload bytes | FOBS Shareable bytes |", "|---|---|---|"]
    for name, p, f in rows:
        lines.append(f"| {name} | {p:,} | {f:,} |" if f is not None else f"| {name} | {p:,} | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N (default 3)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument(
        "--long_rounds",
        type=int,
        default=100,
        help=f"rounds of the long runs (seed 1, IID and the hsu splits, {' and '.join(LONG_METHODS)}); 0: none",
    )
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--k_shot", type=int, default=40, help="examples per class in train (and again in dev)")
    p.add_argument("--n_prompt_tokens", type=int, default=20)
    p.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated subset of {','.join(SPLITS)}")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument(
        "--perturb_rates",
        default=None,
        help="instead of the matrix: FedBPT as shipped (reference rule, cov diag) at these comma-separated "
        "perturbation rates (0: no perturbation); writes NAME learning_perturb",
    )
    p.add_argument(
        "--cov_modes",
        default=None,
        help="instead of the matrix: faithful (paper rule) and robust FedBPT with each of these comma-separated "
        "covariance modes (none, diag, full); writes NAME learning_cov",
    )
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    default_data = os.path.join(ROOT, "..", "shared", "data", "sst2")
    p.add_argument(
        "--data_dir",
        default=default_data if os.path.isdir(default_data) else None,
        help="sentences for the windows (default ../shared/data/sst2; generated text if absent)",
    )
    p.add_argument("--cache", default="/tmp/fedbpt-bench-cache", help="where planted bundles are built")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--figs", default=os.path.join(ROOT, "figs"))
    p.add_argument("--report_only", action="store_true", help="redo tables and plot from OUT/NAME_runs.json")
    p.add_argument(
        "--resume", action="store_true", help="keep the runs already saved in OUT/NAME_runs.json and run the rest"
    )
    args = p.parse_args(argv)
    args.name = sweep_name(args)
    if args.report_only:
        path = os.path.join(args.out, f"{args.name}_runs.json")
        if not os.path.isfile(path):
            print(f"error: {path} does not exist: run the benchmark first (without --report_only)", file=sys.stderr)
            return 2
        with open(path) as f:
            saved = json.load(f)
        for k, v in saved["args"].items():
            if k not in ("out", "figs", "report_only"):
                setattr(args, k, v)
        metas = {int(k): v for k, v in saved["bundles"].items()}
        return report(saved["records"], metas, args, saved["wall_seconds"])
    splits = [s.strip() for s in args.splits.split(",")]
    bad = [s for s in splits if s not in SPLITS]
    if bad or args.seeds < 1 or args.rounds < 1 or args.workers < 1 or args.long_rounds < 0:
        print(
            f"error: --splits must name {', '.join(SPLITS)}; --seeds/--rounds/--workers must be >= 1, "
            f"--long_rounds >= 0",
            file=sys.stderr,
        )
        return 2
    try:
        rates = [float(r) for r in args.perturb_rates.split(",")] if args.perturb_rates else []
    except ValueError:
        rates = [-1.0]
    if args.cov_modes and not set(args.cov_modes.split(",")) <= {"none", "diag", "full"}:
        print(
            f"error: --cov_modes must be a comma-separated subset of none,diag,full, got {args.cov_modes}",
            file=sys.stderr,
        )
        return 2
    if any(not 0 <= r <= 1 for r in rates):
        print(
            f"error: --perturb_rates must be comma-separated numbers in [0, 1], got {args.perturb_rates}",
            file=sys.stderr,
        )
        return 2
    if args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    seeds = list(range(1, args.seeds + 1))
    methods, _ = matrix(args)
    t0 = time.time()
    metas = ensure_bundles(args, seeds)
    # one job per run, grouped by (seed, split): each worker sets a group's sites up once, and the queue keeps
    # both workers busy to the end (the tail is one short run)
    jobs = jobs_for(args, seeds, splits, methods)
    records: list[dict] = []
    path = os.path.join(args.out, f"{args.name}_runs.json")
    if args.resume and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        wanted = {_job_key(j[3], j[1], j[2], j[5]) for j in jobs}
        records = [
            r for r in saved["records"] if _job_key(r["method"], r["seed"], r["split"], _num_rounds(r, args)) in wanted
        ]
        done = {_job_key(r["method"], r["seed"], r["split"], _num_rounds(r, args)) for r in records}
        jobs = [j for j in jobs if _job_key(j[3], j[1], j[2], j[5]) not in done]
        t0 -= saved["wall_seconds"]
        print(f"resuming: {len(records)} runs saved in {path}, {len(jobs)} to go", flush=True)
    if args.workers == 1:
        for j in jobs:
            records.append(run_one(j))
            save(records, metas, args, time.time() - t0)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for rec in pool.imap_unordered(run_one, jobs):
                records.append(rec)
                save(records, metas, args, time.time() - t0)  # partial results survive an interrupted matrix
    wall = time.time() - t0
    save(records, metas, args, wall)
    return report(records, metas, args, wall)


def _job_key(method: str, seed: int, split: str, rounds: int) -> tuple:
    return (method, int(seed), split, int(rounds))


def save(records: list[dict], metas: dict, args, wall: float) -> None:
    from fedbpt.core.server.summary import atomic_write

    os.makedirs(args.out, exist_ok=True)
    data = {"args": vars(args), "wall_seconds": wall, "bundles": metas, "records": records}
    atomic_write(os.path.join(args.out, f"{args.name}_runs.json"), json.dumps(data, indent=1).encode())


def sweep_name(args) -> str:
    return "learning_perturb" if args.perturb_rates else "learning_cov" if args.cov_modes else "learning"


def report(records: list[dict], metas: dict, args, wall: float) -> int:
    from fedbpt.core.server.summary import atomic_write

    args.perturb_rates = getattr(args, "perturb_rates", None)  # results saved before the sweeps existed
    args.cov_modes = getattr(args, "cov_modes", None)
    args.name = sweep_name(args)
    methods, pairs = matrix(args)
    text = "## Learning yardstick results\n\n" + tables(records, metas, args, wall, methods, pairs)
    if args.name == "learning":
        text += "\n## Communication per client per round\n\n" + communication()
    atomic_write(os.path.join(args.out, f"{args.name}.md"), text.encode())
    main = [r for r in records if _num_rounds(r, args) == args.rounds]
    long_runs = [r for r in records if _num_rounds(r, args) != args.rounds]
    plot(main, os.path.join(args.figs, f"{args.name}_train_acc.png"), methods, args)
    if long_runs:
        plot(long_runs, os.path.join(args.figs, f"{args.name}_long.png"), methods, args)
    print(text)
    print(
        f"wall time {wall:.0f}s; wrote {args.out}/{args.name}.md, {args.name}_runs.json, "
        f"{args.figs}/{args.name}_train_acc.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
