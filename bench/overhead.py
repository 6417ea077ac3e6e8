"""Orchestration overhead per round: simulator round wall time minus the clients' own model work.

python -m bench.overhead        # tiny-random, 10 clients, 20 rounds, NVFlare simulator (a few minutes)

Runs job.py in the NVFlare simulator (one process per client, all in parallel), then reads the run summary:
each round row holds the server's wall time of the round (``seconds``: from sending the task to having
aggregated) and every client's reported work (``client_seconds``: its evaluation plus local search, as the
payload's seconds_eval + seconds_search). Clients run in parallel, so the round waits for the slowest one;
overhead = seconds - max(client_seconds): task dispatch and polling, serialisation, transfer, validation and
aggregation. Round 0 also builds every client's runtime (model and data load), so it is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_clients", type=int, default=10)
    p.add_argument("--num_rounds", type=int, default=20)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "overhead.json"))
    args, extra = p.parse_known_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedbpt-overhead-") as ws:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "job.py"),
            "--config",
            args.config,
            "--num_clients",
            str(args.num_clients),
            "--num_rounds",
            str(args.num_rounds),
            "--workspace",
            ws,
            *extra,
        ]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        path = os.path.join(ws, "fedbpt_summary.json")
        if proc.returncode != 0 or not os.path.isfile(path):
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"error: job.py exited {proc.returncode}; see the output above", file=sys.stderr)
            return 1
        with open(path) as f:
            summary = json.load(f)
    rounds = summary["rounds"]
    if any("client_seconds" not in r for r in rounds):
        print("error: the summary has no client_seconds: run with this branch's federation.py", file=sys.stderr)
        return 1
    seconds = np.array([r["seconds"] for r in rounds])
    work = np.array([max(r["client_seconds"].values()) for r in rounds])
    over = seconds - work
    steady = over[1:] if len(over) > 1 else over
    result = {
        "command": " ".join(["python", "bench/overhead.py", *(argv or sys.argv[1:])]),
        "num_clients": args.num_clients,
        "num_rounds": args.num_rounds,
        "job_wall_s": wall,
        "round_s_median": float(np.median(seconds[1:] if len(seconds) > 1 else seconds)),
        "slowest_client_work_s_median": float(np.median(work[1:] if len(work) > 1 else work)),
        "overhead_s_median": float(np.median(steady)),
        "overhead_s_mean": float(np.mean(steady)),
        "overhead_s_max": float(np.max(steady)),
        "overhead_round0_s": float(over[0]),
        "per_round": [
            {"round": r["round"], "seconds": float(s), "slowest_client_work": float(w), "overhead": float(o)}
            for r, s, w, o in zip(rounds, seconds, work, over)
        ],
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    print(
        f"\n| measure (rounds 1..{len(rounds) - 1}) | seconds |\n|---|---|\n"
        f"| round wall time, median | {result['round_s_median']:.3f} |\n"
        f"| slowest client's model work, median | {result['slowest_client_work_s_median']:.3f} |\n"
        f"| overhead per round, median | {result['overhead_s_median']:.3f} |\n"
        f"| overhead per round, mean / max | {result['overhead_s_mean']:.3f} / {result['overhead_s_max']:.3f} |\n"
        f"| round 0 overhead (runtime start-up) | {result['overhead_round0_s']:.2f} |\n"
        f"| job.py wall time | {wall:.1f} |\n\nload before {load_before}, after {result['load_after']}"
    )
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
