"""The black-box scorer for causal LMs (Llama, GPT-2, SmolLM2, ...): the same interface as scorer.Scorer.

Input of one example, by prompt placement: ``front`` (the paper's Llama setting, and BBT's) ``[start] P_1..P_n
template tokens``; ``after_input`` ``[start] text part P_1..P_n cue``, where the template is the text part followed by
the cue (" It was", see tasks.CausalPrompt.split). Either way the template ends where the label word would follow,
and the scores are the label words' next-token logits at the last position. The prompt enters through the public
``inputs_embeds`` argument, so no model code is hooked or patched.

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

After the input, the keys and values of ``[start] text part`` do not depend on the candidate (a causal model's
earlier positions never see later ones): they are computed once per example and every candidate runs only its n
prompt rows and the cue's tokens, attending to them (exactly; what an LLM server's prefix cache does for requests
that share their input):
- :meth:`CausalScorer.hold` keeps them for every later call (a site's clean train and dev shards for the run, the
  perturbed copy for a round), keyed by the example's tokens and counted, within ``HOLD_BUDGET_BYTES``;
- examples not held (the test set) are encoded in chunks of at most ``pass_tokens`` text tokens per call, each
  chunk scored for all candidates and freed before the next, so no more than one chunk's cache lives at once;
- a pass stacks its examples' caches right-padded to the longest; the pad slots are masked out (2-D attention
  mask over cache and new tokens) and each row's new tokens get position ids continuing after its own text.
``Encoded.ids`` then hold the text part's tokens (what perturbation may change); the cue is the scorer's.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np

from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import TaskSpec
from fedbpt.core.models.scorer import (
    MAX_SEQ_LEN,
    Encoded,
    PromptScorer,
    load_model,
    plan_batches,
    render,
    text_token_mask,
)
from fedbpt.errors import ConfigError, opt

log = logging.getLogger(__name__)

# A pass holds every layer's keys and values for all its rows at once (the prefix's and its own), unlike a pass
# without a cache, which frees each layer's. Passes are capped so that this stays within the budget: SmolLM2-135M
# keeps 45 KB per token (fp32), so 256 MiB is about 5,800 tokens, well above the ~2,000 where CPU passes get
# efficient; a client shard's generation (5 candidates x 10-40 sentences) fits in one or two passes.
KV_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 8 << 30}
# After-input placement: the text keys/values held across calls (a site's clean shards and the round's perturbed
# copy). SmolLM2: 512 MiB is about 11,600 text tokens, some 800 SST-2 training sentences; beyond it the rest is
# encoded per call, as the test set is.
HOLD_BUDGET_BYTES = {"cpu": 512 << 20, "cuda": 16 << 30}
ENDOFTEXT = "<|endoftext|>"


def load_causal_model(
    model_path: str, device: str, attn_implementation: str = "sdpa", precision: str = "fp32"
) -> tuple:
    """scorer.load_model for a causal LM (the loader PromptScorer calls)."""
    return load_model(model_path, device, attn_implementation, kind="causal", precision=precision)


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


def sliding_window(config) -> int | None:
    """The model's attention window, if it has one (Gemma-2, Mistral): None when every layer sees everything."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def count_fitting(
    tokenizer, config, task: TaskSpec, examples: Examples, n_prompt_tokens: int, placement: str = "front"
) -> int:
    """How many examples CausalScorer.encode keeps, from the tokenizer and model config alone (preflight)."""
    template, total, cue_len = task.causal.template, max_length(config), 0
    if placement == "after_input":
        template, cue = task.causal.split()
        total = min(total, sliding_window(config) or total)
        cue_len = len(tokenizer(cue, add_special_tokens=False)["input_ids"])
    limit = total - (start_token_id(tokenizer) is not None) - n_prompt_tokens - cue_len
    kept = 0
    for values in examples.texts:
        text, _ = render(template, task.text_columns, values)
        kept += 0 < len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit
    return kept


