"""The black-box scorer for causal LMs (Llama, GPT-2, SmolLM2, ...): the same interface as scorer.Scorer.

Input of one example: ``[start] P_1..P_n  template tokens``; the template ends where the label word would follow,
and the scores are the label words' next-token logits at the last real position (the paper's Llama setting).
The prompt enters through the public ``inputs_embeds`` argument, so no model code is hooked or patched.

Start token: the tokenizer's BOS when the tokenizer itself adds one (Llama-2 style), else ``<|endoftext|>`` when the
vocabulary has it (GPT-2, SmolLM2: its ``bos_token`` is the chat marker ``<|im_start|>`` and it adds nothing), else
the EOS token, else none. A document separator is what such models saw before a fresh text in pre-training;
measured on SmolLM2 SST-2 it is worth about 2 points over no start token.

Speed, exactly (the logits do not change beyond float rounding):
- the prefix ``[start] P`` is the same for every example of a candidate: its key/value cache is computed once per
  candidate (one short pass for all candidates of a chunk) and repeated across the batch; the examples' passes
  run only their own tokens, position ids continuing after the prefix;
- right padding: a causal model never attends to later positions, so pad tokens after the last real token change
  nothing before it, and no attention mask is needed; the last real position is gathered;
- only that position goes through the LM head, and only the label-word rows of it.
``Encoded.ids`` therefore hold the example's own tokens only (not the start token or prompt) and ``mask_pos`` is the
last real position within them.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np

from fedbpt.core.data import Examples
from fedbpt.core.scorer import (
    MAX_SEQ_LEN,
    Encoded,
    PromptScorer,
    load_model,
    plan_batches,
    render,
    text_token_mask,
)
from fedbpt.core.tasks import TaskSpec
from fedbpt.errors import ConfigError

log = logging.getLogger(__name__)

# A pass holds every layer's keys and values for all its rows at once (the prefix's and its own), unlike a pass
# without a cache, which frees each layer's. Passes are capped so that this stays within the budget: SmolLM2-135M
# keeps 45 KB per token (fp32), so 256 MiB is about 5,800 tokens, well above the ~2,000 where CPU passes get
# efficient; a client shard's generation (5 candidates x 10-40 sentences) fits in one or two passes.
KV_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 8 << 30}
ENDOFTEXT = "<|endoftext|>"


def load_causal_model(model_path: str, device: str, attn_implementation: str = "sdpa") -> tuple:
    """scorer.load_model for a causal LM (the loader PromptScorer calls)."""
    return load_model(model_path, device, attn_implementation, kind="causal")


def start_token_id(tokenizer) -> int | None:
    """The token in front of the prompt (see the module docstring for the rule and why)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
        return int(bos)
    vocab = tokenizer.get_vocab()
    if ENDOFTEXT in vocab:
        return int(vocab[ENDOFTEXT])
    return None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)


