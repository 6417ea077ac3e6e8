"""The scorer: projection A, prompt injection through hooks, templates and encoding."""

import numpy as np
import pytest
import torch

import fedbpt.core.models.scorer as scorer_module
from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import TASKS, TaskSpec, get_task
from fedbpt.core.models.scorer import Encoded, Scorer, load_model
from fedbpt.errors import ConfigError

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
    """add: <s>, n placeholders, template; cat: no placeholders. The mask row counts the n prompt rows in both."""
    enc = scorer.encode(EXAMPLES)
    tok = scorer.tokenizer
    body = 1 + N_PROMPT if scorer.mode == "add" else 1  # where the template starts in the ids
    for ids, text, mpos, length in zip(enc.ids, enc.text_mask, enc.mask_pos, enc.lengths):
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(text) == len(ids) == length
        if scorer.mode == "add":
            assert ids[1 : 1 + N_PROMPT].tolist() == scorer.placeholder_ids.tolist()
            assert ids[mpos] == tok.mask_token_id
        else:
            assert not np.isin(ids, scorer.placeholder_ids).any()
            assert ids[mpos - N_PROMPT] == tok.mask_token_id  # the model sequence has the prompt rows in front
        special = np.isin(ids, tok.all_special_ids)
        assert not (text & special).any() and not text[:body].any()
    words = tok.decode(enc.ids[1][enc.text_mask[1]]).split()
    assert words == ["a", "dull", "and", "messy", "script"]  # exactly the sentence, no template words
    plain = scorer.encode(Examples([("so warm",)], np.array([1])))
    bare = len(tok(". so warm . It was<mask> .")["input_ids"])
    assert plain.lengths[0] == bare + (N_PROMPT if scorer.mode == "add" else 0)


def test_template_renders_like_the_reference(scorer):
    enc = scorer.encode(EXAMPLES)
    body = 1 + N_PROMPT if scorer.mode == "add" else 1
    rendered = scorer.tokenizer.decode(enc.ids[0][body:])
    assert rendered == ". the film is great . It was<mask> .</s>"  # the mask token absorbs its leading space


def _subset(enc, idx):
    return Encoded([enc.ids[i] for i in idx], [enc.text_mask[i] for i in idx], enc.mask_pos[idx], enc.labels[idx])


