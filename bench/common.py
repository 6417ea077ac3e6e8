"""Shared pieces of the benchmarks: offline real-shape random models and SST-2 text.

No pretrained weights can be downloaded here, and speed does not depend on the weights' values, so the
benchmarks use a randomly initialised model of a real architecture's shape. Its tokenizer is fedbpt.research.tiny's
byte-level BPE trained on the SST-2 training sentences; the model's embedding matrix still has the real
vocabulary's 50,265 rows, so embedding and LM-head sizes (and the weight bytes) are those of the real model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SST2_DIR = os.path.join(ROOT, "..", "shared", "data", "sst2")
ROBERTA_VOCAB = 50265
SHAPES = {
    "roberta-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "roberta-large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}


def synthetic_sentences(n: int, seed: int) -> list[str]:
    """Deterministic stand-in for SST-2 when the data is absent: word counts drawn like SST-2's (3-50 words)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [
        "the", "film", "is", "a", "of", "and", "to", "it", "movie", "story", "with", "that", "but", "its", "too",
        "great", "bad", "funny", "dull", "charming", "performances", "director", "script", "characters", "never",
    ]  # fmt: skip
    lengths = np.clip(rng.gamma(2.0, 5.0, size=n).astype(int) + 2, 2, 50)
    return [" ".join(rng.choice(words, size=k)) for k in lengths]


def sst2_split(split: str, n: int | None = None, seed: int = 0) -> tuple[list[str], list[int], str]:
    """(sentences, labels, source) from ../shared/data/sst2, or the synthetic fallback."""
    import numpy as np

    path = os.path.join(SST2_DIR, f"{split}.jsonl")
    if os.path.isfile(path):
        rows = [json.loads(line) for line in open(path)]
        texts, labels, source = [r["sentence"] for r in rows], [int(r["label"]) for r in rows], f"sst2/{split}"
    else:
        m = n or (872 if split == "validation" else 20000)
        texts = synthetic_sentences(m, seed=1 if split == "validation" else 0)
        labels = np.random.default_rng(seed + 5).integers(0, 2, size=m).tolist()
        source = "synthetic (../shared/data/sst2 absent)"
    if n is not None and n < len(texts):
        idx = np.random.default_rng(seed).choice(len(texts), size=n, replace=False)
        texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    return texts, labels, source


def build_shape_model(shape: str, cache_dir: str, seed: int = 0) -> str:
    """A random-weight RoBERTa MLM of ``shape`` saved with an SST-2 BPE tokenizer; built once, then reused."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    from fedbpt.core.data.tasks import get_task
    from fedbpt.research.tiny import build_tiny_model

    texts, _, source = sst2_split("train")
    label_words = get_task("sst2").label_words
    key = hashlib.sha256(json.dumps([shape, SHAPES[shape], source, len(texts), seed]).encode()).hexdigest()[:12]
    out = os.path.join(cache_dir, f"{shape}-random-{key}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".shape-", dir=cache_dir)
    try:
        # fedbpt.research.tiny's BPE, trained on the SST-2 sentences with room for RoBERTa's vocabulary size
        tok_dir = build_tiny_model(os.path.join(tmp, "tok"), texts, label_words, seed, vocab_size=ROBERTA_VOCAB)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        config = RobertaConfig(
            vocab_size=ROBERTA_VOCAB,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **SHAPES[shape],
        )
        torch.manual_seed(seed)
        model = RobertaForMaskedLM(config)
        model.save_pretrained(os.path.join(tmp, "model"))
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
        os.rename(os.path.join(tmp, "model"), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def peak_rss_reset() -> None:
    """Reset the kernel's high-water mark of this process's resident set (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_bytes(field: str = "VmHWM") -> int:
    """VmHWM (peak since the last reset) or VmRSS (now), in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def write_json(path: str, data) -> None:
    """Write a result file atomically (write, then rename): a killed benchmark leaves no half-written result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


def save_figure(fig, path: str) -> None:
    """Write a benchmark's figure (its folder made if needed) and free it: matplotlib keeps open figures alive."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
