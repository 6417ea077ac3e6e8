"""The reference's placeholder ids 1000..1049, exercised: a tiny masked LM whose byte-level BPE has RoBERTa's 50,265
entries (built here from seeded pseudo-words), so the scorer takes the ids the reference takes rather than the
fallback a small vocabulary needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import get_task
from fedbpt.core.models.scorer import PLACEHOLDER_START, Scorer
from fedbpt.research.tiny import build_tiny_model

ROBERTA_VOCAB = 50265
N, D = 50, 16


def pseudo_words(lexicon: int, seed: int = 0) -> list[str]:
    """Sentences over ``lexicon`` random lowercase words, each used twice: BPE can merge every word whole (a pair must
    occur twice), so 30,000 of them fill a RoBERTa-sized vocabulary in a few seconds."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(3, 11, size=lexicon)] * 2
    rng.shuffle(words)
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    texts = pseudo_words(30_000) + ["the film is great", "a dull and messy script"] * 50
    return build_tiny_model(str(tmp_path_factory.mktemp("wide") / "m"), texts, ["bad", "great"], 7, ROBERTA_VOCAB)


@pytest.fixture(scope="module")
def scorer(wide_model):
    s = Scorer(wide_model, get_task("sst2"), N, D, "add", seed=3)
    yield s
    s.close()


def test_the_vocabulary_is_roberta_sized_and_the_placeholders_are_1000_to_1049(scorer):
    assert len(scorer.tokenizer) == ROBERTA_VOCAB
    np.testing.assert_array_equal(scorer.placeholder_ids, np.arange(PLACEHOLDER_START, PLACEHOLDER_START + N))
    assert not np.isin(scorer.placeholder_ids, scorer.tokenizer.all_special_ids).any()


def test_placeholders_follow_the_start_token_and_the_template_follows_them(scorer):
    tok = scorer.tokenizer
    enc = scorer.encode(Examples([("the film is great",)], np.array([1])))
    ids = enc.ids[0]
    assert ids[0] == tok.bos_token_id
    assert ids[1 : 1 + N].tolist() == list(range(1000, 1050))
    # the token after them is the template's first, "." without a space mark (the reference's " . " gives "Ġ.":
    # a documented deviation, docs/algorithm.md)
    assert tok.convert_ids_to_tokens(int(ids[1 + N])) == "."
    assert tok.decode(ids[1 + N :]) == ". the film is great . It was<mask> .</s>"
    assert not enc.text_mask[0][: 1 + N + 1].any()  # perturbation never touches <s>, the placeholders or "."
    assert ids[enc.mask_pos[0]] == tok.mask_token_id


def test_the_prompt_lands_on_the_placeholder_rows(scorer):
    """add: P is added to the embedding block's output at rows 1..n, the rows of ids 1000..1049, and nowhere else."""
    enc = scorer.encode(Examples([("the film is great",), ("so warm",)], np.array([1, 1])))
    z = np.random.default_rng(2).standard_normal((2, D))
    got = scorer.label_logits(z, enc)
    model = scorer.model
    for c in range(2):
        for i in range(len(enc)):
            ids = torch.as_tensor(enc.ids[i])[None]
            with torch.no_grad():
                emb = model.roberta.embeddings(input_ids=ids)
                assert (ids[0, 1 : 1 + N] >= 1000).all() and (ids[0, 1 : 1 + N] < 1050).all()
                emb[:, 1 : 1 + N] += scorer.prompts(z[c])[0]
                hidden = model.roberta.encoder(emb).last_hidden_state
                want = model.lm_head(hidden)[0, enc.mask_pos[i], scorer.label_ids].numpy()
            np.testing.assert_allclose(got[c, i], want, rtol=1e-5, atol=1e-6)