def _additive_mask(att):
    """(B, S) 0/1 mask -> the (B, 1, 1, S) additive mask the encoder layers take (None: attend everywhere)."""
    if att is None:
        return None
    return (1.0 - att[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _reference_add(scorer, z, ids, att=None):
    """Explicit computation: embedding-block output (word+position+type, LayerNorm) plus P, then encoder, head."""
    model = scorer.model
    with torch.no_grad():
        emb = model.roberta.embeddings(input_ids=ids)
        emb[:, 1 : 1 + N_PROMPT] += scorer.prompts(z)[0]
        hidden = model.roberta.encoder(emb, attention_mask=_additive_mask(att)).last_hidden_state
        return model.lm_head(hidden)


def _reference_cat(scorer, z, ids, att=None):
    """Explicit computation: P (n x h) in front of the embedding-block output (the text keeps the positions of its
    own ids), the attention mask extended by n ones in front, then encoder and head: n rows more than the ids."""
    model = scorer.model
    with torch.no_grad():
        emb = model.roberta.embeddings(input_ids=ids)
        p = scorer.prompts(z)[0].expand(len(ids), -1, -1)
        hidden_in = torch.cat([p, emb], dim=1)
        if att is not None:
            att = torch.cat([torch.ones((len(ids), N_PROMPT), dtype=att.dtype), att], dim=1)
        hidden = model.roberta.encoder(hidden_in, attention_mask=_additive_mask(att)).last_hidden_state
        return model.lm_head(hidden)


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


def test_injection_equals_the_explicit_computation_on_padded_and_unpadded_batches(scorer):
    """One padded pass (right padding, the mask [1]*n + the ids' mask in cat mode) and one pass per example (no
    mask at all) give the explicit computation's label logits at the (shifted) mask row."""
    enc = scorer.encode(EXAMPLES)
    assert len(set(enc.lengths.tolist())) == len(enc), "the examples need different lengths to be padded"
    z = np.random.default_rng(5).normal(size=(2, D)) * 2
    masks = []
    handle = scorer.model.base_model.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        scorer.pass_overhead_tokens = 10**9  # everything in one pass, padded to the longest
        padded = scorer.label_logits(z, enc)
        single = np.concatenate([scorer.label_logits(z, _subset(enc, [i])) for i in range(len(enc))], axis=1)
    finally:
        handle.remove()
    longest = int(enc.lengths.max())
    assert masks[0] is not None and masks[0].shape == (2 * len(enc), longest + scorer.extra_rows)
    assert all(m is None for m in masks[1:])  # a single example is never padded
    pad = scorer.tokenizer.pad_token_id
    ids = torch.full((len(enc), longest), pad, dtype=torch.long)
    att = torch.zeros((len(enc), longest), dtype=torch.long)
    for r, x in enumerate(enc.ids):
        ids[r, : len(x)] = torch.from_numpy(x)
        att[r, : len(x)] = 1
    if scorer.mode == "cat":
        np.testing.assert_array_equal(
            masks[0][: len(enc)].numpy(), np.c_[np.ones((len(enc), N_PROMPT)), att[enc.order]]
        )  # rows longest first
    reference = _reference_add if scorer.mode == "add" else _reference_cat
    rows = torch.arange(len(enc))
    for c in range(2):
        full = reference(scorer, z[c], ids, att)[rows, torch.from_numpy(enc.mask_pos)][:, scorer.label_ids].numpy()
        np.testing.assert_allclose(padded[c], full, rtol=1e-5, atol=1e-5)
        for i in range(len(enc)):
            alone = torch.as_tensor(enc.ids[i])[None]
            ref = reference(scorer, z[c], alone)[0, enc.mask_pos[i], scorer.label_ids].numpy()
            np.testing.assert_allclose(single[c, i], ref, rtol=1e-5, atol=1e-6)


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


def test_lm_head_output_bias_is_zero(tiny_model_dir, tmp_path):
    """A model saved with a non-zero MLM output bias scores as if it had none (BBT): the scorer zeroes it."""
    import shutil

    from transformers import AutoModelForMaskedLM

    biased = str(tmp_path / "biased")
    shutil.copytree(tiny_model_dir, biased)
    raw = AutoModelForMaskedLM.from_pretrained(biased)
    with torch.no_grad():
        raw.lm_head.bias.copy_(torch.randn(raw.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 10)
    raw.save_pretrained(biased)
    again = AutoModelForMaskedLM.from_pretrained(biased)  # the premise: the folder's head has the bias
    assert torch.count_nonzero(again.lm_head.bias) > 0 and torch.count_nonzero(again.get_output_embeddings().bias) > 0
    s = Scorer(biased, get_task("sst2"), N_PROMPT, D, "add", seed=3)
    model = s.model
    try:
        assert torch.count_nonzero(model.get_output_embeddings().bias) == 0
        assert torch.count_nonzero(model.lm_head.bias) == 0
        enc = s.encode(EXAMPLES)
        z = np.random.default_rng(3).normal(size=(1, D))
        got = s.label_logits(z, enc)[0]
        ids, mpos = torch.as_tensor(enc.ids[0])[None], enc.mask_pos[:1]
        full = s.full_vocab_mask_logits(z[0], ids, None, torch.from_numpy(mpos)).numpy()
        with torch.no_grad():  # the head without any output bias: dense, gelu, LayerNorm, decoder weight only
            emb = model.roberta.embeddings(input_ids=ids)
            emb[:, 1 : 1 + N_PROMPT] += s.prompts(z)[0]
            h = model.roberta.encoder(emb).last_hidden_state[0, mpos[0]]
            head = model.lm_head
            x = head.layer_norm(torch.nn.functional.gelu(head.dense(h)))
            no_bias = (x @ head.decoder.weight.t()).numpy()
        np.testing.assert_allclose(full[0], no_bias, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[0], no_bias[s.label_ids], rtol=1e-5, atol=1e-5)
    finally:
        s.close()


def _odd_task(*words):
    return TaskSpec("odd", "none", None, "test", ("sentence",), ". {sentence} . {mask}", tuple(words))


def test_label_words_bare_and_space_are_the_two_single_tokens_of_the_word(tiny_model_dir):
    """bare (the default, as the reference): the no-space token ("great"); space: the Ġ token (" great")."""
    tok = load_model(tiny_model_dir, "cpu")[0]
    bare = Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "add", seed=3)
    space = Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "add", seed=3, label_encoding="space")
    try:
        assert bare.label_encoding == "bare"
        for word, b, sp in zip(get_task("sst2").label_words, bare.label_ids, space.label_ids):
            assert tok.convert_ids_to_tokens(b) == word and tok.convert_ids_to_tokens(sp) == "\u0120" + word
            assert b == tok.encode(word, add_special_tokens=False)[0] and b != sp
        np.testing.assert_array_equal(bare.label_decoder.weight.numpy(), bare.full_decoder.weight[bare.label_ids])
    finally:
        bare.close()
        space.close()


def test_bare_label_word_that_splits_takes_its_first_piece_and_warns(tiny_model_dir, caplog, monkeypatch):
    """The reference's first piece, with one warning line per word and process (not one per site's scorer)."""
    monkeypatch.setattr(scorer_module, "_SPLIT_WARNED", set())  # whatever other tests warned already
    tok = load_model(tiny_model_dir, "cpu")[0]
    pieces = tok.encode("zyzzogeton", add_special_tokens=False)
    assert len(pieces) > 1
    with caplog.at_level("WARNING", logger="fedbpt.core.models.scorer"):
        for _ in range(2):
            s = Scorer(tiny_model_dir, _odd_task("bad", "zyzzogeton"), N_PROMPT, D, "add", seed=3)
            s.close()
    assert s.label_ids == [tok.encode("bad", add_special_tokens=False)[0], pieces[0]]
    lines = [r.getMessage() for r in caplog.records if "zyzzogeton" in r.getMessage()]
    assert len(lines) == 1 and f"first piece '{tok.decode(pieces[:1])}'" in lines[0]
    assert f"is {len(pieces)} tokens" in lines[0] and "--label_encoding space" in lines[0]
    assert not any("'bad'" in r.getMessage() for r in caplog.records)  # a single-token word is not reported


def test_multi_token_label_word_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="zyzzogeton.*single-token.*label_encoding bare"):
        Scorer(tiny_model_dir, _odd_task("bad", "zyzzogeton"), N_PROMPT, D, "add", seed=3, label_encoding="space")


