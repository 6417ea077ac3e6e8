"""Tiny random causal LMs (Llama, GPT-2, Gemma-2 shapes) with a byte-level BPE tokenizer, for offline checks.

They are not language models: the weights are random. They let the causal scorer's exactness claims (prompt
injection, key/value cache, padding, reduced head) be tested against the plain model in milliseconds, on the
same architectures real checkpoints use. Saved to a folder and loaded back through ``from_pretrained``, as a
real model is. Deterministic in (arch, seed, add_bos).
"""

from __future__ import annotations

import os

import numpy as np

ENDOFTEXT = "<|endoftext|>"
BOS = "<s>"
WORDS = (
    "the film is a of and to it movie story with that but its too great bad funny dull charming performances "
    "director script characters never good terrible world sports business tech company school artist athlete "
    "politician transport building nature village animal plant album film book yes no maybe it was article topic "
    "category question answer does this imply mean same thing both sentences or"
).split()
ARCHS = ("llama", "gpt2", "gemma2")


def _corpus(label_words: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(3, 20, size=400)]
    # every label word many times after a space, so that " word" becomes one token
    return lines + [" ".join([" " + w] * 30) for w in label_words] * 30


def build_tokenizer(label_words: list[str], seed: int = 0, add_bos: bool = False, vocab_size: int = 600):
    """A byte-level BPE tokenizer (GPT-2 style, ``<|endoftext|>``); ``add_bos`` adds a ``<s>`` that the
    tokenizer puts in front of every text (Llama-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [ENDOFTEXT] + ([BOS] if add_bos else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(label_words, seed), trainer=trainer)
    if add_bos:
        bos_id = tk.token_to_id(BOS)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS if add_bos else ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
    )


def build_tiny_causal(out_dir: str, arch: str = "llama", seed: int = 0, add_bos: bool = False) -> str:
    """Build (once) and save a tiny random causal LM of ``arch`` and its tokenizer; returns ``out_dir``."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        GPT2Config,
        LlamaConfig,
    )
    from transformers.utils import logging as hf_logging

    from fedbpt.core.data.tasks import TASKS

    hf_logging.disable_progress_bar()
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    label_words = sorted({w for t in TASKS.values() if t.causal for w in t.causal.label_words})
    tok = build_tokenizer(label_words, seed, add_bos)
    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    elif arch == "gemma2":  # final logit soft-capping: logits are not lm_head(hidden); the scorer must notice
        config = Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            sliding_window=512,
            final_logit_softcapping=2.0,
            **common,
        )
    else:
        raise ValueError(f"unknown arch {arch}: use one of {ARCHS}")
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / np.sqrt(32)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm weights (Gemma's are stored as offsets from 1)
                p.fill_(0.0 if arch == "gemma2" else 1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