def max_length(config) -> int:
    """Positions the model takes (at most MAX_SEQ_LEN, as the masked scorer)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(MAX_SEQ_LEN, int(limit)) if limit else MAX_SEQ_LEN


def count_fitting(tokenizer, config, task: TaskSpec, examples: Examples, n_prompt_tokens: int) -> int:
    """How many examples CausalScorer.encode keeps, from the tokenizer and model config alone (preflight)."""
    limit = max_length(config) - (start_token_id(tokenizer) is not None) - n_prompt_tokens
    kept = 0
    for values in examples.texts:
        text, _ = render(task.causal.template, task.text_columns, values)
        kept += 0 < len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit
    return kept


class CausalScorer(PromptScorer):
    """Scores candidate z vectors on encoded examples through a frozen causal LM (interface of scorer.Scorer).

    ``cat_or_add``: cat puts P in front of the text (the paper's causal form); add adds P to the embeddings of n
    placeholder tokens (ids 1000.. as the masked scorer's) in the same place. ``label_encoding``: space (default
    here) scores " word", which must be one token; bare scores the first token of the word without a space.
    """

    load = staticmethod(load_causal_model)
    default_mode = "cat"
    default_label_encoding = "space"
    kv_cache = True  # False: every row carries [start] P itself (the reference path for tests and benchmarks)

    def check_task(self, task: TaskSpec) -> None:
        if task.causal is None:
            raise ConfigError(
                f"task {task.name} has no causal template (TaskSpec.causal): add one in fedbpt/core/tasks.py"
            )

    def build(self) -> None:
        self.template = self.task.causal.template
        tok = self.tokenizer
        self.start_id = start_token_id(tok)
        self.prefix_len = (self.start_id is not None) + self.n_prompt
        self.pad_id = next(i for i in (tok.pad_token_id, self.start_id, 0) if i is not None)
        self.max_len = max_length(self.model.config)

        self.base = self.model.base_model
        params = inspect.signature(self.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._keep_kw = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.label_head = self._label_head()
        self.kv_bytes_per_token = self._probe()
        kv_cap = KV_BUDGET_BYTES.get(self.device.type, KV_BUDGET_BYTES["cuda"]) // max(1, self.kv_bytes_per_token)
        self.pass_tokens = int(max(1, min(self.max_batch_tokens, kv_cap)))

    def label_words(self) -> tuple[str, ...]:
        return self.task.causal.label_words

    # ---- model plumbing -------------------------------------------------------------------------------
    def _label_head(self):
        """A Linear holding only the label-word rows of the LM head (and its bias, if it has one); None when the
        model has no separate base model, whose outputs the head could take."""
        torch = self.torch
        full = self.model.get_output_embeddings()
        if full is None or self.base is self.model:
            return None
        bias = getattr(full, "bias", None)
        head = torch.nn.Linear(self.hidden, len(self.label_ids), bias=bias is not None).to(self.device)
        with torch.no_grad():
            head.weight.copy_(full.weight[self.label_ids])
            if bias is not None:
                head.bias.copy_(bias[self.label_ids])
        return head.requires_grad_(False)

    def _probe(self) -> int:
        """Check the reduced head against the full model on a short seeded input (a model whose logits are more
        than lm_head(last hidden state), e.g. with logit soft-capping, falls back to the model's own logits at the
        kept positions) and measure the key/value bytes one cached token takes."""
        torch = self.torch
        gen = torch.Generator().manual_seed(0)
        ids = self.ordinary_ids[torch.randint(len(self.ordinary_ids), (8,), generator=gen).numpy()]
        x = torch.as_tensor(ids[None], device=self.device)
        with torch.inference_mode(), self._autocast():
            e = self.embed(x)
            full = self.model(inputs_embeds=e, use_cache=False).logits[:, -1, self.label_ids].float()
            cache = self._new_cache()
            out = self.base(inputs_embeds=e, use_cache=True, **{self._cache_kw: cache})
            if self.label_head is not None:
                reduced = self.label_head(out.last_hidden_state[:, -1]).float()
                if (reduced - full).abs().max() > 1e-3 * (1.0 + full.abs().max()):
                    log.warning("label head disagrees with %s's logits: scoring with the full model", type(self.model))
                    self.label_head = None
        size = sum(t.numel() * t.element_size() for t in self._layer_tensors(cache))
        return max(1, size // x.shape[1])

    def _new_cache(self, data=None):
        from transformers import DynamicCache

        return DynamicCache(data, config=self.model.config)

    @staticmethod
    def _layer_tensors(cache):
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                if t is not None:
                    yield t

    def prefix_embeds(self, z: np.ndarray):
        """(C, d) -> (C, prefix_len, h): the start token's embedding and the prompt rows of each candidate."""
        torch = self.torch
        p = self.prompts(z)
        c = len(p)
        parts = []
        if self.start_id is not None:
            parts.append(self.embed(torch.tensor([[self.start_id]], device=self.device)).expand(c, -1, -1))
        if self.mode == "add":
            placeholders = self.embed(torch.as_tensor(self.placeholder_ids[None], device=self.device))
            p = placeholders.to(p.dtype) + p
        parts.append(p.to(self.embed.weight.dtype))
        return torch.cat(parts, dim=1)

    # ---- encoding -------------------------------------------------------------------------------------
    def encode(self, examples: Examples) -> Encoded:
        """Tokenise the filled template without special tokens (the start token belongs to the shared prefix);
        examples longer than the limit with the prefix (512 tokens, as the masked scorer) are dropped."""
        tok, task = self.tokenizer, self.task
        ids, text_masks, last, keep = [], [], [], []
        for i, values in enumerate(examples.texts):
            text, spans = render(self.template, task.text_columns, values)
            enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
            x = np.asarray(enc["input_ids"], dtype=np.int64)
            if len(x) == 0 or len(x) + self.prefix_len > self.max_len:
                continue
            ids.append(x)
            text_masks.append(text_token_mask(text, enc["offset_mapping"], spans))
            last.append(len(x) - 1)
            keep.append(i)
        dropped = len(examples) - len(keep)
        if dropped:
            log.info("dropped %d of %d examples longer than %d tokens", dropped, len(examples), self.max_len)
        return Encoded(ids, text_masks, np.asarray(last, dtype=np.int64), examples.labels[keep], dropped)

    # ---- scoring --------------------------------------------------------------------------------------
    def _padded(self, enc: Encoded, idx: np.ndarray):
        """Right-padded ids (b, longest) of the examples ``idx``; the pads sit after every real token."""
        longest = int(enc.lengths[idx].max())
        ids = np.full((len(idx), longest), self.pad_id, dtype=np.int64)
        for r, j in enumerate(idx):
            ids[r, : enc.lengths[j]] = enc.ids[j]
        return self.torch.from_numpy(ids).to(self.device)

    def label_logits(self, z: np.ndarray, enc: Encoded) -> np.ndarray:
        """Label-word next-token logits at the last real position, (C, N, num_labels) float32, for C candidates
        z (C, d) or one z (d,)."""
        torch = self.torch
        z = np.atleast_2d(z)
        c_total, n_ex = len(z), len(enc)
        out = np.zeros((c_total, n_ex, len(self.label_ids)), dtype=np.float32)
        if n_ex == 0:
            return out
        lengths = enc.lengths + self.prefix_len  # what a row holds in the cache: its own tokens and the prefix
        c_chunk = max(1, min(c_total, self.pass_tokens // int(lengths.max())))
        cached = self.kv_cache and self.prefix_len > 0
        with torch.inference_mode(), self._autocast():
            for c0 in range(0, c_total, c_chunk):
                pre = self.prefix_embeds(z[c0 : c0 + c_chunk])
                cc = len(pre)
                if cached:
                    prefix_cache = self._new_cache()
                    self.base(inputs_embeds=pre, use_cache=True, **{self._cache_kw: prefix_cache})
                    prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
                for idx in plan_batches(lengths, cc, self.pass_tokens, self.pass_overhead_tokens):
                    ids = self._padded(enc, idx)
                    b, width = ids.shape
                    emb = self.embed(ids).repeat(cc, 1, 1)  # candidate-major: row = c * b + example
                    last = torch.as_tensor(enc.mask_pos[idx], device=self.device).repeat(cc)
                    if cached:
                        cache = self._new_cache(prefix_kv)
                        cache.batch_repeat_interleave(b)
                        pos = torch.arange(self.prefix_len, self.prefix_len + width, device=self.device)
                        scores = self._scores(emb, last, pos.expand(cc * b, -1), cache)
                    else:
                        full = torch.cat([pre.repeat_interleave(b, dim=0), emb], dim=1)
                        scores = self._scores(full, last + self.prefix_len)
                    out[c0 : c0 + cc, idx] = scores.float().view(cc, b, -1).cpu().numpy()
        return out

    def _scores(self, embeds, last, position_ids=None, cache=None):
        """(rows, num_labels) label logits at positions ``last`` of each row."""
        torch = self.torch
        kw = {"inputs_embeds": embeds, "use_cache": cache is not None}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        if cache is not None:
            kw[self._cache_kw] = cache
        rows = torch.arange(len(embeds), device=self.device)
        if self.label_head is not None:
            hidden = self.base(**kw).last_hidden_state
            return self.label_head(hidden[rows, last])
        if self._keep_kw:
            keep, where = torch.unique(last, return_inverse=True)
            return self.model(**kw, logits_to_keep=keep).logits[rows, where][:, self.label_ids]
        return self.model(**kw).logits[rows, last][:, self.label_ids]
