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

from fedbpt.core.models import TINY_NAME
from fedbpt.errors import ConfigError

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


def materialize(cfg: dict) -> dict:
    """``cfg`` with its research inputs built and named by path, so no site needs this package's research code.

    ``--model_name tiny-random`` becomes the folder of the tiny model built from the task's training texts;
    ``--task_name planted`` (which needs tiny-random) also points ``data_dir`` at the synthetic task's data. Both
    are deterministic and built once in ``model_cache_dir`` (default: the user's fedbpt model cache). Anything
    else is returned unchanged.
    """
    from fedbpt.core.models import model_cache_dir
    from fedbpt.core.tasks import PLANTED

    cache = cfg["model_cache_dir"] or model_cache_dir()
    if cfg["task_name"] == PLANTED:
        from fedbpt.research.planted import ensure_bundle

        if cfg["model_name"] != TINY_NAME and not _is_bundle(cfg):
            raise ConfigError("--task_name planted builds its own model: use --model_name tiny-random")
        if cfg["model_name"] == TINY_NAME:
            bundle = ensure_bundle(cfg, cache)
            return dict(cfg, model_name=bundle.model_dir, data_dir=bundle.data_dir)
        return cfg
    if cfg["model_name"] != TINY_NAME:
        return cfg
    from fedbpt.core.data import load_split
    from fedbpt.core.tasks import get_task

    task = get_task(cfg["task_name"])
    texts = [" ".join(t) for t in load_split(task, "train", cfg["data_dir"]).texts]
    key = tiny_model_key(texts, task.label_words, cfg["seed"], 2000)
    path = build_tiny_model(os.path.join(cache, f"{TINY_NAME}-{task.name}-{key}"), texts, task.label_words, cfg["seed"])
    return dict(cfg, model_name=path)


def _is_bundle(cfg: dict) -> bool:
    """A planted config already materialized: model and data are the two halves of one built bundle."""
    model, data = cfg["model_name"], cfg["data_dir"] or ""
    root = os.path.dirname(os.path.abspath(model))
    return os.path.isfile(os.path.join(root, "meta.json")) and os.path.dirname(os.path.abspath(data)) == root
