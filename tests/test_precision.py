"""--precision bf16 loads the weights in bfloat16 (half the memory) and runs them so; A z stays fp32 until it
enters the model. On the CPU against fp32: the same predictions, logits within a stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbpt.core.data.splits import Examples
from fedbpt.core.data.tasks import get_task
from fedbpt.core.models.causal import CausalScorer
from fedbpt.core.models.scorer import Scorer
from fedbpt.research.tiny_causal import build_tiny_causal

D = 12
# bf16 keeps 8 bits of mantissa: every weight and activation is rounded to ~0.4%; through the tiny models' few layers
# the label logits move by at most this much relative to their scale (measured: under 0.02)
TOLERANCE = 0.05


def examples(n: int = 24, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    words = "the film is a great bad funny dull story with never charming movie too".split()
    texts = [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(2, 12, size=n)]
    return Examples([(t,) for t in texts], np.arange(n) % 2)


def compare(make, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for precision in ("fp32", "bf16"):
        sc = make(precision)
        try:
            assert (
                sc.model.get_input_embeddings().weight.dtype
                == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            )
            assert sc.A_t.dtype == torch.float32  # the projection is not rounded
            out.append(sc.label_logits(z, sc.encode(examples())))
        finally:
            sc.close()
    return out[0], out[1]


def check(fp32: np.ndarray, bf16: np.ndarray) -> None:
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    scale = 1.0 + np.abs(fp32).max()
    assert np.abs(bf16 - fp32).max() <= TOLERANCE * scale
    margin = np.abs(fp32[..., 1] - fp32[..., 0])
    clear = margin > 2 * TOLERANCE * scale  # a near-tie may flip under any rounding
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(bf16.argmax(-1)[clear], fp32.argmax(-1)[clear])


@pytest.mark.parametrize("mode", ["add", "cat"])
def test_masked_lm_in_bf16_predicts_as_in_fp32(tiny_model_dir, mode):
    z = np.random.default_rng(1).standard_normal((3, D)) * 2.0
    fp32, bf16 = compare(lambda p: Scorer(tiny_model_dir, get_task("sst2"), 4, D, mode, seed=3, precision=p), z)
    check(fp32, bf16)


@pytest.mark.parametrize("placement", ["front", "after_input"])
def test_causal_lm_in_bf16_predicts_as_in_fp32(tmp_path, placement):
    path = build_tiny_causal(str(tmp_path / "model"), "llama", seed=5)
    z = np.random.default_rng(2).standard_normal((3, D)) * 2.0

    def make(precision: str) -> CausalScorer:
        return CausalScorer(
            path, get_task("sst2"), 4, D, seed=7, precision=precision, prompt_placement=placement,
            attn_implementation="eager",
        )  # fmt: skip

    fp32, bf16 = compare(make, z)
    check(fp32, bf16)