class CausalScorer(PromptScorer):
    """Scores candidate z vectors on encoded examples through a frozen causal LM (interface of scorer.Scorer).

    ``cat_or_add``: cat puts P in front of the text (the paper's causal form); add adds P to the embeddings of n
    placeholder tokens (ids 1000.. as the masked scorer's) in the same place. ``label_encoding``: space (default
    here) scores " word", which must be one token; bare scores the first token of the word without a space.
    ``prompt_placement``: front (default) or after_input (see the module docstring).
    """

    load = staticmethod(load_causal_model)
    default_mode = "cat"
    default_label_encoding = "space"
    placements = ("front", "after_input")
    kv_cache = True  # False: every row carries [start] P itself (the reference path for tests and benchmarks)

    def check_task(self, task: TaskSpec) -> None:
        if task.causal is None:
            raise ConfigError(
                f"task {task.name} has no causal template (TaskSpec.causal): add one in fedbpt/core/data/tasks.py"
            )

    def build(self) -> None:
        tok = self.tokenizer
        self.start_id = start_token_id(tok)
        self.n_start = int(self.start_id is not None)
        self.pad_id = next(i for i in (tok.pad_token_id, self.start_id, 0) if i is not None)
        self.max_len = max_length(self.model.config)
        self.after_input = self.placement == "after_input"
        if self.after_input:
            self.template, cue = self.task.causal.split()
            self.cue_ids = np.asarray(tok(cue, add_special_tokens=False)["input_ids"], dtype=np.int64)
            # a pass's pads sit between a row's text and its new tokens: within the window they change nothing
            self.max_len = min(self.max_len, sliding_window(self.model.config) or self.max_len)
            self.prefix_len = self.n_start  # a row of the model: prefix_len rows, the ids, suffix_len rows
            self.suffix_len = self.n_prompt + len(self.cue_ids)
        else:
            self.template = self.task.causal.template
            self.cue_ids = np.zeros(0, dtype=np.int64)
            self.prefix_len = self.n_start + self.n_prompt
            self.suffix_len = 0
        self._held: dict[bytes, list] = {}  # tokens -> [holds, keys/values (layers, 2, kv heads, length, head dim)]
        self._held_total = 0
        self._full_logged = False

        self.base = self.model.base_model
        params = inspect.signature(self.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._keep_kw = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.label_head = self._label_head()
        self.kv_bytes_per_token, uniform = self._probe()
        if self.after_input and not uniform:
            raise ConfigError(
                f"{type(self.model).__name__} has layers of different key/value shapes: use "
                f"{opt('prompt_placement')} front"
            )
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
        head = torch.nn.Linear(self.hidden, len(self.label_ids), bias=bias is not None)
        head = head.to(self.device, full.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(full.weight[self.label_ids])
            if bias is not None:
                head.bias.copy_(bias[self.label_ids])
        return head.requires_grad_(False)

    def _probe(self) -> tuple[int, bool]:
        """Check the reduced head against the full model on a short seeded input (a model whose logits are more
        than lm_head(last hidden state), e.g. with logit soft-capping, falls back to the model's own logits at the
        kept positions); measure the key/value bytes one cached token takes, and whether every layer's keys and
        values have one shape (after_input stacks them)."""
        torch = self.torch
        gen = torch.Generator().manual_seed(0)
        ids = self.ordinary_ids[torch.randint(len(self.ordinary_ids), (8,), generator=gen).numpy()]
        x = torch.as_tensor(ids[None], device=self.device)
        with torch.inference_mode():
            e = self.embed(x)
            full = self.model(inputs_embeds=e, use_cache=False).logits[:, -1, self.label_ids].float()
            cache = self._new_cache()
            out = self.base(inputs_embeds=e, use_cache=True, **{self._cache_kw: cache})
            if self.label_head is not None:
                reduced = self.label_head(out.last_hidden_state[:, -1]).float()
                if (reduced - full).abs().max() > 1e-3 * (1.0 + full.abs().max()):
                    log.warning("label head disagrees with %s's logits: scoring with the full model", type(self.model))
                    self.label_head = None
        tensors = list(self._layer_tensors(cache))
        size = sum(t.numel() * t.element_size() for t in tensors)
        uniform = len(tensors) == 2 * len(cache.layers) and len({t.shape for t in tensors}) == 1
        return max(1, size // x.shape[1]), uniform

    def _new_cache(self, data=None):
        from transformers import DynamicCache

        return DynamicCache(data, config=self.model.config)

    @staticmethod
    def _layer_tensors(cache):
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                if t is not None:
                    yield t

    def prompt_rows(self, z: np.ndarray):
        """(C, d) -> (C, n, h): each candidate's prompt rows as the model takes them (add: on the placeholders)."""
        p = self.prompts(z)
        if self.mode == "add":
            placeholders = self.embed(self.torch.as_tensor(self.placeholder_ids[None], device=self.device))
            p = placeholders.to(p.dtype) + p
        return p.to(self.embed.weight.dtype)

    def prefix_embeds(self, z: np.ndarray):
        """(C, d) -> (C, prefix_len, h): the start token's embedding and the prompt rows of each candidate."""
        torch = self.torch
        p = self.prompt_rows(z)
        parts = []
        if self.start_id is not None:
            parts.append(self.embed(torch.tensor([[self.start_id]], device=self.device)).expand(len(p), -1, -1))
        parts.append(p)
        return torch.cat(parts, dim=1)

    def suffix_embeds(self, z: np.ndarray):
        """(C, d) -> (C, suffix_len, h): after the input, each candidate's prompt rows and then the cue."""
        torch = self.torch
        p = self.prompt_rows(z)
        cue = self.embed(torch.as_tensor(self.cue_ids[None], device=self.device)).expand(len(p), -1, -1)
        return torch.cat([p, cue], dim=1)

    # ---- encoding -------------------------------------------------------------------------------------
    def encode(self, examples: Examples) -> Encoded:
        """Tokenise the filled template (after_input: its text part) without special tokens (the start token, the
        prompt and the cue are the scorer's); examples longer than the limit with them (512 tokens, as the masked
        scorer) are dropped."""
        tok, task = self.tokenizer, self.task
        ids, text_masks, last, keep = [], [], [], []
        for i, values in enumerate(examples.texts):
            text, spans = render(self.template, task.text_columns, values)
            enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
            x = np.asarray(enc["input_ids"], dtype=np.int64)
            if len(x) == 0 or len(x) + self.prefix_len + self.suffix_len > self.max_len:
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
        self.queries += c_total * n_ex
        if self.after_input:
            with self.torch.inference_mode():
                self._after_input_logits([(self.suffix_embeds(z), out)], enc)
            return out
        lengths = enc.lengths + self.prefix_len  # what a row holds in the cache: its own tokens and the prefix
        c_chunk = max(1, min(c_total, self.pass_tokens // int(lengths.max())))
        cached = self.kv_cache and self.prefix_len > 0
        with torch.inference_mode():
            for c0 in range(0, c_total, c_chunk):
                pre = self.prefix_embeds(z[c0 : c0 + c_chunk])
                cc = len(pre)
                if cached:
                    prefix_cache = self._new_cache()
                    self.base(inputs_embeds=pre, use_cache=True, **{self._cache_kw: prefix_cache})
                    self.tokens += pre.shape[0] * pre.shape[1]
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
                    self.tokens += cc * b * (width + (0 if cached else self.prefix_len))
                    out[c0 : c0 + cc, idx] = scores.float().view(cc, b, -1).cpu().numpy()
        return out

    def _scores(self, embeds, last, position_ids=None, cache=None, attention_mask=None):
        """(rows, num_labels) label logits at positions ``last`` of each row."""
        torch = self.torch
        kw = {"inputs_embeds": embeds, "use_cache": cache is not None}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
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

    # ---- after the input: the text's keys and values, once per example -------------------------------
    def _text_len(self, enc: Encoded, j: int) -> int:
        return int(enc.lengths[j]) + self.n_start

    def _text_kv(self, enc: Encoded, idx: np.ndarray) -> dict:
        """example -> keys/values of its ``[start] text part``, (layers, 2, kv heads, length, head dim).

        Right-padded passes without an attention mask: a causal model's real positions never see the pads after
        them, so their keys and values are those of the example alone.
        """
        torch = self.torch
        lengths = enc.lengths[idx] + self.n_start
        out = {}
        for part in plan_batches(lengths, 1, self.pass_tokens, self.pass_overhead_tokens):
            sel, lens = idx[part], lengths[part]
            ids = np.full((len(sel), int(lens.max())), self.pad_id, dtype=np.int64)
            if self.n_start:
                ids[:, 0] = self.start_id
            for r, j in enumerate(sel):
                ids[r, self.n_start : lens[r]] = enc.ids[j]
            x = torch.from_numpy(ids).to(self.device)
            cache = self._new_cache()
            self.base(inputs_embeds=self.embed(x), use_cache=True, **{self._cache_kw: cache})
            self.tokens += x.numel()
            for r, j in enumerate(sel):
                out[int(j)] = torch.stack(
                    [
                        torch.stack((layer.keys[r, :, : lens[r]], layer.values[r, :, : lens[r]]))
                        for layer in cache.layers
                    ]
                )
            del cache
        return out

    def hold(self, enc: Encoded) -> int:
        """After the input: keep the text keys/values of ``enc``'s examples for every later call (keyed by their
        tokens, each hold counted), within HOLD_BUDGET_BYTES; returns the bytes added. Examples beyond the budget
        are still scored, their text encoded per call."""
        if not self.after_input or len(enc) == 0:
            return 0
        budget = HOLD_BUDGET_BYTES.get(self.device.type, HOLD_BUDGET_BYTES["cuda"])
        todo, planned = [], self._held_total
        for j, x in enumerate(enc.ids):
            key = x.tobytes()
            if key in self._held:
                self._held[key][0] += 1
                continue
            size = self._text_len(enc, j) * self.kv_bytes_per_token
            fits = planned + size <= budget
            self._held[key] = [1, None]  # None: counted but not kept (over the budget)
            if fits:
                todo.append(j)
                planned += size
        skipped = len(enc) - len(todo)
        if skipped and not self._full_logged and planned + self.kv_bytes_per_token > budget:
            self._full_logged = True
            log.info("text key/value store full (%d MB): some examples are encoded per call", budget >> 20)
        added = 0
        if todo:
            with self.torch.inference_mode():
                kv = self._text_kv(enc, np.asarray(todo, dtype=np.int64))
            for j, t in kv.items():
                self._held[enc.ids[j].tobytes()][1] = t
                added += t.numel() * t.element_size()
        self._held_total += added
        return added

    def release(self, enc: Encoded) -> None:
        """Undo one :meth:`hold` of ``enc``: an example's keys/values go when no hold is left."""
        for x in enc.ids:
            entry = self._held.get(x.tobytes())
            if entry is None:
                continue
            entry[0] -= 1
            if entry[0] <= 0:
                del self._held[x.tobytes()]
                if entry[1] is not None:
                    self._held_total -= entry[1].numel() * entry[1].element_size()

    @property
    def held_bytes(self) -> int:
        return self._held_total

    def close(self) -> None:
        self._held.clear()
        self._held_total = 0

    def label_logits_with_bare(self, z: np.ndarray, enc: Encoded) -> tuple[np.ndarray, np.ndarray | None]:
        """After the input: label_logits(z, enc) and the template's own label logits (the cue right after the text,
        no prompt rows), (N, num_labels), from one encoding of each text."""
        if not self.after_input:
            return super().label_logits_with_bare(z, enc)
        z = np.atleast_2d(z)
        out = np.zeros((len(z), len(enc), len(self.label_ids)), dtype=np.float32)
        bare = np.zeros((1, len(enc), len(self.label_ids)), dtype=np.float32)
        if len(enc):
            self.queries += (len(z) + 1) * len(enc)
            with self.torch.inference_mode():
                cue = self.embed(self.torch.as_tensor(self.cue_ids[None], device=self.device))
                self._after_input_logits([(self.suffix_embeds(z), out), (cue, bare)], enc)
        return out, bare[0]

    def _after_input_logits(self, passes: list, enc: Encoded) -> None:
        """Fill each ``out`` of ``passes`` [(new tokens (C, m, h), out (C, N, labels))] after the input: held examples
        from their kept keys/values, the others encoded in chunks of at most ``pass_tokens`` text tokens, each chunk
        scored for every pass and freed before the next."""
        stored = [self._held.get(x.tobytes()) for x in enc.ids]
        held = np.array([j for j, e in enumerate(stored) if e is not None and e[1] is not None], dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(enc)), held)
        if len(held):
            for new, out in passes:
                self._score_from_text(new, enc, held, lambda j: stored[j][1], out)
        rest = rest[np.argsort(-enc.lengths[rest], kind="stable")]
        while len(rest):
            room = np.cumsum(enc.lengths[rest] + self.n_start) <= self.pass_tokens
            chunk, rest = rest[: max(1, int(room.sum()))], rest[max(1, int(room.sum())) :]
            kv = self._text_kv(enc, chunk)
            for new, out in passes:
                self._score_from_text(new, enc, chunk, kv.__getitem__, out)
            del kv

    def _score_from_text(self, new, enc: Encoded, idx: np.ndarray, text_kv, out: np.ndarray) -> None:
        """Run the new tokens ``new`` (C, m, h) of every candidate on the examples ``idx``, attending to their
        text keys/values ``text_kv(j)``; fill ``out[:, idx]``.

        A pass stacks its examples' keys/values right-padded to the longest text (width), repeated per candidate
        (row = c * b + example). The 2-D attention mask covers the cache and the new tokens, zero on the pads; each
        row's new tokens take positions after its own text, so positions and attention are those of the row alone.
        """
        torch = self.torch
        m = new.shape[1]
        text = enc.lengths[idx] + self.n_start
        rows = text + m  # what a row holds in the cache
        c_total = len(new)
        c_chunk = max(1, min(c_total, self.pass_tokens // int(rows.max())))
        last = torch.full((1,), m - 1, device=self.device)
        for c0 in range(0, c_total, c_chunk):
            part = new[c0 : c0 + c_chunk]
            cc = len(part)
            for batch in plan_batches(rows, cc, self.pass_tokens, self.pass_overhead_tokens):
                sel, lens = idx[batch], text[batch]
                b, width = len(sel), int(lens.max())
                first = text_kv(int(sel[0]))  # (layers, 2, kv heads, length, head dim)
                kv = first.new_zeros(first.shape[:2] + (b, first.shape[2], width, first.shape[4]))
                for r, j in enumerate(sel):
                    kv[:, :, r, :, : lens[r]] = text_kv(int(j))
                lens_t = torch.as_tensor(lens, device=self.device)
                pos = (lens_t[:, None] + torch.arange(m, device=self.device)).repeat(cc, 1)
                mask = None
                if int(lens.min()) < width:
                    mask = torch.ones((b, width + m), dtype=torch.long, device=self.device)
                    mask[:, :width] = torch.arange(width, device=self.device) < lens_t[:, None]
                    mask = mask.repeat(cc, 1)
                cache = self._new_cache((layer[0].repeat(cc, 1, 1, 1), layer[1].repeat(cc, 1, 1, 1)) for layer in kv)
                del kv
                emb = part.repeat_interleave(b, dim=0)
                scores = self._scores(emb, last.expand(cc * b), pos, cache, mask)
                del cache
                self.tokens += cc * b * m
                out[c0 : c0 + cc, sel] = scores.float().view(cc, b, -1).cpu().numpy()
