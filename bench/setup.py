"""Where a round's time goes when the simulator respawns its clients: set-up, imports, scoring, NVFlare overhead.

python -m bench.setup                        # tiny-random, 10 clients, --threads 2 5 10, 5 rounds (~15 min on 2 cores)
python -m bench.setup --shape roberta-large --threads 2 --num_rounds 3 --k_shot 5 --local_iter 2 --test_examples 32

With ``--threads`` below ``--num_clients`` NVFlare's simulator runs every task in a fresh client process, so every
task pays a process start, the library imports and the site's set-up before it scores anything. This runs job.py
once per ``--threads`` value and splits each round's wall time (the server's ``seconds``) with the summary's
per-site fields: ``setup_seconds`` (building the runtime), ``import_seconds`` (torch and transformers imported by
that task) and ``client_seconds`` (scoring and search). T client processes run at once, so a round's share of a
kind of work is its sum over the round's tasks divided by T; overhead is the rest (task dispatch, the process
start and NVFlare's own start-up in it, messaging, aggregation). A project tree whose summary has no
``setup_seconds`` (``--root`` at an older checkout) is read from the sites' "ready in" log lines instead; that
figure leaves out the torch import and cannot split imports off, so those land in the overhead.

``--shape`` runs a random-weight model of a real architecture's shape (bench.common, built once under
``--model_dir``); ``--test_examples N`` scores the eval site's test set on its first N examples (a copy of the data
folder in a temporary folder), which keeps a large shape's rounds short on a CPU. Results are merged into
``--out`` after every run (one entry per label, model and thread count) and all entries are printed as a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import SST2_DIR, build_shape_model, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
READY = re.compile(r"(site-\d+): \d+ train, .*ready in ([0-9.]+) ?s")


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def small_data_dir(parent: str, n_test: int) -> str:
    """A data folder under ``parent`` (a folder this run made) with SST-2's whole train file and its first ``n_test``
    validation lines."""
    out = os.path.join(parent, f"sst2-test{n_test}")
    os.makedirs(out)
    os.symlink(os.path.abspath(os.path.join(SST2_DIR, "train.jsonl")), os.path.join(out, "train.jsonl"))
    with open(os.path.join(SST2_DIR, "validation.jsonl")) as f, open(os.path.join(out, "validation.jsonl"), "w") as g:
        for i, line in enumerate(f):
            if i >= n_test:
                break
            g.write(line)
    return out


def setups_from_log(log_text: str, num_rounds: int) -> dict[str, list[float | None]] | None:
    """site -> set-up seconds of rounds 0..R-1 from the "ready in" lines (a site logs one per build: the setup
    task, then one per round and the final evaluation when every task respawns it; one line: built once)."""
    lines: dict[str, list[float]] = {}
    for m in READY.finditer(log_text):
        lines.setdefault(m.group(1), []).append(float(m.group(2)))
    if not lines:
        return None
    out = {}
    for site, seen in lines.items():
        if len(seen) == 1:
            out[site] = [0.0] * num_rounds
        elif len(seen) >= num_rounds + 1:
            out[site] = seen[1 : num_rounds + 1]
        else:
            out[site] = [None] * num_rounds
    return out


def split_rounds(rounds: list[dict], threads: int, log_setups: dict | None) -> dict:
    """Per-round parts (rounds 1.. ; round 0 apart) and per-task figures."""
    per_round, setup_tasks, import_tasks, work_tasks, fractions = [], [], [], [], []
    for r in rounds:
        sites = sorted(r["client_seconds"])
        work = [float(r["client_seconds"][s]) for s in sites]
        if "setup_seconds" in r:
            setup = [float(r["setup_seconds"].get(s, 0.0)) for s in sites]
            imports = [float(r.get("import_seconds", {}).get(s, 0.0)) for s in sites]
        else:
            setup = [log_setups[s][r["round"]] if log_setups and s in log_setups else None for s in sites]
            imports = [0.0] * len(sites)
        t = max(1, min(threads, len(sites)))
        known = None not in setup
        parts = {
            "round": r["round"],
            "seconds": float(r["seconds"]),
            "setup": sum(setup) / t if known else None,
            "imports": sum(imports) / t,
            "scoring": sum(work) / t,
        }
        parts["overhead"] = parts["seconds"] - parts["scoring"] - parts["imports"] - (parts["setup"] or 0.0)
        per_round.append(parts)
        if r["round"] >= 1:
            setup_tasks += setup
            import_tasks += imports
            work_tasks += work
            fractions += [s / w for s, w in zip(setup, work) if s is not None and w > 0]
    later = [p for p in per_round if p["round"] >= 1] or per_round
    return {
        "round_s_median": _median(p["seconds"] for p in later),
        "split_s_median": {k: _median(p[k] for p in later) for k in ("setup", "imports", "scoring", "overhead")},
        "setup_per_task_s_median": _median(setup_tasks),
        "setup_per_task_s_max": max((s for s in setup_tasks if s is not None), default=None),
        "import_per_task_s_median": _median(import_tasks),
        "scoring_per_task_s_median": _median(work_tasks),
        "setup_over_scoring_median": _median(fractions),
        "round0": per_round[0] if per_round else None,
        "per_round": per_round,
    }


def read_logs(ws: str) -> str:
    """The sites' log lines: the run's fedbpt_log.txt, or (a tree without it) each site's own log.txt."""
    path = os.path.join(ws, "fedbpt_log.txt")
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(glob.glob(os.path.join(ws, "**", "site-*", "log.txt"), recursive=True))
    )
    text = []
    for file in files:
        with open(file, errors="replace") as f:
            text.append(f.read())
    return "\n".join(text)