def test_label_words_on_one_token_id_are_refused(tiny_model_dir):
    tok = load_model(tiny_model_dir, "cpu")[0]
    with pytest.raises(ConfigError, match="'great' and 'great' are both token"):
        Scorer(tiny_model_dir, _odd_task("bad", "great", "great"), N_PROMPT, D, "add", seed=3, label_encoding="space")
    # bare: two words that split into the same first piece land on one id
    first = [tok.encode(w, add_special_tokens=False)[0] for w in ("zyzzogeton", "zyzzyva")]
    assert first[0] == first[1]
    with pytest.raises(ConfigError, match="'zyzzogeton' and 'zyzzyva' are both token .*distinct label words"):
        Scorer(tiny_model_dir, _odd_task("zyzzogeton", "zyzzyva"), N_PROMPT, D, "add", seed=3)


def test_unknown_modes_are_clear_errors(tiny_model_dir):
    with pytest.raises(ConfigError, match="label_encoding"):
        Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "add", seed=3, label_encoding="spaced")
    with pytest.raises(ConfigError, match="cat_or_add"):
        Scorer(tiny_model_dir, get_task("sst2"), N_PROMPT, D, "prefix", seed=3)


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


def test_tiny_tokenizer_has_both_forms_of_every_label_word(tmp_path):
    """The tiny model works under both encodings: "Word" and " Word" are single, different tokens for every task."""
    from conftest import toy_sentences
    from transformers import AutoTokenizer

    from fedbpt.research.tiny import build_tiny_model

    words = sorted({w for task in TASKS.values() for w in task.label_words})
    tok = AutoTokenizer.from_pretrained(build_tiny_model(str(tmp_path / "m"), toy_sentences(100, 1)[0], words, 7))
    for word in words:
        bare = tok.encode(word, add_special_tokens=False)
        space = tok(" " + word, add_special_tokens=False)["input_ids"]
        assert len(bare) == 1 and len(space) == 1 and bare != space, word
