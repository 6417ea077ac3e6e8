"""Session fixtures: a tiny random RoBERTa built once per test session, offline, from a fixed text list."""

from __future__ import annotations

import numpy as np
import pytest

WORDS = (
    "the film is a story of love and loss with great acting but the plot is bad and slow "
    "funny charming dull boring brilliant script director performances never quite works"
).split()


def deterministic_texts(n: int, seed: int = 0) -> list[str]:
    """Sentences of 2-30 words from a fixed word list: varied lengths for the batching tests."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(2, 31, size=n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from fedbpt.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model") / "model"
    return build_tiny_model(str(out), deterministic_texts(300), ("bad", "great"), seed=0, vocab_size=400)
