"""A client's memory, measured against core.memory's arithmetic: RoBERTa-large's shape in fp32 and bf16 on the CPU.

    python -m bench.memory                       # roberta-large shape: fp32 and bf16 loads, fp32 passes (minutes)
    python -m bench.memory --shape roberta-base

Each measurement runs in a fresh process (a process's peak resident set cannot be lowered again): the libraries
imported (torch, transformers, NVFlare: what every client process holds), then the scorer built (weights in their
dtype and the projection A), then one generation scored in passes of ``--pass_tokens`` tokens. The peak resident
set after each step, above the one after the imports, is printed beside core.memory's estimate (weights in their
dtype, A, the pass). Weights load memory-mapped from safetensors: they count once a pass has read them. bf16 is
only loaded: this CPU has no bfloat16 units and runs its matmuls about 200x slower, so a bf16 pass would take
hours; its activations are the fp32 ones at half the width (2 bytes a value), by the same arithmetic. Results go to
``--out`` (JSON) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import SHAPES, build_shape_model, rss_bytes, sst2_split, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20


def measure(model: str, precision: str, pass_tokens: int, n_prompt: int, d: int, examples: int) -> dict:
    """In this (fresh) process: RSS after the imports, after the scorer, after a pass; and the estimate."""
    out = {"precision": precision, "pass_tokens": pass_tokens}
    import numpy as np
    import nvflare  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(2)
    out["imports"] = rss_bytes("VmHWM")
    from fedbpt.core.data.splits import Examples
    from fedbpt.core.data.tasks import get_task
    from fedbpt.core.models.scorer import Scorer

    sc = Scorer(model, get_task("sst2"), n_prompt, d, "add", seed=1, precision=precision, max_batch_tokens=pass_tokens)
    out["scorer"] = rss_bytes("VmHWM")
    out["scorer_rss"] = rss_bytes("VmRSS")  # after the load's transients (an fp32 file cast to bf16 is read whole)
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in sc.model.parameters())
    out["projection_bytes"] = sc.A_t.numel() * sc.A_t.element_size()
    if pass_tokens:
        texts, labels, _ = sst2_split("train", examples, seed=0)
        enc = sc.encode(Examples([(t,) for t in texts], np.asarray(labels)))
        z = np.random.default_rng(0).standard_normal((5, d))
        sc.label_logits(z, enc)
        out["pass"] = rss_bytes("VmHWM")
        out["tokens_scored"] = int(enc.lengths.sum()) * 5
    sc.close()
    return out


def estimate(model: str, precision: str, pass_tokens: int, n_prompt: int, d: int) -> dict:
    from transformers import AutoConfig

    from fedbpt.core import memory
    from fedbpt.core.config import RunConfig

    cfg = RunConfig.build(
        precision=precision,
        max_batch_tokens=pass_tokens or RunConfig.model_fields["max_batch_tokens"].default,
        n_prompt_tokens=n_prompt,
        intrinsic_dim=d,
    )
    needs = memory.estimate(cfg, memory.model_shape(model, AutoConfig.from_pretrained(model)), "masked", 0)
    return {"weights": needs.weights, "projection": needs.projection, "activations": needs.activations}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="roberta-large")
    p.add_argument("--model_dir", default="/tmp/fedbpt-bench")
    p.add_argument("--pass_tokens", type=int, nargs="+", default=[512, 2048], help="fp32 pass sizes to measure")
    p.add_argument("--n_prompt_tokens", type=int, default=50)
    p.add_argument("--intrinsic_dim", type=int, default=500)
    p.add_argument("--examples", type=int, default=8, help="SST-2 sentences scored by 5 candidates")
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    p.add_argument("--child", nargs=2, metavar=("PRECISION", "PASS_TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model = build_shape_model(args.shape, args.model_dir)
    if args.child:
        precision, tokens = args.child[0], int(args.child[1])
        row = measure(model, precision, tokens, args.n_prompt_tokens, args.intrinsic_dim, args.examples)
        row["estimate"] = estimate(model, precision, tokens, args.n_prompt_tokens, args.intrinsic_dim)
        print(json.dumps(row))
        return 0
    runs = [("fp32", t) for t in args.pass_tokens] + [("bf16", 0)]
    rows = []
    for precision, tokens in runs:
        cmd = [sys.executable, "-m", "bench.memory", "--shape", args.shape, "--model_dir", args.model_dir]
        cmd += ["--n_prompt_tokens", str(args.n_prompt_tokens), "--intrinsic_dim", str(args.intrinsic_dim)]
        cmd += ["--examples", str(args.examples), "--child", precision, str(tokens)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{precision} pass {tokens}: done", flush=True)
    write_json(args.out, {"shape": args.shape, "model": model, "rows": rows})
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        "| precision | pass tokens | imports (RSS) | scorer built: peak / resident after | "
        "peak with a pass, above the imports: measured / estimated (weights + A + pass) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["estimate"]
        load = f"{(r['scorer'] - r['imports']) / MIB:,.0f} / {(r['scorer_rss'] - r['imports']) / MIB:,.0f} MiB"
        est = (e["weights"] + e["projection"] + e["activations"]) / MIB
        pas = f"{(r['pass'] - r['imports']) / MIB:,.0f} / {est:,.0f} MiB" if "pass" in r else "-"
        head = f"| {r['precision']} | {r['pass_tokens'] or '-'} | {r['imports'] / MIB:,.0f} MiB"
        lines.append(f"{head} | {load} | {pas} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
