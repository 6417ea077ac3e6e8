"""The scorer: projection A, prompt injection through hooks, templates and encoding."""

import numpy as np
import pytest
import torch

from fedbpt.data import Examples
from fedbpt.scorer import Scorer
from fedbpt.tasks import TASKS, ConfigError, TaskSpec, get_task

N_PROMPT, D = 6, 20
EXAMPLES = Examples([("the film is great",), ("a dull and messy script",), ("so warm",)], np.array([1, 0, 1]))


@pytest.fixture(params=["add", "cat"])
def scorer(request, tiny_model_dir):
    s = Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, request.param, seed=3)
    yield s
    s.close()


def test_projection_is_rebuilt_identically_from_the_seed(tiny_model_dir):
    a = Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "add", seed=3)
    b = Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "add", seed=3)
    c = Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "add", seed=4)
    try:
        assert torch.equal(a.A_t, b.A_t)
        assert not torch.equal(a.A_t, c.A_t)
        assert a.A_t.shape == (D, N_PROMPT * a.hidden)
    finally:
        for s in (a, b, c):
            s.close()


def test_projection_std_follows_the_word_embedding_std(tiny_model_dir):
    s = Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "add", seed=3, sigma=2.0)
    try:
        std_hat = float(s.model.get_input_embeddings().weight.std())
        assert s.proj_std == pytest.approx(std_hat / (np.sqrt(D) * 2.0), rel=1e-6)
        assert float(s.A_t.std()) == pytest.approx(s.proj_std, rel=0.05)  # 2,400+ draws
    finally:
        s.close()


def test_encoding_puts_placeholders_after_the_start_token_and_marks_only_text(scorer):
    enc = scorer.encode(EXAMPLES)
    tok = scorer.tokenizer
    for ids, text, mpos in zip(enc.ids, enc.text_mask, enc.mask_pos):
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert ids[1 : 1 + N_PROMPT].tolist() == scorer.placeholder_ids.tolist()
        assert ids[mpos] == tok.mask_token_id
        special = np.isin(ids, tok.all_special_ids)
        assert not (text & special).any() and not text[: 1 + N_PROMPT].any()
    words = tok.decode(enc.ids[1][enc.text_mask[1]]).split()
    assert words == ["a", "dull", "and", "messy", "script"]  # exactly the sentence, no template words


def test_template_renders_like_the_reference(scorer):
    enc = scorer.encode(EXAMPLES)
    rendered = scorer.tokenizer.decode(enc.ids[0][1 + N_PROMPT :])
    assert rendered == ". the film is great . It was<mask> .</s>"  # the mask token absorbs its leading space


def _reference_add(scorer, z, ids):
    """Explicit computation: embedding-block output (word+position+type, LayerNorm) plus P, then encoder, head."""
    model = scorer.model
    with torch.no_grad():
        emb = model.roberta.embeddings(input_ids=ids)
        emb[:, 1 : 1 + N_PROMPT] += scorer.prompts(z)[0]
        hidden = model.roberta.encoder(emb).last_hidden_state
        return model.lm_head(hidden)


def _reference_cat(scorer, z, ids):
    """Explicit computation through inputs_embeds: P replaces the placeholders' word embeddings."""
    model = scorer.model
    with torch.no_grad():
        words = model.get_input_embeddings()(ids).clone()
        words[:, 1 : 1 + N_PROMPT] = scorer.prompts(z)[0]
        return model(inputs_embeds=words).logits


def test_hook_injection_equals_the_explicit_computation(scorer):
    enc = scorer.encode(EXAMPLES)
    z = np.random.default_rng(1).normal(size=(2, D))
    got = scorer.label_logits(z, enc)
    reference = _reference_add if scorer.mode == "add" else _reference_cat
    for c in range(2):
        for i in range(len(enc)):
            ids = torch.as_tensor(enc.ids[i])[None]
            full = reference(scorer, z[c], ids)[0, enc.mask_pos[i], scorer.label_ids].numpy()
            np.testing.assert_allclose(got[c, i], full, rtol=1e-5, atol=1e-6)


def test_the_prompt_changes_the_logits_and_zero_prompt_is_the_bare_template(scorer):
    enc = scorer.encode(EXAMPLES)
    z = np.zeros((2, D))
    z[1] = np.random.default_rng(2).normal(size=D) * 3
    out = scorer.label_logits(z, enc)
    assert not np.allclose(out[0], out[1])
    if scorer.mode == "add":  # z = 0 adds nothing: the logits of the unhooked model
        with torch.no_grad():
            ids = torch.as_tensor(enc.ids[0])[None]
            plain = scorer.model(input_ids=ids).logits[0, enc.mask_pos[0], scorer.label_ids].numpy()
        np.testing.assert_allclose(out[0, 0], plain, rtol=1e-5, atol=1e-6)


def test_lm_head_output_bias_is_zero(scorer):
    assert torch.count_nonzero(scorer.model.get_output_embeddings().bias) == 0


def test_multi_token_label_word_is_a_clear_error(tiny_model_dir):
    task = TaskSpec("odd", "none", None, "test", ("sentence",), ". {sentence} . {mask}", ("bad", "zyzzogeton"))
    with pytest.raises(ConfigError, match="zyzzogeton.*single-token"):
        Scorer(tiny_model_dir, task, N_PROMPT, D, "add", seed=3)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Scorer(str(tmp_path / "nope" / "model"), get_task("sst2"), N_PROMPT, D, "add", seed=3)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_template_has_one_mask_and_all_its_text_columns(name):
    import string

    task = TASKS[name]
    fields = [f for _, f, _, _ in string.Formatter().parse(task.template) if f is not None]
    assert fields.count("mask") == 1
    assert sorted(f for f in fields if f != "mask") == sorted(task.text_columns)
