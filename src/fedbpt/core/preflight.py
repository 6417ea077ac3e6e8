"""From options to a run config that is ready and checked against this machine, its data and its model.

What would otherwise fail inside every client process (a tokenizer that cannot load, label words that are not
single tokens, texts that never fit the model, a run larger than the machine's memory or its GPUs) fails here once,
as a one-line ConfigError.
"""

from __future__ import annotations

import logging

from fedbpt.core.models import TINY_NAME
from fedbpt.core.tasks import PLANTED
from fedbpt.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_config(config: dict | None = None, preset: str | None = None, **options) -> dict:
    """The validated run config, with research inputs (tiny-random, planted) built and named by path, and the
    checkpoint to resume from checked against it."""
    from fedbpt.core.checkpoint import check_compatible, load
    from fedbpt.core.config import clients_per_round, make

    cfg = make(config, preset, **options)
    if cfg["model_name"] == TINY_NAME or cfg["task_name"] == PLANTED:
        from fedbpt.research.tiny import materialize

        cfg = materialize(cfg)
    if cfg["resume"]:
        check_compatible(load(cfg["resume"]), cfg, min(clients_per_round(cfg), cfg["num_clients"]))
    return cfg


def preflight(cfg: dict) -> None:
    """``cfg``: a prepared config (:func:`prepare_config`)."""
    from transformers import AutoConfig, AutoTokenizer

    from fedbpt.core.config import check_machine, prompt_placement, scorer_options
    from fedbpt.core.data import load_split, site_data
    from fedbpt.core.models import check_model_folder, model_kind, resolve_model
    from fedbpt.core.scorer import check_model_source, label_token_ids
    from fedbpt.core.tasks import get_task

    check_machine(cfg)
    task = get_task(cfg["task_name"])
    if task.name == PLANTED:  # synthetic: built and checked when it was materialized
        name = resolve_model(cfg["model_name"])
        check_memory(cfg, name, AutoConfig.from_pretrained(name), model_kind(name), task)
        return
    train = load_split(task, "train", cfg["data_dir"])
    # the k-shot sample and the split of every site (what site-1's would raise, all would)
    site1 = site_data(
        task,
        None,
        cfg["k_shot"],
        cfg["num_clients"],
        0,
        cfg["iid"],
        cfg["alpha_dir"],
        cfg["seed"],
        full_train=train,
        scheme=cfg["partition"],
        dev_shot=cfg["dev_shot"],
    )
    test = load_split(task, task.test_split, cfg["data_dir"])
    name = resolve_model(cfg["model_name"])  # smollm2-135m: converted here once, before the clients start
    check_model_source(name)
    check_model_folder(name)
    kind = model_kind(name)
    if kind == "causal" and task.causal is None:
        raise ConfigError(
            f"task {task.name} has no causal-LM template: use a masked LM, or add one in fedbpt/core/tasks.py"
        )
    if kind == "masked" and prompt_placement(cfg) == "after_input":
        raise ConfigError("--prompt_placement after_input needs a causal LM: use --prompt_placement front (or auto)")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the tokenizer of '{name}' ({str(exc).splitlines()[0][:120]}): pass --model_name with a "
            f"local model directory, or --model_name tiny-random for an offline smoke run"
        ) from None
    words = task.causal.label_words if kind == "causal" else task.label_words
    label_token_ids(tok, words, scorer_options(cfg, kind)["label_encoding"])  # the clients would refuse the same
    check_fitting(cfg, task, tok, config, kind, {"train": site1.train, "test": test})
    check_memory(cfg, name, config, kind, task)


def check_memory(cfg: dict, name: str, config, kind: str, task) -> None:
    """Refuse a simulator run that cannot fit this machine's memory or its GPUs (core.memory)."""
    from fedbpt.core import memory
    from fedbpt.core.causal import HOLD_BUDGET_BYTES, KV_BUDGET_BYTES

    cuda = cfg.get("gpu") is not None or str(cfg.get("device") or "").startswith("cuda")
    gpu_bytes = None
    if cuda:
        import torch

        if torch.cuda.is_available():
            gpu_bytes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    device = "cuda" if gpu_bytes is not None else "cpu"
    examples = (cfg["k_shot"] + cfg["dev_shot"]) * task.num_classes  # the whole train + dev pool: no site holds more
    shape = memory.model_shape(name, config)
    needs = memory.estimate(cfg, shape, kind, examples, KV_BUDGET_BYTES[device], HOLD_BUDGET_BYTES[device])
    total, available = memory.machine_ram()
    memory.check_fits(cfg, needs, total, gpu_bytes)
    ram, _ = memory.ram_needed(cfg, needs, gpu_bytes is not None)
    if available is not None and ram > available:
        log.warning(
            "this run may need about %.1f GiB of memory and %.1f GiB is free now: it may swap or be killed; "
            "lower --threads if it does",
            ram / memory.GIB,
            available / memory.GIB,
        )


def check_fitting(cfg: dict, task, tok, config, kind: str, sets: dict) -> None:
    """Refuse a run whose every training or test example the scorer would drop as too long."""
    from fedbpt.core import causal, scorer
    from fedbpt.core.config import prompt_placement

    n = cfg["n_prompt_tokens"]
    for split, examples in sets.items():
        if kind == "causal":
            kept = causal.count_fitting(tok, config, task, examples, n, prompt_placement(cfg))
            limit = causal.max_length(config)
        else:
            kept, limit = scorer.count_fitting(tok, task, examples, n), scorer.MAX_SEQ_LEN
        if len(examples) and not kept:
            raise ConfigError(
                f"every {split} example of site-1 is longer than the model's {limit} positions with a {n}-token "
                f"prompt: lower --n_prompt_tokens, or use shorter texts"
            )
