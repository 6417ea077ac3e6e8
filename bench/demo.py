"""README's first command, timed: the SmolLM2 preset end to end through job.py, one seed per run.

    python -m bench.demo                   # seeds 1-3 of configs/smollm2_sst2.yaml, one run at a time
    python -m bench.demo --seeds 4 5       # more seeds; saved runs are kept
    python -m bench.demo --report_only

Each run is ``python job.py --config PRESET --seed S --workspace W`` in a fresh process: its wall time from start to
exit, and the peak resident memory of its whole process tree (launcher, simulator server and clients), sampled every
0.2 s and summed at each sample. The model is converted into the model cache before the first run, so no run pays
for it. From each run's summary: the no-prompt and tuned (best-dev) test accuracy, the margin, queries and tokens.
Runs are saved as they finish (bench/results/demo_runs.json); the table goes to bench/results/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

from bench.common import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))


def tree_rss(proc) -> int:
    """Resident bytes of ``proc`` and all its descendants now (processes that exit meanwhile are skipped)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(preset: str, seed: int, extra: list[str]) -> dict:
    import psutil

    with tempfile.TemporaryDirectory(prefix="fedbpt-demo-") as tmp:
        ws = os.path.join(tmp, "ws")
        cmd = [sys.executable, os.path.join(ROOT, "job.py"), "--config", preset, "--seed", str(seed)]
        cmd += ["--workspace", ws, *extra]
        peak, done = [0], threading.Event()
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watched = psutil.Process(proc.pid)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(watched))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = proc.communicate()
        wall = time.time() - t0
        done.set()
        sampler.join()
        summary_path = os.path.join(ws, "fedbpt_summary.json")
        if proc.returncode != 0 or not os.path.isfile(summary_path):
            raise RuntimeError(f"seed {seed}: job.py exited {proc.returncode}:\n{out[-3000:]}")
        with open(summary_path) as f:
            s = json.load(f)
    totals = s["final"]["totals"]
    return {
        "seed": seed,
        "wall_seconds": wall,
        "peak_rss_bytes": peak[0],
        "no_prompt": s["no_prompt"]["test_acc"],
        "tuned": s["best"]["test_acc"],
        "best_round": s["best"]["round"],
        "test_n": s["no_prompt"]["test_n"],
        "margin_points": 100 * (s["best"]["test_acc"] - s["no_prompt"]["test_acc"]),
        "final_test": s["final"]["test_acc"],
        "queries": totals["queries"],
        "eval_queries": totals["eval_queries"],
        "tokens": totals["tokens"],
        "dev": [r.get("dev_acc") for r in s["rounds"]] + [s["final"].get("dev_acc")],
        "round_seconds": [r.get("seconds") for r in s["rounds"]],
        "console_tail": out.strip().splitlines()[-4:],
    }


def report(data: dict) -> str:
    import numpy as np

    runs = sorted(data["runs"].values(), key=lambda r: r["seed"])
    m = data["machine"]
    lines = [
        f"## README's first command: `python job.py --config {data['preset']}` (SmolLM2-135M, SST-2)",
        "",
        f"`python -m bench.demo`; each seed a fresh `job.py` process; model conversion done before the first run. "
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average {m['load_before']} before the "
        "first run. Test = all SST-2 validation sentences; tuned = the best-dev prompt.",
        "",
        "| seed | no prompt | tuned prompt | margin (points) | best-dev round | wall | peak memory (all processes) "
        "| queries (search + eval) | tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['seed']} | {100 * r['no_prompt']:.1f}% | {100 * r['tuned']:.1f}% | {r['margin_points']:+.1f} "
            f"| {r['best_round']} | {r['wall_seconds'] / 60:.1f} min | {r['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"| {r['queries']:,} + {r['eval_queries']:,} | {r['tokens']:,} |"
        )
    if runs:
        margins = np.array([r["margin_points"] for r in runs])
        walls = np.array([r["wall_seconds"] for r in runs]) / 60
        lines += [
            "",
            f"Margin over {len(runs)} seeds: mean {margins.mean():+.1f} points, smallest {margins.min():+.1f}; wall "
            f"{walls.min():.1f}-{walls.max():.1f} min; peak memory up to "
            f"{max(r['peak_rss_bytes'] for r in runs) / 2**30:.2f} GiB.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="configs/smollm2_sst2.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="demo", help="results stem under --out")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("extra", nargs="*", help="more job.py flags, after --")
    args = p.parse_args(argv)
    from fedbpt.core.server.summary import atomic_write

    path = os.path.join(args.out, f"{args.name}_runs.json")
    data = {"preset": args.preset, "runs": {}, "machine": {}}
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        if data["preset"] != args.preset:
            print(f"error: {path} holds runs of {data['preset']}: pass another --name", file=sys.stderr)
            return 2
    if not args.report_only:
        import torch

        from fedbpt.core.models.resolve import resolve_model

        resolve_model("smollm2-135m")  # the one-off conversion, outside every timed run
        data["machine"] = data["machine"] or {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_before": [round(x, 2) for x in os.getloadavg()],
        }
        for seed in args.seeds:
            if str(seed) in data["runs"]:
                continue
            rec = run_one(args.preset, seed, args.extra)
            data["runs"][str(seed)] = rec
            os.makedirs(args.out, exist_ok=True)
            atomic_write(path, json.dumps(data, indent=1).encode())
            print(
                f"seed {seed}: no prompt {100 * rec['no_prompt']:.1f}% -> tuned {100 * rec['tuned']:.1f}% "
                f"({rec['margin_points']:+.1f}), {rec['wall_seconds'] / 60:.1f} min, "
                f"peak {rec['peak_rss_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
    text = report(data)
    atomic_write(os.path.join(args.out, f"{args.name}.md"), text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
