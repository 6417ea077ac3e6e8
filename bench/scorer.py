"""Scorer benchmark: our batched scorer against a reference-style evaluator, in one process.

python -m bench.scorer                        # roberta-base's shape, random weights, SST-2 text (3-8 min)
python -m bench.scorer --shape roberta-large  # roberta-large's shape (about 3.5x longer)

Measures, with the same model, data and thread count:
- candidates/s: one CMA-ES generation (lambda candidates, each on 40 clean + 40 perturbed examples, Eq. 7)
  through fedbpt's LocalObjective, and through a reference-style evaluator that works as the NVFlare example
  does: one candidate at a time, batches of --batch_size in data order padded to each batch's longest, the
  full-vocabulary LM head at the mask position (SDPA and inference mode too: not a strawman). The two
  alternate --repeats times and each side's fastest generation counts (the machine may be shared);
- achieved encoder FLOP/s (FLOPs of the real, unpadded tokens) as a fraction of torch.matmul's FLOP/s on large
  fp32 matrices measured in the same process with the same threads (median of measurements taken before and
  after the scoring runs, so slow drift in the machine's load affects both sides);
- peak resident memory while scoring, against the fp32 weights plus the largest pass's activations;
- per-round wall time of one client at the paper's settings (I, lambda, 40 examples, perturbation), composed
  from the measured parts: ours = global-mean eval on the shard + I generations + F(local mean) + pycma;
  reference-style = whole test set with the global mean (every client, every round) + I generations + pycma
  (the test evaluation is timed on --test_examples random test examples and scaled to the whole set).
  A generation's cost does not depend on z, so I x one measured generation is the I generations' cost;
  --direct_round also runs both rounds end to end for a check.
Prints a table and writes JSON (default bench/results/scorer.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from bench.common import SHAPES, build_shape_model, peak_rss_reset, rss_bytes, sst2_split, write_json

GB = 1e9


def encoder_flops(lengths: np.ndarray, layers: int, hidden: int, inter: int) -> float:
    """Dense encoder FLOPs of sequences of the given real lengths: projections, FFN, QK^T and AV."""
    length = np.asarray(lengths, dtype=np.float64)
    per_layer = 8 * length * hidden**2 + 4 * length * hidden * inter + 4 * length**2 * hidden
    return float(layers * per_layer.sum())


def matmul_flops_per_s(torch, n: int = 4096, seconds: float = 3.0) -> float:
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.matmul(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class ReferenceStyle:
    """Scores as the NVFlare example does: one candidate, fixed-size batches in data order, full-vocabulary head."""

    def __init__(self, scorer, batch_size: int) -> None:
        self.sc, self.batch_size = scorer, batch_size
        self.passes = 0
        self.padded_tokens = 0

    def logits(self, z: np.ndarray, enc) -> np.ndarray:
        sc, torch = self.sc, self.sc.torch
        out = np.zeros((len(enc), len(sc.label_ids)), dtype=np.float32)
        with torch.inference_mode(), sc.prompt(sc.prompts(z)[0]):
            for b0 in range(0, len(enc), self.batch_size):
                idx = np.arange(b0, min(len(enc), b0 + self.batch_size))
                ids, att = sc._padded(enc, idx)
                mpos = torch.as_tensor(enc.mask_pos[idx])
                hidden = sc.model.base_model(input_ids=ids, attention_mask=att).last_hidden_state
                full = sc.head(hidden[torch.arange(len(idx)), mpos])  # (B, vocab): the whole decoder
                out[idx] = full[:, sc.label_ids].float().numpy()
                self.passes += 1
                self.padded_tokens += ids.numel()
        return out

    def fitness(self, z: np.ndarray, clean, perturbed, loss_type: str = "ce") -> float:
        from fedbpt.core.algorithm.search import eq7_fitness
        from fedbpt.core.models.scorer import loss_and_metrics

        lc, _ = loss_and_metrics(self.logits(z, clean)[None], clean.labels, loss_type)
        lp, _ = loss_and_metrics(self.logits(z, perturbed)[None], perturbed.labels, loss_type)
        return float(eq7_fitness(lc, lp)[0])


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def pycma_seconds(dim: int, popsize: int, iters: int, seed: int) -> float:
    """pycma's own time in one local search (ask/tell at d, full covariance), the objective being free."""
    from fedbpt.core.algorithm.search import GlobalState, local_search

    def objective(x):
        return (np.asarray(x) ** 2).sum(-1)

    _, t = timed(local_search, GlobalState(0, np.zeros(dim), 1.0), objective, popsize, iters, seed)
    return t


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="roberta-base")
    p.add_argument("--examples", type=int, default=40, help="client shard size (clean; the perturbed copy doubles it)")
    p.add_argument("--popsize", type=int, default=5)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32, help="the reference-style evaluator's batch size")
    p.add_argument(
        "--test_examples",
        type=int,
        default=192,
        help="time the reference's test-set evaluation on this many random test examples and scale to the whole "
        "set (its batches are in data order, so cost per example does not depend on which ones; 0: all)",
    )
    p.add_argument("--max_batch_tokens", type=int, default=32768)
    p.add_argument("--n_prompt_tokens", type=int, default=50)
    p.add_argument("--intrinsic_dim", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    p.add_argument("--model_dir", default=os.path.join("/tmp", "fedbpt-bench"), help="where shape models are cached")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scorer.json"))
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats per side (fastest used)")
    p.add_argument("--direct_round", action="store_true", help="also time one full round of each end to end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.examples, args.iters, args.batch_size, args.repeats) < 1 or args.popsize < 3:
        print("error: --examples, --iters, --batch_size, --repeats must be >= 1, --popsize >= 3", file=sys.stderr)
        return 2
    import torch
    import transformers  # noqa: F401  (imported before the baseline: the runtime, not the model)

    from fedbpt.core.algorithm.search import GlobalState, LocalObjective, concat, evaluate, local_search, perturb
    from fedbpt.core.data.splits import Examples
    from fedbpt.core.data.tasks import get_task
    from fedbpt.core.models.scorer import Scorer, plan_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started = time.time()
    info = {"machine": machine(), "torch": torch.__version__, "threads": threads, "shape": args.shape}
    print(f"# {args.shape}, {threads} torch threads, load {info['machine']['load']}", flush=True)
    rss_base = rss_bytes("VmRSS")

    model_path = build_shape_model(args.shape, args.model_dir, args.seed)
    peak_rss_reset()
    task = get_task("sst2")
    sc = Scorer(
        model_path,
        task,
        args.n_prompt_tokens,
        args.intrinsic_dim,
        "add",
        args.seed,
        1.0,
        "cpu",
        "fp32",
        args.max_batch_tokens,
    )
    rss_load_peak, rss_loaded = rss_bytes("VmHWM"), rss_bytes("VmRSS")
    cfg = sc.model.config
    layers, hidden, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    weight_bytes = 4 * sum(t.numel() for t in {id(q): q for q in sc.model.parameters()}.values())
    proj_bytes = sc.A_t.numel() * 4

    texts, labels, source = sst2_split("train", args.examples, seed=args.seed + 1)
    clean = sc.encode(Examples([(t,) for t in texts], np.asarray(labels)))
    pert = perturb(clean, 0.5, sc.ordinary_ids, np.random.default_rng(args.seed))
    both = concat(clean, pert)
    all_test, _, _ = sst2_split("validation")
    ttexts, tlabels, tsource = sst2_split("validation", args.test_examples or None, seed=args.seed + 2)
    test = sc.encode(Examples([(t,) for t in ttexts], np.asarray(tlabels)))
    test_scale = len(all_test) / len(ttexts)
    rng = np.random.default_rng(args.seed + 3)
    z_global = rng.standard_normal(args.intrinsic_dim) * 0.5
    gen = z_global + rng.standard_normal((args.popsize, args.intrinsic_dim))
    ref = ReferenceStyle(sc, args.batch_size)
    objective = LocalObjective(sc.label_logits, clean, "ce", pert)

    plan = plan_batches(both.lengths, args.popsize, args.max_batch_tokens, sc.pass_overhead_tokens)
    largest = max(plan, key=lambda b: len(b) * both.lengths[b].max())
    rows, longest = args.popsize * len(largest), int(both.lengths[largest].max())
    act_bytes = 4 * rows * (longest * (hidden + 2 * inter) + args.n_prompt_tokens * hidden)
    gen_flops = args.popsize * encoder_flops(both.lengths, layers, hidden, inter)
    real_tokens = args.popsize * int(both.lengths.sum())
    ours_padded = args.popsize * sum(len(b) * int(both.lengths[b].max()) for b in plan)

    # warm up kernels and allocator on a small call, then measure
    sc.label_logits(gen[:1], _first(clean, 4))
    ref.logits(gen[0], _first(clean, 4))
    ref.passes = ref.padded_tokens = 0

    def ours_generation() -> float:
        _, t = timed(objective, gen)
        return t

    def reference_generation() -> float:
        t0 = time.perf_counter()
        for c in range(len(gen)):
            ref.fitness(gen[c], clean, pert)
        return time.perf_counter() - t0

    # ours and reference-style alternate (order flipped every repeat) with matmul between: other processes' load
    # drifts over minutes, and each side's fastest repeat is the least disturbed one
    matmul = [matmul_flops_per_s(torch)]
    print(f"matmul {matmul[0] / GB:.1f} GFLOP/s; generation = {len(gen)} candidates x {len(both)} examples", flush=True)
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    peaks: dict[str, int] = {"ours": 0, "reference": 0}
    rss_ours_after = 0
    for rep in range(args.repeats):
        for who in ("ours", "reference") if rep % 2 == 0 else ("reference", "ours"):
            peak_rss_reset()
            ref.padded_tokens = 0
            times[who].append(ours_generation() if who == "ours" else reference_generation())
            peaks[who] = max(peaks[who], rss_bytes("VmHWM"))
            if who == "ours":
                rss_ours_after = rss_bytes("VmRSS")
            else:
                ref_padded = ref.padded_tokens
            print(f"  {who}: {times[who][-1]:.1f}s", flush=True)
        matmul.append(matmul_flops_per_s(torch))
    t_gen, t_ref_gen = min(times["ours"]), min(times["reference"])
    rss_ours, rss_ref = peaks["ours"], peaks["reference"]
    print("round parts...", flush=True)

    # the rest of a round
    _, t_eval = timed(evaluate, sc.label_logits, z_global, clean, "ce")
    _, t_final = timed(objective, z_global[None])
    t_cma = pycma_seconds(args.intrinsic_dim, args.popsize, args.iters, args.seed)
    ref.passes = ref.padded_tokens = 0
    _, t_ref_test_measured = timed(ref.logits, z_global, test)
    t_ref_test = t_ref_test_measured * test_scale
    matmul.append(matmul_flops_per_s(torch))
    ours_round = t_eval + args.iters * t_gen + t_final + t_cma
    ref_round = t_ref_test + args.iters * t_ref_gen + t_cma

    direct = {}
    if args.direct_round:
        print("direct rounds...", flush=True)
        state = GlobalState(0, z_global, 1.0)

        def ours_direct():
            evaluate(sc.label_logits, z_global, clean, "ce")
            local_search(state, objective, args.popsize, args.iters, args.seed + 9)

        def ref_direct():
            ref.logits(z_global, test)
            local_search(
                state,
                lambda x: np.array([ref.fitness(v, clean, pert) for v in x]),
                args.popsize,
                args.iters,
                args.seed + 9,
            )

        _, direct["ours_round_s"] = timed(ours_direct)
        _, direct["reference_round_s"] = timed(ref_direct)
        direct["ratio"] = direct["reference_round_s"] / direct["ours_round_s"]

    mm = float(np.median(matmul))
    ours_fps, ref_fps = gen_flops / t_gen, gen_flops / t_ref_gen
    limit_bytes = 1.2 * (weight_bytes + proj_bytes + act_bytes)
    results = {
        **info,
        "data": {
            "train": source,
            "test": tsource,
            "examples": len(clean),
            "test_examples_timed": len(test),
            "test_examples_total": len(all_test),
        },
        "settings": {
            "popsize": args.popsize,
            "iters": args.iters,
            "batch_size": args.batch_size,
            "max_batch_tokens": args.max_batch_tokens,
            "n_prompt_tokens": args.n_prompt_tokens,
            "intrinsic_dim": args.intrinsic_dim,
            "mean_len": float(both.lengths.mean()),
            "test_mean_len": float(test.lengths.mean()),
        },
        "matmul_gflops": [m / GB for m in matmul],
        "generation": {
            "ours_s": t_gen,
            "reference_s": t_ref_gen,
            "ours_s_all": times["ours"],
            "reference_s_all": times["reference"],
            "ours_candidates_per_s": len(gen) / t_gen,
            "reference_candidates_per_s": len(gen) / t_ref_gen,
            "speedup": t_ref_gen / t_gen,
            "real_tokens": real_tokens,
            "ours_padded_tokens": ours_padded,
            "ours_passes": len(plan),
            "reference_padded_tokens": ref_padded,
            "encoder_gflop": gen_flops / GB,
            "ours_gflops": ours_fps / GB,
            "reference_gflops": ref_fps / GB,
            "ours_fraction_of_matmul": ours_fps / mm,
            "reference_fraction_of_matmul": ref_fps / mm,
        },
        "memory": {
            "rss_before_model_gb": rss_base / GB,
            "rss_after_load_gb": rss_loaded / GB,
            "rss_peak_loading_gb": rss_load_peak / GB,
            "rss_peak_ours_gb": rss_ours / GB,
            "rss_after_ours_gb": rss_ours_after / GB,
            "rss_peak_reference_gb": rss_ref / GB,
            "fp32_weights_gb": weight_bytes / GB,
            "projection_A_gb": proj_bytes / GB,
            "activations_largest_pass_gb": act_bytes / GB,
            "largest_pass": [rows, longest],
            "ours_peak_minus_runtime_over_budget": (rss_ours - rss_base) / (weight_bytes + proj_bytes + act_bytes),
            "ours_peak_over_budget": rss_ours / (weight_bytes + proj_bytes + act_bytes),
            "target_bytes_gb": limit_bytes / GB,
        },
        "round": {
            "ours_s": ours_round,
            "reference_s": ref_round,
            "ratio": ref_round / ours_round,
            "parts": {
                "ours_eval_global_s": t_eval,
                "ours_final_fitness_s": t_final,
                "generation_ours_s": t_gen,
                "generation_reference_s": t_ref_gen,
                "reference_test_eval_s": t_ref_test,
                "reference_test_eval_measured_s": t_ref_test_measured,
                "pycma_s": t_cma,
            },
            "direct": direct or None,
        },
        "seconds_total": time.time() - started,
        "load_after": os.getloadavg(),
    }
    print_table(results)
    write_json(args.out, results)
    sc.close()
    return 0


def _first(enc, n: int):
    from fedbpt.core.models.scorer import Encoded

    return Encoded(enc.ids[:n], enc.text_mask[:n], enc.mask_pos[:n], enc.labels[:n])


def print_table(r: dict) -> None:
    g, m, rd = r["generation"], r["memory"], r["round"]
    rows = [
        ("candidates/s, ours", f"{g['ours_candidates_per_s']:.3f}", ""),
        ("candidates/s, reference-style", f"{g['reference_candidates_per_s']:.3f}", ""),
        ("per-candidate speedup", f"{g['speedup']:.2f}x", ">= 1x"),
        ("encoder GFLOP/s, ours", f"{g['ours_gflops']:.1f}", ""),
        ("encoder GFLOP/s, reference-style", f"{g['reference_gflops']:.1f}", ""),
        ("torch.matmul GFLOP/s (median)", f"{np.median(r['matmul_gflops']):.1f}", ""),
        ("fraction of matmul, ours", f"{100 * g['ours_fraction_of_matmul']:.0f}%", ">= 60%"),
        ("fraction of matmul, reference-style", f"{100 * g['reference_fraction_of_matmul']:.0f}%", ""),
        ("padded / real tokens, ours", f"{g['ours_padded_tokens'] / g['real_tokens']:.3f}", ""),
        ("padded / real tokens, reference-style", f"{g['reference_padded_tokens'] / g['real_tokens']:.3f}", ""),
        ("peak RSS scoring, ours (GB)", f"{m['rss_peak_ours_gb']:.2f}", ""),
        ("  runtime before model: python, torch, transformers (GB)", f"{m['rss_before_model_gb']:.2f}", ""),
        ("  fp32 weights + A + activations (GB)", f"{m['target_bytes_gb'] / 1.2:.2f}", ""),
        ("  (peak - runtime) / that", f"{m['ours_peak_minus_runtime_over_budget']:.2f}", "<= 1.2"),
        ("  peak / that", f"{m['ours_peak_over_budget']:.2f}", "<= 1.2"),
        ("generation s (5 candidates), ours / reference-style", f"{g['ours_s']:.1f} / {g['reference_s']:.1f}", ""),
        (
            f"reference test eval s ({r['data']['test_examples_timed']} of {r['data']['test_examples_total']} timed)",
            f"{rd['parts']['reference_test_eval_measured_s']:.1f} -> {rd['parts']['reference_test_eval_s']:.1f}",
            "",
        ),
        ("round s, ours (one client)", f"{rd['ours_s']:.1f}", ""),
        ("round s, reference-style client", f"{rd['reference_s']:.1f}", ""),
        ("per-round ratio", f"{rd['ratio']:.2f}x", ">= 1.3x"),
    ]
    if rd["direct"]:
        d = rd["direct"]
        rows.append(("direct round s ours / reference", f"{d['ours_round_s']:.1f} / {d['reference_round_s']:.1f}", ""))
        rows.append(("direct per-round ratio", f"{d['ratio']:.2f}x", ">= 1.3x"))
    width = max(len(a) for a, _, _ in rows)
    print(f"\n| {'measure'.ljust(width)} | value | target |\n|{'-' * (width + 2)}|---|---|")
    for a, b, c in rows:
        print(f"| {a.ljust(width)} | {b} | {c} |")
    print(f"\n{r['shape']}, {r['threads']} threads, {r['machine']['cpu']}, load {r['machine']['load']}")


if __name__ == "__main__":
    sys.exit(main())
