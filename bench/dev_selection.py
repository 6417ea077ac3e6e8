"""How many dev sentences does best-dev selection need? The SmolLM2 preset's per-round global prompts scored on a
wide dev pool and on the test set.

    python -m bench.dev_selection                 # seeds 1-3 (about 10 minutes each on 2 cores)
    python -m bench.dev_selection --report_only

Each seed runs the preset (configs/smollm2_sst2.yaml) in-process for its rounds, keeping the global prompt every
round starts from and the final one. Its training examples do not depend on the dev set (``--dev_shot`` takes the
dev sentences after train's), so one run serves every dev size: afterwards each prompt is scored on the next
``--pool`` sentences per class after train's (interleaved by class, so the first 2m are m per class: m = 16 is the
reference's dev set of k per class) and on all 872 test sentences. The table shows, per dev size, the round
best-dev selection picks (the earliest of a tie) and that prompt's test accuracy beside the no-prompt baseline.
Results are saved after every seed (bench/results/dev_selection.json) and a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.common import ROOT, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = (16, 32, 64, 128)  # dev sentences per class compared
NO_PROMPT = 0.6295871559633027  # the template alone on the 872 sentences (every run's summary: no_prompt)


def run_seed(seed: int, pool: int, data_dir: str, cache: str) -> dict:
    import numpy as np

    from fedbpt.core.data.splits import load_split
    from fedbpt.core.server.checkpoint import open_run
    from fedbpt.core.server.federation import Federation
    from fedbpt.core.site.runtime import RuntimePool
    from fedbpt.flare.preflight import prepare_config

    t0 = time.time()
    cfg = prepare_config(preset=os.path.join(ROOT, "configs", "smollm2_sst2.yaml"), seed=seed, data_dir=data_dir)
    cfg = cfg.replace(torch_threads=2)
    runtimes = RuntimePool(cfg, cache)
    try:
        fed = Federation(cfg, [f"site-{i}" for i in range(1, cfg.num_clients + 1)])
        open_run(fed, cfg)
        zs, dev_run = [], []
        for rnd in range(cfg.num_rounds):
            targets, msg = fed.start_round(rnd)
            zs.append(np.array(fed.server.state(rnd).mean, dtype=np.float64))
            results = {s: runtimes(s).run_round(msg["state"], bool(msg["evaluate"])) for s in targets}
            dev_run.append(fed.finish_round(rnd, targets, results).get("dev_acc"))
            print(f"seed {seed} round {rnd}: dev {dev_run[-1]:.3f} ({time.time() - t0:.0f}s)", flush=True)
        fed.final_message()
        zs.append(np.array(fed.server.state(cfg.num_rounds).mean, dtype=np.float64))
        site = runtimes("site-1")
        full = load_split(site.task, "train", cfg.data_dir)
        order = np.random.default_rng(seed).permutation(len(full.labels))
        k = cfg.k_shot
        per_class = [order[full.labels[order] == c][k : k + pool] for c in range(site.task.num_classes)]
        dev = site.scorer.encode(full.subset(np.stack(per_class, 1).reshape(-1)))
        prompts = np.stack(zs)
        dev_correct = (site.scorer.label_logits(prompts, dev).argmax(-1) == dev.labels[None]).astype(int)
        test_acc = (site.scorer.label_logits(prompts, site.test).argmax(-1) == site.test.labels[None]).mean(1)
    finally:
        runtimes.close()
    return {
        "dev_run": dev_run,
        "dev_correct": dev_correct.tolist(),
        "dev_labels": dev.labels.tolist(),
        "test_acc": test_acc.tolist(),
        "seconds": time.time() - t0,
    }


def table(results: dict) -> str:
    import numpy as np

    lines = [
        "| seed | test accuracy of the prompt each round starts from (round 0..R-1, final) | "
        + " | ".join(f"dev {2 * m}: round, test, margin" for m in SIZES)
        + " |",
        "|---|---|" + "---|" * len(SIZES),
    ]
    margins: dict[int, list[float]] = {m: [] for m in SIZES}
    for seed, r in sorted(results.items(), key=lambda kv: int(kv[0])):
        correct, test = np.asarray(r["dev_correct"]), np.asarray(r["test_acc"])
        cells = []
        for m in SIZES:
            if 2 * m > correct.shape[1]:
                cells.append("-")
                continue
            pick = int(np.argmax(correct[:, : 2 * m].mean(1)))
            margins[m].append(100 * (test[pick] - NO_PROMPT))
            cells.append(f"{pick}, {100 * test[pick]:.1f}%, {margins[m][-1]:+.1f}")
        lines.append(f"| {seed} | {' / '.join(f'{100 * t:.1f}' for t in test)} | " + " | ".join(cells) + " |")
    means = [f"{np.mean(margins[m]):+.1f} (min {min(margins[m]):+.1f})" if margins[m] else "-" for m in SIZES]
    lines.append("| mean margin | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--pool", type=int, default=max(SIZES), help="dev sentences per class scored")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data", "sst2"))
    p.add_argument("--cache", default="/tmp/fedbpt-bench-cache")
    p.add_argument("--out", default=os.path.join(HERE, "results", "dev_selection.json"))
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    results = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if not args.report_only:
        if not os.path.isdir(args.data_dir):
            print(f"error: --data_dir {args.data_dir} is not a folder: point it at SST-2 jsonl files", file=sys.stderr)
            return 2
        for seed in args.seeds:
            if str(seed) not in results:
                results[str(seed)] = run_seed(seed, args.pool, os.path.abspath(args.data_dir), args.cache)
                write_json(args.out, results)
    if not results:
        print(f"error: {args.out} holds no runs: run without --report_only first", file=sys.stderr)
        return 2
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
