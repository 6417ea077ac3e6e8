"""The memory arithmetic that guards every simulator run (core.memory), with hand-checked numbers, and the refusal
of a run that cannot fit, before any process starts."""

from __future__ import annotations

import helpers
import pytest

from fedbpt.core.memory import PROCESS_BYTES, ModelShape, check_fits, estimate, safetensors_params
from fedbpt.errors import ConfigError

SHAPE = ModelShape(params=1000, hidden=8, intermediate=32, layers=2, kv_width=8)


def cfg(**kw) -> dict:
    base = dict(intrinsic_dim=10, n_prompt_tokens=2, max_batch_tokens=100, num_clients=4)
    return helpers.make_cfg(base, **kw)


def test_estimate_hand_checked():
    needs = estimate(cfg(), SHAPE, "masked", examples_per_site=50)
    assert needs.server == PROCESS_BYTES + 8 * 10 * 10 * 8  # 8 d x d float64 matrices
    assert needs.local_es == 6400
    assert needs.weights == 1000 * 4  # fp32
    assert needs.projection == 10 * 2 * 8 * 4  # A: d x (n h) fp32, in every precision
    assert needs.activations == 100 * (8 * 8 + 2 * 32) * 4  # 100 tokens x (8 hidden copies + 2 FFN widths) x 4 B
    assert needs.held == 0  # a masked LM holds nothing
    half = estimate(cfg(precision="bf16"), SHAPE, "masked", 50)
    assert (half.weights, half.activations, half.projection) == (2000, 25600, 640)
    # loading reads an fp32 checkpoint and casts it: both copies at the load's peak (measured by bench.memory)
    assert (needs.load_peak, half.load_peak) == (4000, 6000)
    causal = estimate(cfg(prompt_placement="after_input"), SHAPE, "causal", examples_per_site=50)
    assert causal.held == (2 * 2 * 8 * 4) * 50 * 64  # keys and values x layers x width x 4 B, 64 tokens each
    assert estimate(cfg(prompt_placement="front"), SHAPE, "causal", 50).held == 0
    # a causal pass keeps its keys/values (128 B a token here) and the scorer caps them: 1,280 B -> 10-token passes
    capped = estimate(cfg(prompt_placement="after_input"), SHAPE, "causal", 50, kv_budget=1280, hold_budget=1000)
    assert capped.activations == 10 * (8 * 8 + 2 * 32) * 4 + 10 * 128
    assert capped.held == 1000  # no more than the scorer holds


def test_a_run_that_cannot_fit_names_the_option_to_change():
    needs = estimate(cfg(), SHAPE, "masked", 50)
    client = needs.client
    check_fits(4, None, needs, needs.server + 4 * client)  # exactly fits
    with pytest.raises(ConfigError, match=r"4 client processes .* run threads 3 clients at once"):
        check_fits(4, None, needs, needs.server + 4 * client - 1)
    huge = estimate(cfg(intrinsic_dim=200_000), SHAPE, "masked", 50)  # 2.56 TB of d x d matrices
    with pytest.raises(ConfigError, match="lower intrinsic_dim"):
        check_fits(10, None, huge, 64 << 30)


def test_each_gpu_holds_the_clients_of_the_groups_that_start_on_it():
    needs = estimate(cfg(), SHAPE, "masked", 50)
    from fedbpt.core.memory import CUDA_CONTEXT_BYTES

    each = needs.client_on_device + CUDA_CONTEXT_BYTES
    ram = 1 << 40
    # one group, 4 threads: all four processes on GPU 0
    check_fits(4, "0", needs, ram, [4 * each])
    with pytest.raises(ConfigError, match=r"GPU 0 would hold 4 client processes .* run threads 3"):
        check_fits(4, "0", needs, ram, [4 * each - 1])
    # two groups: one client per group at a time, so each GPU holds one
    check_fits(4, "0,1", needs, ram, [each, each])
    # [0,1],[0]: both groups start on GPU 0
    with pytest.raises(ConfigError, match="GPU 0 would hold 2 client processes"):
        check_fits(4, "[0,1],[0]", needs, ram, [each, each])


def test_parameters_are_read_from_the_safetensors_headers(tiny_model_dir):
    import torch
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    stored = safetensors_params(tiny_model_dir)
    assert stored == sum(p.numel() for p in model.parameters())


def test_preflight_refuses_an_intrinsic_dim_the_server_cannot_hold(toy_data_dir):
    from fedbpt.flare.preflight import preflight, prepare_config

    config = prepare_config(
        helpers.make_cfg(model_name="tiny-random", data_dir=toy_data_dir, num_clients=2, k_shot=4, intrinsic_dim=10**6)
    )
    with pytest.raises(ConfigError, match=r"this run needs about .* lower intrinsic_dim"):
        preflight(config)
