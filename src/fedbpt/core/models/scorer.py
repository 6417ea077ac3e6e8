"""The black-box scorer: a frozen masked LM, the random projection A, and prompt injection.

Only label-word logits at the mask position leave this module. The prompt P = A z (n x h) enters through a
forward hook on the model's embeddings block (word + position + type embeddings, LayerNorm), so any Hugging Face
masked LM with a word-embedding module inside an embeddings block works (RoBERTa, BERT, ...); no model code is
copied or patched. Two modes:

- add (default): the input is ``<s>``, n placeholder tokens, the template, ``</s>``; P is added to the block's
  output at positions 1..n (the placeholders' own embeddings stay underneath).
- cat (the reference and BBT): the input carries no placeholders; P is concatenated in front of the block's output
  for the whole sequence (before ``<s>``) and the attention mask gets n ones in front. The text keeps the position
  ids the model derives from its own tokens (RoBERTa: 2, 3, ... from ``<s>`` on; BERT: 0, 1, ...); the prompt rows
  get no position or token-type embedding and no LayerNorm. The model sequence is n rows longer than the ids.

In both modes ``Encoded.mask_pos`` is the mask's row in the model's sequence (the ids' position + n).

Label words (``label_encoding``): bare (default, as the reference and BBT) takes the first token of the word without
a leading space, warning once when the word splits; space takes the space-prefixed word, which must be one token.

Speed: a whole CMA-ES generation (and its perturbed twin) is scored in few forward passes within the token
budget; examples are sorted by length and cut into passes that minimise padded tokens plus a fixed cost per
pass (:func:`plan_batches`), each padded to its own longest sequence; only the hidden state at the mask goes
through the LM head, whose decoder is cut down to the label-word rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import string
from dataclasses import dataclass, field

import numpy as np

from fedbpt.core.data.splits import Examples, hub_unreachable
from fedbpt.core.data.tasks import TaskSpec
from fedbpt.errors import ConfigError, opt

log = logging.getLogger(__name__)

MAX_SEQ_LEN = 512
PLACEHOLDER_START = 1000  # the reference uses token ids 1000..1000+n-1 as prompt placeholders
# A forward pass costs a fixed amount on top of its tokens (Python and kernel launches, small-GEMM inefficiency):
# splitting a length group off pays only when it saves more padded tokens than that. The fixed cost is about
# PASS_OVERHEAD_FLOP of model work, never less than PASS_OVERHEAD_TOKENS[device type]. On 2 CPU cores at
# roberta-base's shape, passes under ~2,000 tokens ran at half the per-token speed of larger ones (measured).
PASS_OVERHEAD_FLOP = 5e8
PASS_OVERHEAD_TOKENS = {"cpu": 1024, "cuda": 4096}
_MODEL_CACHE: dict[tuple, tuple] = {}
_PROJECTION_CACHE: dict[tuple, object] = {}
_SPLIT_WARNED: set[tuple] = set()  # (tokenizer, word): a split label word is reported once per process


@dataclass
class Encoded:
    """Tokenised examples. ``text_mask`` marks ordinary text tokens: the only ones perturbation may replace.

    ``lengths`` counts the ids; in cat mode the model sees the scorer's n prompt rows in front of them as well
    (``Scorer.extra_rows``), and ``mask_pos`` is the mask's row in that model sequence.
    """

    ids: list[np.ndarray]
    text_mask: list[np.ndarray]
    mask_pos: np.ndarray
    labels: np.ndarray
    dropped: int = 0
    order: np.ndarray = field(init=False)
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)
        # longest first, so the first batch shows the peak memory at once
        self.order = np.argsort(-self.lengths, kind="stable")

    def __len__(self) -> int:
        return len(self.labels)

    def with_ids(self, ids: list[np.ndarray]) -> Encoded:
        return Encoded(ids, self.text_mask, self.mask_pos, self.labels, self.dropped)


def check_model_source(model_path: str) -> None:
    """Refuse, with one line, a model folder that does not exist or a hub id while the hub is unreachable."""
    if os.path.isdir(model_path):
        return
    if os.path.sep in model_path or model_path.startswith("."):
        raise ConfigError(
            f"model directory {model_path} does not exist: fix {opt('model_name')}, or use {opt('model_name')} "
            "tiny-random"
        )
    why = hub_unreachable()
    if why:
        raise ConfigError(
            f"cannot load model '{model_path}' from the Hugging Face hub: {why}; pass {opt('model_name')} with a local "
            f"model directory, or {opt('model_name')} tiny-random (or --config configs/tiny.yaml) for an offline "
            "smoke run"
        )


PRECISIONS = ("fp32", "bf16", "fp16")  # the dtype the weights are loaded in
LOSS_TYPES = ("ce", "hinge", "perf")  # example_losses
PROMPT_MODES = ("add", "cat")  # --cat_or_add: prompt added at placeholder positions, or concatenated in front
LABEL_ENCODINGS = ("bare", "space")  # label_token_ids
PLACEMENTS = ("front", "after_input")  # where the prompt goes; after_input: causal LMs only (causal.CausalScorer)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # transformers' attn_implementation values the scorers load with


def load_model(
    model_path: str, device: str, attn_implementation: str = "sdpa", kind: str = "masked", precision: str = "fp32"
) -> tuple:
    """Tokenizer and frozen LM (``kind`` masked or causal), its weights loaded in ``precision`` (half the memory in
    bf16/fp16), once per process and shared by every scorer of it (executors may be rebuilt; the process stays)."""
    key = (model_path, device, attn_implementation, kind, precision)
    if key not in _MODEL_CACHE:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        auto = {"masked": AutoModelForMaskedLM, "causal": AutoModelForCausalLM}[kind]
        hf_logging.disable_progress_bar()
        check_model_source(model_path)
        where = "local folder" if os.path.isdir(model_path) else "Hugging Face hub id"
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = auto.from_pretrained(
                model_path, attn_implementation=attn_implementation, dtype=weight_dtype(torch, precision)
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load {kind} LM '{model_path}' ({where}): {str(exc).splitlines()[0][:160]}; "
                f"pass {opt('model_name')} with a local model directory, or {opt('model_name')} tiny-random for a "
                "smoke run"
            ) from None
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"model '{model_path}' has no fast tokenizer: FedBPT needs offsets to find the text")
        model.eval().requires_grad_(False).to(device)
        _MODEL_CACHE[key] = (tokenizer, model)
    return _MODEL_CACHE[key]


def weight_dtype(torch, precision: str):
    """The torch dtype of ``precision`` (fp32, bf16, fp16)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def render(
    template: str, columns: tuple[str, ...], values: tuple[str, ...], mask: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Fill the template (``{mask}`` becomes ``mask``); return the string and the character spans of the inserted
    text values: the only characters that perturbation may touch."""
    fields = dict(zip(columns, values))
    out, spans, pos = [], [], 0
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        pos += len(literal)
        if name is None:
            continue
        if name == "mask" and mask is not None:
            value = mask
        elif name in fields:
            value = fields[name]
            spans.append((pos, pos + len(value)))
        else:
            raise ConfigError(f"template field '{{{name}}}' is not a text column ({', '.join(columns)})")
        out.append(value)
        pos += len(value)
    return "".join(out), spans


def text_token_mask(text: str, offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for tokens that lie inside an inserted text value. A byte-level token's offsets may include the space
    in front of it (GPT-2, SmolLM2: " it" starts at the space); that space is ignored, so the first word of a value
    counts as text even when the template puts a space before it."""
    mask = np.zeros(len(offsets), dtype=bool)
    for i, (a, b) in enumerate(offsets):
        while a < b and text[a].isspace():
            a += 1
        mask[i] = b > a and any(s <= a and b <= e for s, e in spans)
    return mask


def projection(n: int, hidden: int, d: int, std: float, seed: int, device, cache_key: tuple | None = None):
    """A^T, (d, n*h), A with N(0, std^2) entries drawn from a torch generator seeded with ``seed``: every site
    rebuilds the same A. Cached per process under ``cache_key`` (A is 25.6M floats at roberta-large's shape, and
    a RuntimePool holds one scorer per site)."""
    import torch

    key = cache_key + (n, hidden, d, seed, std) if cache_key is not None else None
    if key is not None and key in _PROJECTION_CACHE:
        return _PROJECTION_CACHE[key]
    gen = torch.Generator().manual_seed(seed)
    a_t = (torch.randn((n * hidden, d), generator=gen) * std).t().contiguous().to(device)
    if key is not None:
        _PROJECTION_CACHE[key] = a_t
    return a_t


def label_token_ids(tokenizer, words: tuple[str, ...], encoding: str = "bare") -> list[int]:
    """The token id of each label word: its logit at the mask is the word's score.

    bare (the reference and BBT): ``tokenizer.encode(word, add_special_tokens=False)[0]``, the word without a
    leading space; a word that splits gives its first piece, as the reference silently does, with one warning.
    space: the space-prefixed word, which must be a single token. Two words on one id are refused.
    """
    ids = []
    for word in words:
        if encoding == "bare":
            pieces = tokenizer.encode(word, add_special_tokens=False)
            if not pieces:
                raise ConfigError(f"label word '{word}' encodes to no token: use a non-empty label word")
            if len(pieces) > 1:
                key = (getattr(tokenizer, "name_or_path", id(tokenizer)), word)
                if key not in _SPLIT_WARNED:
                    _SPLIT_WARNED.add(key)
                    log.warning(
                        "label word '%s' is %d tokens for this tokenizer; using its first piece '%s' (as the "
                        "reference does); pass --label_encoding space to score the space-prefixed word as one token",
                        word,
                        len(pieces),
                        tokenizer.decode([pieces[0]]),
                    )
        elif encoding == "space":
            pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ConfigError(
                    f"label word '{word}' is {len(pieces)} tokens for this tokenizer: FedBPT needs single-token label "
                    f"words with {opt('label_encoding')} space; use a model whose vocabulary has ' {word}' as one "
                    "token, or "
                    f"{opt('label_encoding')} bare"
                )
        else:
            raise ConfigError(f"unknown {opt('label_encoding')} {encoding}: use bare or space")
        ids.append(int(pieces[0]))
    for j, tid in enumerate(ids):
        first = ids.index(tid)
        if first != j:
            raise ConfigError(
                f"label words '{words[first]}' and '{words[j]}' are both token {tid} "
                f"('{tokenizer.decode([tid])}') with {opt('label_encoding')} {encoding}: use distinct label words, "
                "or the "
                f"other {opt('label_encoding')}"
            )
    return ids


class PromptScorer:
    """What every scorer shares: its options, the frozen model, the label-word ids, the token sets perturbation and
    placeholders draw from, the cost of a forward pass, and the projection A.

    Subclasses give the model loader and ``label_words`` (the task's words for their kind of model), and score.
    ``queries`` (examples x candidates scored) and ``tokens`` (positions the model computed, padding included) count
    what a black-box user would pay for; callers read their differences around a piece of work.
    """

    load = staticmethod(load_model)  # (model_path, device, attn_implementation, precision) -> (tokenizer, model)
    default_mode = "add"  # cat_or_add when None
    default_label_encoding = "bare"  # label_encoding when None
    placements = ("front",)  # prompt placements the scorer implements; the first is the default

    def __init__(
        self,
        model_path: str,
        task: TaskSpec,
        n_prompt_tokens: int = 50,
        intrinsic_dim: int = 500,
        cat_or_add: str | None = None,
        seed: int = 1234,
        sigma: float = 1.0,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch_tokens: int = 32768,
        attn_implementation: str = "sdpa",
        label_encoding: str | None = None,
        prompt_placement: str | None = None,
        cached_projection: tuple | None = None,
    ) -> None:
        """``cached_projection``: (A^T, its std) from the site's set-up cache (core.site.cache, whose key covers
        everything that decides A), used instead of drawing A again."""
        import torch

        prompt_placement = prompt_placement or self.placements[0]
        if prompt_placement not in self.placements:
            raise ConfigError(
                f"{opt('prompt_placement')} {prompt_placement} is not available for {type(self).__name__}: use "
                f"{' or '.join(self.placements)} (after_input needs a causal LM)"
            )
        self.placement = prompt_placement
        self.queries = 0
        self.tokens = 0
        self.check_task(task)
        cat_or_add = cat_or_add or self.default_mode
        label_encoding = label_encoding or self.default_label_encoding
        if cat_or_add not in ("add", "cat"):
            raise ConfigError(f"unknown {opt('cat_or_add')} {cat_or_add}: use add or cat")
        self.torch = torch
        self.task = task
        self.n_prompt = n_prompt_tokens
        self.d = intrinsic_dim
        self.mode = cat_or_add
        self.label_encoding = label_encoding
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown {opt('precision')} {precision}: use {', '.join(PRECISIONS)}")
        self.precision = precision  # the weights' dtype; A and A z stay fp32, cast once to the embeddings' dtype
        self.tokenizer, self.model = self.load(model_path, device, attn_implementation, precision=precision)
        self.check_model(model_path)
        tok = self.tokenizer
        self.label_ids = label_token_ids(tok, tuple(self.label_words()), label_encoding)

        self.embed = self.model.get_input_embeddings()
        self.hidden = self.embed.weight.shape[1]
        special = set(tok.all_special_ids)
        vocab = len(tok)
        start = PLACEHOLDER_START if PLACEHOLDER_START + n_prompt_tokens <= vocab else len(special)
        self.placeholder_ids = np.arange(start, start + n_prompt_tokens, dtype=np.int64)
        self.ordinary_ids = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
        # ~2 FLOPs per weight per token outside the embedding table: what one padded token costs
        weights = sum(p.numel() for p in self.model.parameters()) - self.embed.weight.numel()
        self.pass_overhead_tokens = int(
            max(PASS_OVERHEAD_TOKENS.get(self.device.type, 4096), PASS_OVERHEAD_FLOP / max(1, 2 * weights))
        )
        # Projection A, (n*h) x d, N(0, std) with std = std_hat / (sqrt(d) * sigma), std_hat over the word-embedding
        # matrix (causal LMs too: Llama has no position embeddings, GPT-2's are not in it): the same on every site.
        # Kept as A^T (d, n*h): z @ A^T is one matmul per generation.
        if cached_projection is not None:
            a_t, self.proj_std = cached_projection
            if tuple(a_t.shape) != (intrinsic_dim, n_prompt_tokens * self.hidden):
                raise ValueError(f"cached projection has shape {tuple(a_t.shape)}, not ({intrinsic_dim}, n*h)")
            self.A_t = torch.as_tensor(a_t).to(self.device)
        else:
            std_hat = float(self.embed.weight.detach().float().std())
            self.proj_std = std_hat / (np.sqrt(intrinsic_dim) * sigma)
            self.A_t = projection(
                n_prompt_tokens, self.hidden, intrinsic_dim, self.proj_std, seed, self.device, (model_path, str(device))
            )
        self.build()

    def build(self) -> None:
        """The subclass's own setup, once the shared part above is done."""

    def check_task(self, task: TaskSpec) -> None:
        """Refuse a task this scorer has no prompt for (before the model loads)."""

    def label_words(self) -> tuple[str, ...]:
        return self.task.label_words

    def check_model(self, model_path: str) -> None:
        """Refuse a model this scorer cannot read (one line naming the fix)."""

    def close(self) -> None:
        """Release what the scorer attached to the (process-cached, shared) model."""

    def hold(self, enc: Encoded) -> int:
        """Keep what scoring ``enc``'s examples needs from the model beyond the prompt, for every later call; returns
        the bytes it added. Nothing here (the prompt comes first, so nothing is independent of it)."""
        return 0

    def release(self, enc: Encoded) -> None:
        """Undo one :meth:`hold` of ``enc``."""

    @property
    def held_bytes(self) -> int:
        """Bytes kept by :meth:`hold`."""
        return 0

    def label_logits_with_bare(self, z: np.ndarray, enc: Encoded) -> tuple[np.ndarray, np.ndarray | None]:
        """label_logits(z, enc) and, where the placement lets one pass give it, the template's own label logits with
        no prompt rows (N, num_labels); None here: a scorer built with no prompt tokens gives them."""
        return self.label_logits(z, enc), None

    def prompts(self, z: np.ndarray):
        """(C, d) -> (C, n, h) prompt embeddings A z."""
        t = self.torch.as_tensor(np.atleast_2d(z), dtype=self.torch.float32, device=self.device)
        return (t @ self.A_t).view(t.shape[0], self.n_prompt, self.hidden)


class Scorer(PromptScorer):
    """Scores candidate z vectors on encoded examples through a frozen masked LM."""

    def build(self) -> None:
        torch = self.torch
        # rows the model sees beyond the ids: cat puts the n prompt rows in front of the embedding output
        self.extra_rows = self.n_prompt if self.mode == "cat" else 0
        self.embeddings_module = self._parent_of(self.embed)

        # BBT: the LM head's output bias is zero. Keep the full decoder for reference checks; score with a
        # decoder reduced to the label-word rows.
        full = self.model.get_output_embeddings()
        with torch.no_grad():
            if getattr(full, "bias", None) is not None:
                full.bias.zero_()
            head_bias = getattr(getattr(self.model, "lm_head", None), "bias", None)
            if head_bias is not None:
                head_bias.zero_()
        self.full_decoder = full
        self.label_decoder = torch.nn.Linear(self.hidden, len(self.label_ids)).to(self.device, full.weight.dtype)
        with torch.no_grad():
            self.label_decoder.weight.copy_(full.weight[self.label_ids])
            self.label_decoder.bias.zero_()  # a zero bias, not None: BERT's set_output_embeddings copies it
        self.label_decoder.requires_grad_(False)
        self.head = self._find_head(full)
        self._prompt = None
        self._hook = self.embeddings_module.register_forward_hook(self._inject)

    def check_model(self, model_path: str) -> None:
        if self.tokenizer.mask_token_id is None:
            raise ConfigError(f"model '{model_path}' has no mask token: FedBPT needs a masked LM")

    def close(self) -> None:
        """Detach the prompt hook from the (process-cached, shared) model."""
        self._hook.remove()

    # ---- model plumbing -------------------------------------------------------------------------------
    def _parent_of(self, module):
        for m in self.model.modules():
            if any(child is module for child in m.children()):
                return m
        raise ConfigError("cannot find the embeddings block of this model: use a BERT/RoBERTa-style masked LM")

    def _find_head(self, full_decoder):
        """The LM head module (e.g. RoBERTa's lm_head, BERT's cls), if it is one child holding the decoder."""
        base = getattr(self.model, self.model.base_model_prefix, None)
        heads = [m for _, m in self.model.named_children() if m is not base]
        if len(heads) == 1 and any(m is full_decoder for m in heads[0].modules()):
            return heads[0]
        return None

    @contextlib.contextmanager
    def _decoder(self, decoder):
        self.model.set_output_embeddings(decoder)
        try:
            yield
        finally:
            self.model.set_output_embeddings(self.full_decoder)

    def _inject(self, module, args, output):
        if self._prompt is None:
            return output
        p = self._prompt.to(output.dtype)
        if p.dim() == 2:
            p = p.expand(output.shape[0], -1, -1)
        n = self.n_prompt
        if self.mode == "add":
            return self.torch.cat([output[:, :1], output[:, 1 : 1 + n] + p, output[:, 1 + n :]], dim=1)
        return self.torch.cat([p, output], dim=1)  # cat: the whole sequence n rows longer, P before <s>

    def _model_mask(self, att):
        """The attention mask of the model's sequence from that of the ids: cat mode attends to its n prompt rows."""
        if att is None or not self.extra_rows:
            return att
        ones = self.torch.ones((att.shape[0], self.extra_rows), dtype=att.dtype, device=att.device)
        return self.torch.cat([ones, att], dim=1)

    @contextlib.contextmanager
    def prompt(self, rows):
        """Within the block every forward pass gets ``rows`` ((batch, n, h) or (n, h)) injected."""
        self._prompt = rows
        try:
            yield
        finally:
            self._prompt = None

    # ---- encoding -------------------------------------------------------------------------------------
    def encode(self, examples: Examples) -> Encoded:
        """Examples longer than MAX_SEQ_LEN with the prompt are dropped (see ``count_fitting``)."""
        tok, task = self.tokenizer, self.task
        ids, text_masks, mask_pos, keep = [], [], [], []
        for i, (values, _) in enumerate(zip(examples.texts, examples.labels)):
            text, spans = render(task.template, task.text_columns, values, tok.mask_token)
            enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
            x = np.asarray(enc["input_ids"], dtype=np.int64)
            if len(x) + self.n_prompt > MAX_SEQ_LEN:
                continue  # as the reference: inputs longer than 512 tokens are dropped
            offsets = enc["offset_mapping"]
            in_text = text_token_mask(text, offsets, spans)
            positions = np.flatnonzero(x == tok.mask_token_id)
            if len(positions) != 1:
                raise ConfigError(f"the encoded template of task {task.name} has {len(positions)} mask tokens, not 1")
            in_text &= x != tok.mask_token_id
            if self.mode == "add":
                x = np.concatenate([x[:1], self.placeholder_ids, x[1:]])
                in_text = np.concatenate([[False], np.zeros(self.n_prompt, dtype=bool), in_text[1:]])
            # add: n placeholders after <s>; cat: n prompt rows in front of <s>. Either way the mask is n rows on.
            ids.append(x)
            text_masks.append(in_text)
            mask_pos.append(positions[0] + self.n_prompt)
            keep.append(i)
        dropped = len(examples) - len(keep)
        if dropped:
            log.info("dropped %d of %d examples longer than %d tokens", dropped, len(examples), MAX_SEQ_LEN)
        return Encoded(ids, text_masks, np.asarray(mask_pos, dtype=np.int64), examples.labels[keep], dropped)

    # ---- scoring --------------------------------------------------------------------------------------
    def _padded(self, enc: Encoded, idx: np.ndarray):
        """(ids, attention mask of the model's sequence) of the examples ``idx``, padded right to their own longest.

        In cat mode the mask is n ones (the prompt rows) followed by the ids' mask.

        The mask is None when no row is padded: the model attends everywhere either way, and skipping the mask
        saves building and applying it (tiny model, eager attention, 80 x 40 tokens: 7.7 instead of 9.0 ms; no change
        with SDPA).
        """
        torch = self.torch
        longest = int(enc.lengths[idx].max())
        if int(enc.lengths[idx].min()) == longest:
            ids = np.stack([enc.ids[j] for j in idx]).astype(np.int64, copy=False)
            return torch.from_numpy(ids).to(self.device), None
        ids = np.full((len(idx), longest), self.tokenizer.pad_token_id, dtype=np.int64)
        att = np.zeros((len(idx), longest), dtype=np.int64)
        for r, j in enumerate(idx):
            ids[r, : enc.lengths[j]] = enc.ids[j]
            att[r, : enc.lengths[j]] = 1
        return torch.from_numpy(ids).to(self.device), self._model_mask(torch.from_numpy(att).to(self.device))

    def label_logits(self, z: np.ndarray, enc: Encoded) -> np.ndarray:
        """Label-word logits at the mask, shape (C, N, num_labels), for C candidates z (C, d) or one z (d,)."""
        torch = self.torch
        z = np.atleast_2d(z)
        c_total, n_ex = len(z), len(enc)
        out = np.zeros((c_total, n_ex, len(self.label_ids)), dtype=np.float32)
        if n_ex == 0:
            return out
        rows = enc.lengths + self.extra_rows  # the model's sequence lengths: the budget counts cat's prompt rows
        longest = int(rows.max())
        # candidates per pass: as many as fit the token budget with at least one example each
        c_chunk = max(1, min(c_total, self.max_batch_tokens // longest))
        self.queries += c_total * n_ex
        with torch.inference_mode():
            for c0 in range(0, c_total, c_chunk):
                p = self.prompts(z[c0 : c0 + c_chunk])
                cc = len(p)
                for idx in plan_batches(rows, cc, self.max_batch_tokens, self.pass_overhead_tokens):
                    ids, att = self._padded(enc, idx)
                    b = len(idx)
                    prompt_rows = p.repeat_interleave(b, dim=0)  # candidate-major: row = c * b + example
                    ids_r = ids.repeat(cc, 1)
                    att_r = att.repeat(cc, 1) if att is not None else None
                    mpos = torch.as_tensor(enc.mask_pos[idx], device=self.device).repeat(cc)
                    with self.prompt(prompt_rows):
                        logits = self._mask_logits(ids_r, att_r, mpos)
                    self.tokens += ids_r.shape[0] * (ids_r.shape[1] + self.extra_rows)
                    out[c0 : c0 + cc, idx] = logits.float().view(cc, b, -1).cpu().numpy()
        return out

    def _mask_logits(self, ids, att, mpos):
        torch = self.torch
        rows = torch.arange(len(ids), device=self.device)
        if self.head is not None:
            hidden = self.model.base_model(input_ids=ids, attention_mask=att).last_hidden_state
            with self._decoder(self.label_decoder):
                return self.head(hidden[rows, mpos])
        with self._decoder(self.label_decoder):
            return self.model(input_ids=ids, attention_mask=att).logits[rows, mpos]

    def full_vocab_mask_logits(self, z: np.ndarray, ids, att, mpos):
        """Reference path: the unmodified model with its full-vocabulary head; logits at the mask (B, V).

        ``att`` masks ``ids`` (None: no padding); ``mpos`` are rows of the model's sequence (``Encoded.mask_pos``).
        """
        torch = self.torch
        with torch.inference_mode(), self.prompt(self.prompts(z)[0]):
            logits = self.model(input_ids=ids, attention_mask=self._model_mask(att)).logits
        return logits[torch.arange(len(ids)), mpos]


def plan_batches(lengths: np.ndarray, rows_per_example: int, max_tokens: int, overhead: int = 256) -> list[np.ndarray]:
    """Cut examples into forward passes: runs of the longest-first order, each padded to its own longest.

    Each example is repeated ``rows_per_example`` times in a pass (one row per candidate). A pass holds at most
    ``max_tokens`` padded tokens (at least one example). The cut points minimise padded tokens + ``overhead``
    per pass, by dynamic programming over the distinct lengths: one global batch wastes the padding of every
    short sentence up to the longest, one pass per length wastes the per-pass cost.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    srt = lengths[order]
    if len(srt) == 0:
        return []
    bounds = np.r_[np.flatnonzero(np.r_[True, srt[1:] != srt[:-1]]), len(srt)]
    groups = len(bounds) - 1
    best = np.full(groups + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(groups + 1, dtype=np.int64)
    for h in range(1, groups + 1):  # a pass run covering groups g..h-1 is padded to group g's length
        for g in range(h):
            n, longest = bounds[h] - bounds[g], srt[bounds[g]]
            per_pass = max(1, max_tokens // (rows_per_example * longest))
            cost = best[g] + rows_per_example * n * longest + overhead * -(-n // per_pass)
            if cost < best[h]:
                best[h], cut[h] = cost, g
    runs, h = [], groups
    while h > 0:
        runs.append((bounds[cut[h]], bounds[h]))
        h = cut[h]
    batches = []
    for lo, hi in reversed(runs):
        i = lo
        while i < hi:  # within the cap; each piece is padded to its own longest
            per_pass = max(1, max_tokens // (rows_per_example * srt[i]))
            batches.append(order[i : min(hi, i + per_pass)])
            i += len(batches[-1])
    return batches


def example_losses(logits: np.ndarray, labels: np.ndarray, loss_type: str) -> np.ndarray:
    """Per-candidate, per-example loss (C, N) from (C, N, L) logits; :func:`loss_and_metrics` averages it.

    ce: cross-entropy over the label words. hinge: multi-class margin loss, margin 2, as torch.nn.MultiMarginLoss
    (the sum over wrong classes of max(0, 2 - s_y + s_j), divided by the number of classes). perf: minus the
    0/1 correctness.
    """
    x = np.asarray(logits, dtype=np.float64)
    c, n, k = x.shape
    y = np.asarray(labels, dtype=np.int64)
    true = x[:, np.arange(n), y]
    if loss_type == "ce":
        m = x.max(-1)
        return m + np.log(np.exp(x - m[..., None]).sum(-1)) - true
    if loss_type == "hinge":
        margins = np.maximum(0.0, 2.0 - true[..., None] + x)
        margins[:, np.arange(n), y] = 0.0
        return margins.sum(-1) / k
    if loss_type == "perf":
        return -(x.argmax(-1) == y).astype(np.float64)
    raise ConfigError(f"unknown {opt('loss_type')} {loss_type}: use ce, hinge or perf")


def loss_and_metrics(logits: np.ndarray, labels: np.ndarray, loss_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-candidate loss (C,), the mean of :func:`example_losses`, and confusion matrices (C, L, L) [true, predicted]
    from (C, N, L) logits. perf is minus accuracy; hinge is summed over examples and divided by N, as
    torch.nn.MultiMarginLoss's mean."""
    x = np.asarray(logits, dtype=np.float64)
    c, n, k = x.shape
    y = np.asarray(labels, dtype=np.int64)
    pred = x.argmax(-1)
    conf = np.zeros((c, k, k), dtype=np.int64)
    for ci in range(c):
        np.add.at(conf[ci], (y, pred[ci]), 1)
    if n == 0:
        return np.zeros(c), conf
    return example_losses(x, y, loss_type).mean(-1), conf


def count_fitting(tokenizer, task: TaskSpec, examples: Examples, n_prompt_tokens: int) -> int:
    """How many examples the masked scorer keeps (its encode's rule), from the tokenizer alone: preflight uses
    it to refuse a run whose every example would be dropped."""
    kept = 0
    for values in examples.texts:
        text, _ = render(task.template, task.text_columns, values, tokenizer.mask_token)
        kept += len(tokenizer(text, add_special_tokens=True)["input_ids"]) + n_prompt_tokens <= MAX_SEQ_LEN
    return kept


def metric_from_confusion(conf: np.ndarray, metric: str) -> float:
    """Accuracy, or F1 of class 1 (MRPC's metric) from a [true, predicted] confusion matrix."""
    total = conf.sum()
    if total == 0:
        return float("nan")
    if metric == "f1":
        tp, fp, fn = conf[1, 1], conf[0, 1], conf[1, 0]
        return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
    return float(np.trace(conf) / total)
