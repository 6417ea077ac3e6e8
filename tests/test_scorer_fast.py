"""The fast scorer gives the numbers of the plain computation: full head, one candidate, no batching tricks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import deterministic_texts

from fedbpt.core.algorithm.search import GlobalState, LocalObjective, eq7_fitness, local_search, perturb
from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import get_task
from fedbpt.core.models.scorer import Encoded, Scorer, example_losses, loss_and_metrics, plan_batches

N_PROMPT, DIM = 8, 20


@pytest.fixture()
def make_scorer(tiny_model_dir):
    made = []

    def make(**kw) -> Scorer:
        kw = {"n_prompt_tokens": N_PROMPT, "intrinsic_dim": DIM, "seed": 3, **kw}
        sc = Scorer(tiny_model_dir, get_task("sst2"), **kw)
        made.append(sc)
        return sc

    yield make
    for sc in made:
        sc.close()


def examples(n: int, seed: int = 1) -> Examples:
    texts = deterministic_texts(n, seed)
    return Examples([(t,) for t in texts], np.arange(n) % 2)


def candidates(c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((c, DIM)) * 3.0


def subset(enc: Encoded, idx) -> Encoded:
    return Encoded(
        [enc.ids[i] for i in idx], [enc.text_mask[i] for i in idx], enc.mask_pos[list(idx)], enc.labels[list(idx)]
    )


def padded(enc: Encoded, pad: int):
    """One batch padded to the global longest: the plain layout the fast path avoids."""
    longest = max(len(x) for x in enc.ids)
    ids = torch.full((len(enc), longest), pad, dtype=torch.long)
    att = torch.zeros((len(enc), longest), dtype=torch.long)
    for r, x in enumerate(enc.ids):
        ids[r, : len(x)] = torch.from_numpy(x)
        att[r, : len(x)] = 1
    return ids, att, torch.from_numpy(enc.mask_pos)


def assert_rel_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    scale = float(np.abs(b).max())
    assert scale > 0.1, "logits too small for a relative comparison to mean anything"
    err = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert err <= rel * scale, f"max abs difference {err:.3g} exceeds {rel} x max |logit| {scale:.3g}"


@pytest.mark.parametrize("mode", ["add", "cat"])
def test_label_head_equals_full_vocabulary_head(make_scorer, mode):
    sc = make_scorer(cat_or_add=mode)
    enc = sc.encode(examples(12))
    assert len(set(enc.lengths.tolist())) > 3, "the examples need varied lengths to exercise padding"
    z = candidates(3)
    fast = sc.label_logits(z, enc)
    ids, att, mpos = padded(enc, sc.tokenizer.pad_token_id)
    for c in range(len(z)):
        full = sc.full_vocab_mask_logits(z[c], ids, att, mpos).numpy()
        assert full.shape[1] >= len(sc.tokenizer)  # the reference really is the whole vocabulary
        assert_rel_close(fast[c], full[:, sc.label_ids])
    # the prompt must matter, or the comparison above would not check the injection
    assert np.abs(fast[0] - fast[1]).max() > 1e-2


def test_generation_equals_one_candidate_at_a_time(make_scorer):
    sc = make_scorer()
    enc = sc.encode(examples(10))
    z = candidates(5, seed=4)
    together = sc.label_logits(z, enc)
    alone = np.stack([sc.label_logits(z[c], enc)[0] for c in range(len(z))])
    assert together.shape == (5, 10, 2)
    assert_rel_close(together, alone)


@pytest.mark.parametrize("mode", ["add", "cat"])
def test_padding_and_grouping_do_not_change_scores(make_scorer, mode):
    sc = make_scorer(cat_or_add=mode)
    enc = sc.encode(examples(9, seed=2))
    z = candidates(2, seed=5)
    grouped = sc.label_logits(z, enc)
    # each example alone: no padding at all
    single = np.concatenate([sc.label_logits(z, subset(enc, [i])) for i in range(len(enc))], axis=1)
    assert_rel_close(grouped, single)
    # a shuffled order gives the same scores, in the shuffled order
    perm = np.random.default_rng(0).permutation(len(enc))
    assert_rel_close(sc.label_logits(z, subset(enc, perm)), grouped[:, perm])


def test_eager_attention_gives_the_sdpa_scores(make_scorer):
    """--attn_implementation eager (faster for tiny models on CPU) changes the kernel, not the numbers."""
    sdpa = make_scorer()
    eager = make_scorer(attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager" and sdpa.model.config._attn_implementation == "sdpa"
    enc = sdpa.encode(examples(10, seed=4))
    z = candidates(3, seed=7)
    assert_rel_close(eager.label_logits(z, enc), sdpa.label_logits(z, enc))


@pytest.mark.parametrize("mode", ["add", "cat"])
def test_memory_cap_splits_passes_without_changing_scores(make_scorer, mode):
    """The cap counts the rows the model sees: in cat mode the n prompt rows in front of the ids as well."""
    roomy = make_scorer(max_batch_tokens=1 << 20, cat_or_add=mode)
    enc = roomy.encode(examples(11, seed=3))
    extra = N_PROMPT if mode == "cat" else 0
    assert roomy.extra_rows == extra
    z = candidates(4, seed=6)
    tight_cap = int(enc.lengths.max()) + extra + 1  # the longest example fits alone; little else fits beside it
    tight = make_scorer(max_batch_tokens=tight_cap, cat_or_add=mode)
    passes = []

    def record(module, args, kwargs):
        att = kwargs.get("attention_mask")
        rows, length = kwargs["input_ids"].shape
        assert att is None or att.shape == (rows, length + extra)
        passes.append((rows, length + extra))

    handle = tight.model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        split = tight.label_logits(z, enc)
    finally:
        handle.remove()
    assert max(rows * length for rows, length in passes) <= tight_cap
    assert sum(rows for rows, _ in passes) == len(z) * len(enc)  # every (candidate, example) scored exactly once
    assert len(passes) >= int(enc.lengths.sum() + extra * len(enc)) * len(z) // tight_cap
    assert_rel_close(split, roomy.label_logits(z, enc))


def test_plan_batches_covers_every_example_within_the_cap():
    lengths = np.random.default_rng(1).integers(20, 120, size=200)
    for rows, cap, overhead in [(5, 4000, 0), (5, 4000, 256), (1, 1 << 20, 10**9), (3, 100, 256)]:
        batches = plan_batches(lengths, rows, cap, overhead)
        covered = np.sort(np.concatenate(batches))
        assert np.array_equal(covered, np.arange(len(lengths)))
        for b in batches:
            assert len(b) == 1 or rows * len(b) * lengths[b].max() <= cap
    # no fixed cost per pass: every pass holds a single length, so nothing is padded
    assert all(len(set(lengths[b])) == 1 for b in plan_batches(lengths, 5, 1 << 20, 0))
    # a huge fixed cost and room for all: one pass
    assert len(plan_batches(lengths, 5, 1 << 20, 10**9)) == 1
    # the default cost model pads less than one global batch padded to the longest
    batches = plan_batches(lengths, 5, 1 << 20, 256)
    padded_tokens = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() <= padded_tokens < len(lengths) * lengths.max()


def test_objective_scores_clean_and_perturbed_together(make_scorer):
    sc = make_scorer()
    clean = sc.encode(examples(8, seed=4))
    pert = perturb(clean, 0.5, sc.ordinary_ids, np.random.default_rng(2))
    z = candidates(5, seed=7)
    together = LocalObjective(sc.label_logits, clean, "ce", pert)(z)
    clean_logits, pert_logits = sc.label_logits(z, clean), sc.label_logits(z, pert)
    lc = example_losses(clean_logits, clean.labels, "ce")
    lp = example_losses(pert_logits, pert.labels, "ce")
    np.testing.assert_allclose(together, eq7_fitness(lc, lp), rtol=1e-5)
    # the reference's form: mean clean loss over mean perturbed loss, each scored on its own
    mean_clean, _ = loss_and_metrics(clean_logits, clean.labels, "ce")
    mean_pert, _ = loss_and_metrics(pert_logits, pert.labels, "ce")
    np.testing.assert_allclose(together, mean_clean / mean_pert, rtol=1e-5)


def test_local_search_keeps_torch_threads_for_the_objective():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []

    def objective(x):
        seen.append(torch.get_num_threads())
        return (np.asarray(x) ** 2).sum(-1)

    try:
        local_search(GlobalState(0, np.zeros(DIM), 1.0), objective, popsize=4, iterations=2, seed=1)
    finally:
        torch.set_num_threads(before)
    assert seen and all(n == 2 for n in seen), f"torch ran the objective on {seen} threads, not 2"


@pytest.mark.parametrize("mode", ["add", "cat"])
def test_no_prompt_scorer_is_the_template_alone(tiny_model_dir, mode):
    """A scorer with no prompt tokens (the verdict's "no prompt" on masked LMs) gives the model's own mask logits for
    the filled template: nothing inserted, no row added."""
    from fedbpt.core.models.scorer import render

    task = get_task("sst2")
    sc = Scorer(tiny_model_dir, task, 0, 8, cat_or_add=mode)
    ex = examples(5, seed=3)
    got = sc.label_logits(np.zeros(8), sc.encode(ex))[0]
    tok = sc.tokenizer
    with torch.inference_mode():
        for j, values in enumerate(ex.texts):
            text, _ = render(task.template, task.text_columns, values, tok.mask_token)
            ids = tok(text, return_tensors="pt")["input_ids"]
            pos = int((ids[0] == tok.mask_token_id).nonzero()[0, 0])
            want = sc.model(input_ids=ids).logits[0, pos, sc.label_ids].numpy()
            np.testing.assert_allclose(got[j], want, rtol=1e-4, atol=1e-4)
    sc.close()