def read_run(ws: str, threads: int) -> dict:
    """The round split of a finished run in workspace ``ws``."""
    with open(os.path.join(ws, "fedbpt_summary.json")) as f:
        summary = json.load(f)
    rounds = summary["rounds"]
    from_summary = all("setup_seconds" in r for r in rounds)
    log_setups = None if from_summary else setups_from_log(read_logs(ws), len(rounds))
    return {
        "setup_source": "summary" if from_summary else "log (ready in; no torch import)",
        **split_rounds(rounds, threads, log_setups),
    }


def run_one(args, threads: int, model_name: str | None, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedbpt-setup-") as tmp:
        ws = os.path.join(tmp, "ws")
        cmd = [
            sys.executable,
            os.path.join(args.root, "job.py"),
            "--config",
            args.config,
            "--num_clients",
            str(args.num_clients),
            "--num_rounds",
            str(args.num_rounds),
            "--threads",
            str(threads),
            "--workspace",
            ws,
        ]
        if model_name:
            cmd += ["--model_name", model_name]
        data_dir = small_data_dir(tmp, args.test_examples) if args.test_examples else os.path.abspath(SST2_DIR)
        cmd += ["--data_dir", data_dir]
        cmd += extra
        print(" ".join(cmd), flush=True)
        load_before = os.getloadavg()
        t0 = time.time()
        src = [os.path.join(args.root, "src"), os.environ.get("PYTHONPATH")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, src)))  # that tree's fedbpt, not this one's
        proc = subprocess.run(cmd, cwd=args.root, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        path = os.path.join(ws, "fedbpt_summary.json")
        status = None
        if os.path.isfile(path):
            with open(path) as f:
                status = json.load(f).get("status")
        if proc.returncode != 0 or status != "completed":
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"error: job.py exited {proc.returncode}; see the output above")
        parts = read_run(ws, threads)
    return {
        "label": args.label,
        "model": args.shape or "tiny-random",
        "threads": threads,
        "num_clients": args.num_clients,
        "num_rounds": args.num_rounds,
        "command": " ".join(cmd[1:]),
        "job_wall_s": wall,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        **parts,
    }


# One fresh client process's set-up, as a respawned simulator worker does it: the library imports, then the runtime.
FRESH_CHILD = """
import importlib, json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
with open(sys.argv[1]) as f:
    cfg = json.load(f)
with open(cfg.model_name + "/config.json") as f:
    mt = json.load(f)["model_type"].replace("-", "_")
importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
t1 = time.perf_counter()
from fedbpt.core.site.runtime import SiteRuntime
rt = SiteRuntime(cfg, sys.argv[2], sys.argv[3], **({"setup_cache": True} if sys.argv[4] == "1" else {}))
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "build": t2 - t1, "cache": getattr(rt, "cache_state", None),
                  "import_seconds": getattr(rt, "import_seconds", None)}))
"""


