"""A tiny random RoBERTa masked LM and BPE tokenizer for smoke runs and offline checks.

It is not a language model: its weights are random. It exists so the whole pipeline (tokenizer, template,
prompt injection, federation) runs where no pretrained model can be downloaded. The model is saved to a
folder and loaded back through the same ``from_pretrained`` path a real model takes.

Weights use a larger init (about 1/sqrt(hidden)) than RoBERTa's 0.02: at 0.02 a random model ignores the
prompt entirely (measured in shared/notes/planted-task.md), which would make every smoke run vacuous.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable

import numpy as np

TINY_DEFAULTS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_VERSION = 2  # 2: label words boosted without a leading space too (a cached version-1 model lacks them)
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def tiny_model_key(texts: list[str], label_words: Iterable[str], seed: int, vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([TINY_VERSION, seed, vocab_size, sorted(label_words), TINY_DEFAULTS]).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_tiny_model(
    out_dir: str, texts: list[str], label_words: Iterable[str], seed: int, vocab_size: int = 2000
) -> str:
    """Build (once) and save a tiny random RoBERTa MLM with a BPE tokenizer trained on ``texts``.

    Deterministic in (texts, label_words, seed). Written to a temporary folder and renamed into place, so
    concurrent builders (one per simulated client process) never see a half-written model.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AddedToken, RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    label_words = list(label_words)
    bpe = ByteLevelBPETokenizer()
    # Repeating every label word in both forms makes " word" and "word" single tokens, as the scorer requires under
    # --label_encoding space and bare. Newlines split "word\nword" into bare pieces and add no merges of their own.
    boost = [" ".join([" " + w] * 50) for w in label_words] * 50
    boost += ["\n".join([w] * 50) for w in label_words] * 50
    bpe.train_from_iterator(
        list(texts) + boost, vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=SPECIAL_TOKENS
    )
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    tokenizer = RobertaTokenizerFast(
        vocab=model_json["vocab"], merges=merges, mask_token=AddedToken("<mask>", lstrip=True, rstrip=False)
    )
    hidden = TINY_DEFAULTS["hidden_size"]
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=1.0 / np.sqrt(hidden),
        **TINY_DEFAULTS,
    )
    model = RobertaForMaskedLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif "LayerNorm" in name or "layer_norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * config.initializer_range)
    model.tie_weights()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # job.py's error and progress lines stay one line each
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process won the race; its model is identical
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