def fresh_processes(args, model_name: str | None, extra: list[str]) -> dict:
    """Alternate fresh processes of the ``--compare`` tree (no set-up cache) and this tree (its cache written by a
    first process), ``--fresh`` times each per site; the same machine state for both, within seconds."""
    from fedbpt.core.config import resolve
    from fedbpt.flare.preflight import prepare_config

    argv = ["--config", args.config, "--num_clients", str(args.num_clients), "--torch_threads", "1", *extra]
    argv += ["--data_dir", os.path.abspath(SST2_DIR)] + (["--model_name", model_name] if model_name else [])
    cfg = prepare_config(resolve(argv))
    out: dict = {"command": " ".join(argv), "load_before": os.getloadavg(), "samples": []}
    with tempfile.TemporaryDirectory(prefix="fedbpt-fresh-") as tmp:
        cfg_file = os.path.join(tmp, "cfg.json")
        with open(cfg_file, "w") as f:
            json.dump(cfg, f)

        def child(tree: str, site: str, cached: bool) -> dict:
            env = dict(os.environ, PYTHONPATH=os.path.join(tree, "src"))
            cmd = [sys.executable, "-c", FRESH_CHILD, cfg_file, site, os.path.join(tmp, "root"), "1" if cached else "0"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"error: a fresh set-up failed:\n{proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        for site in args.fresh_sites:
            print(f"{site}: first set-up of this tree (writes its cache): {child(ROOT, site, True)}", flush=True)
            for _ in range(args.fresh):
                for label, tree, cached in (("before", args.compare, False), ("after", ROOT, True)):
                    sample = {"site": site, "label": label, **child(tree, site, cached)}
                    out["samples"].append(sample)
                    print(sample, flush=True)
    out["load_after"] = os.getloadavg()
    rows = []
    for site in args.fresh_sites:
        for label in ("before", "after"):
            got = [x for x in out["samples"] if x["site"] == site and x["label"] == label]
            total = [x["imports"] + x["build"] for x in got]
            # this tree reports transformers' start-up inside its build as import_seconds; the other tree cannot
            setup = [x["build"] - x["import_seconds"] for x in got if x["import_seconds"] is not None]
            rows.append(
                {
                    "site": site,
                    "label": label,
                    "imports_s_median": _median(x["imports"] for x in got),
                    "build_s_median": _median(x["build"] for x in got),
                    "setup_s_median": _median(setup),
                    "total_s_median": _median(total),
                }
            )
    out["medians"] = rows
    return out


def print_fresh(model: str, fresh: dict) -> None:
    print(f"\n{model}: one fresh process per task (medians; load {fresh['load_before']} -> {fresh['load_after']})")
    print("| site | code | imports | runtime build | build less library start-up | total |")
    print("|---|---|---|---|---|---|")
    for r in fresh["medians"]:
        print(
            f"| {r['site']} | {r['label']} | {_fmt(r['imports_s_median'])} | {_fmt(r['build_s_median'])} | "
            f"{_fmt(r['setup_s_median'])} | {_fmt(r['total_s_median'])} |"
        )


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(runs: list[dict]) -> None:
    print(
        "\n| label | model | threads | job s | round s | set-up | imports | scoring | overhead | "
        "set-up/task (median, max) | set-up / scoring | round 0 s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in runs:
        s = r["split_s_median"]
        print(
            f"| {r['label']} | {r['model']} | {r['threads']} | {r['job_wall_s']:.0f} | {_fmt(r['round_s_median'])} | "
            f"{_fmt(s['setup'])} | {_fmt(s['imports'])} | {_fmt(s['scoring'])} | {_fmt(s['overhead'])} | "
            f"{_fmt(r['setup_per_task_s_median'])}, {_fmt(r['setup_per_task_s_max'])} | "
            f"{_fmt(100 * r['setup_over_scoring_median'] if r['setup_over_scoring_median'] is not None else None, 1)}"
            f"% | {_fmt(r['round0']['seconds'] if r['round0'] else None, 1)} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--num_clients", type=int, default=10)
    p.add_argument("--num_rounds", type=int, default=5)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    p.add_argument("--shape", choices=["roberta-base", "roberta-large"], help="a random model of this shape")
    p.add_argument("--model_dir", default=os.path.join("/tmp", "fedbpt-bench"), help="where shape models are built")
    p.add_argument("--test_examples", type=int, default=0, help="score the test set on its first N examples")
    p.add_argument(
        "--root", default=ROOT, help="the project tree whose job.py runs (e.g. a worktree of another commit)"
    )
    p.add_argument("--label", default="current")
    p.add_argument("--out", default=os.path.join(HERE, "results", "setup.json"))
    p.add_argument("--fresh", type=int, default=0, help="instead of job.py runs: N fresh set-ups per tree and site")
    p.add_argument("--compare", help="with --fresh: the project tree to compare against (e.g. a worktree of HEAD)")
    p.add_argument("--fresh_sites", nargs="+", default=["site-1", "site-2"])
    args, extra = p.parse_known_args(argv)
    args.root = os.path.abspath(args.root)
    if args.fresh and not args.compare:
        p.error("--fresh needs --compare TREE")
    model_name = build_shape_model(args.shape, args.model_dir) if args.shape else None
    results: dict = {"runs": [], "fresh": {}}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            results.update(json.load(f))
    model = args.shape or "tiny-random"
    if args.fresh:
        args.compare = os.path.abspath(args.compare)
        results["fresh"][model] = fresh_processes(args, model_name, extra)
        write_json(args.out, results)
        print_fresh(model, results["fresh"][model])
        return 0
    for threads in args.threads:
        run = run_one(args, threads, model_name, extra)
        key = (run["label"], run["model"], threads)
        results["runs"] = [r for r in results["runs"] if (r["label"], r["model"], r["threads"]) != key] + [run]
        write_json(args.out, results)
        print_table([run])
    print_table(results["runs"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
