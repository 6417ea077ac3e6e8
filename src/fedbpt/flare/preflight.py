"""From a run configuration to one that is ready and checked against this machine, its data and its model.

What would otherwise fail inside every client process (a tokenizer that cannot load, label words that are not
single tokens, texts that never fit the model, a run larger than the machine's memory or its GPUs) fails here once,
as a one-line ConfigError.
"""

from __future__ import annotations

import logging
import os

from fedbpt.core.config import Launch, RunConfig, gpu_groups, show
from fedbpt.core.data.tasks import PLANTED
from fedbpt.core.models.resolve import TINY_NAME
from fedbpt.errors import ConfigError, opt

log = logging.getLogger(__name__)


def prepare_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` ready to run on this machine: paths made absolute and checked, research inputs (tiny-random, planted)
    built and named by path, and the checkpoint to resume from checked against it. Runs once per run, before the
    job is built."""
    from fedbpt.core.server.checkpoint import load
    from fedbpt.core.server.federation import check_compatible

    changes = {}
    if cfg.data_dir:
        changes["data_dir"] = os.path.abspath(os.path.expanduser(cfg.data_dir))
        if not os.path.isdir(changes["data_dir"]):
            raise ConfigError(f"{opt('data_dir')} {changes['data_dir']} is not a directory", option="data_dir")
    if cfg.resume:
        changes["resume"] = os.path.abspath(os.path.expanduser(cfg.resume))
        if not os.path.isfile(changes["resume"]):
            raise ConfigError(
                f"{opt('resume')} {changes['resume']} is not a file: pass the fedbpt_checkpoint.npz of a run",
                option="resume",
            )
    cfg = cfg.replace(**changes) if changes else cfg
    if cfg.model_name == TINY_NAME or cfg.task_name == PLANTED:
        from fedbpt.research.inputs import materialize

        cfg = materialize(cfg)
    if cfg.resume:
        check_compatible(load(cfg.resume), cfg, min(cfg.clients_per_round, cfg.num_clients))
    return cfg


def check_sites(cfg: RunConfig, sites: list[str]) -> None:
    """The simulator's sites (site-1..site-N) include every --eval_clients site (a deployment's may have any name)."""
    bad = [s for s in cfg.eval_sites if s not in sites]
    if bad:
        raise ConfigError(
            f"{opt('eval_clients')} {','.join(bad)} is not a site: sites are site-1..site-{len(sites)}",
            option="eval_clients",
        )


def preflight(cfg: RunConfig, launch: Launch | None = None) -> None:
    """Check a prepared config (:func:`prepare_config`) against this machine, its data and its model, for a run in
    the simulator here (``launch``: its threads and GPU groups; default: a thread per client, no GPU groups)."""
    from transformers import AutoConfig, AutoTokenizer

    from fedbpt.core.data.splits import load_split, site_data
    from fedbpt.core.data.tasks import get_task
    from fedbpt.core.models.resolve import check_model_folder, model_kind, resolve_model
    from fedbpt.core.models.scorer import check_model_source, label_token_ids

    launch = (launch or Launch()).for_run(cfg)
    check_sites(cfg, [f"site-{i}" for i in range(1, cfg.num_clients + 1)])
    check_machine(cfg, launch)
    task = get_task(cfg.task_name)
    if task.name == PLANTED:  # synthetic: built and checked when it was materialized
        name = resolve_model(cfg.model_name)
        check_memory(cfg, launch, name, AutoConfig.from_pretrained(name), model_kind(name), task)
        return
    train = load_split(task, "train", cfg.data_dir)
    # the k-shot sample and the split of every site (what site-1's would raise, all would)
    site1 = site_data(
        task,
        None,
        cfg.k_shot,
        cfg.num_clients,
        0,
        cfg.iid,
        cfg.alpha_dir,
        cfg.seed,
        full_train=train,
        scheme=cfg.partition,
        dev_shot=cfg.dev_shot,
    )
    test = load_split(task, task.test_split, cfg.data_dir)
    name = resolve_model(cfg.model_name)  # smollm2-135m: converted here once, before the clients start
    check_model_source(name)
    check_model_folder(name)
    kind = model_kind(name)
    if kind == "causal" and task.causal is None:
        raise ConfigError(
            f"task {task.name} has no causal-LM template: use a masked LM, or add one in fedbpt/core/data/tasks.py"
        )
    if kind == "masked" and cfg.placement == "after_input":
        raise ConfigError(
            f"{opt('prompt_placement')} after_input needs a causal LM: use {opt('prompt_placement')} front (or auto)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name)
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the tokenizer of '{name}' ({str(exc).splitlines()[0][:120]}): pass {opt('model_name')} "
            "with a "
            f"local model directory, or {opt('model_name')} tiny-random for an offline smoke run"
        ) from None
    words = task.causal.label_words if kind == "causal" else task.label_words
    label_token_ids(tok, words, cfg.scorer_options(kind)["label_encoding"])  # the clients would refuse the same
    check_fitting(cfg, task, tok, config, kind, {"train": site1.train, "test": test})
    check_memory(cfg, launch, name, config, kind, task)


def check_machine(cfg: RunConfig, launch: Launch) -> None:
    """Refuse, with one line, what this machine cannot run: an unknown --device, CUDA (a cuda device, --gpu,
    --precision bf16/fp16) where there is none, GPU ids it does not have. For the simulator, before any process
    starts (an exported job runs elsewhere: not checked there). Imports torch."""
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    physical = "CUDA_VISIBLE_DEVICES" not in os.environ  # else --gpu ids need not match what this process sees
    device = cfg.device
    kind = "cuda" if cuda else "cpu"
    if device:
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(
                f"{opt('device')} {show(device)} is not a torch device: use cpu, cuda or cuda:<i>, or leave it out"
            ) from None
        kind = parsed.type
        if kind == "cuda":
            if not cuda:
                raise ConfigError(
                    f"{opt('device')} {device}: this machine has no CUDA GPU (torch {torch.__version__}): use "
                    f"{opt('device')} cpu, "
                    f"or leave {opt('device')} out"
                )
            if parsed.index is not None and launch.gpu is None and physical and parsed.index >= count:
                raise ConfigError(
                    f"{opt('device')} {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}: use one of "
                    f"those, or {opt('device')} cuda"
                )
        elif kind != "cpu":
            backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
            available = getattr(backend, "is_available", None)
            if not (callable(available) and available()):
                raise ConfigError(
                    f"{opt('device')} {device}: no {kind} device on this machine: use {opt('device')} cpu or cuda"
                )
    precision = cfg.precision
    if precision != "fp32" and kind != "cuda":  # CPUs without bf16 units emulate it: matmuls ~200x slower (measured)
        where = f"--device {device}" if device else "this machine, which has no CUDA GPU"
        raise ConfigError(
            f"{opt('precision')} {precision} needs a CUDA device, not {where}: use {opt('precision')} fp32"
        )
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{opt('precision')} bf16: this GPU has no bfloat16 support: use {opt('precision')} fp16 or fp32"
        )
    gpu = launch.gpu
    if gpu is not None:
        ids = [int(i) for group in gpu_groups(gpu) for i in group.split(",")]
        # without CUDA the groups still reach the clients as CUDA_VISIBLE_DEVICES, and they run on the CPU
        if cuda and physical and max(ids) >= count:
            raise ConfigError(f"{opt('gpu')} {gpu}: this machine has {count} GPU(s), ids 0..{count - 1}: use those ids")


def check_memory(cfg: RunConfig, launch: Launch, name: str, config, kind: str, task) -> None:
    """Refuse a simulator run that cannot fit this machine's memory or its GPUs (core.memory)."""
    from fedbpt.core import memory
    from fedbpt.core.models.causal import HOLD_BUDGET_BYTES, KV_BUDGET_BYTES

    cuda = launch.gpu is not None or str(cfg.device or "").startswith("cuda")
    gpu_bytes = None
    if cuda:
        import torch

        if torch.cuda.is_available():
            gpu_bytes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    device = "cuda" if gpu_bytes is not None else "cpu"
    examples = (cfg.k_shot + cfg.dev_shot) * task.num_classes  # the whole train + dev pool: no site holds more
    shape = memory.model_shape(name, config)
    needs = memory.estimate(cfg, shape, kind, examples, KV_BUDGET_BYTES[device], HOLD_BUDGET_BYTES[device])
    total, available = memory.machine_ram()
    memory.check_fits(launch.threads, launch.gpu, needs, total, gpu_bytes)
    ram, _ = memory.ram_needed(launch.threads, needs, gpu_bytes is not None)
    if available is not None and ram > available:
        log.warning(
            "this run may need about %.1f GiB of memory and %.1f GiB is free now: it may swap or be killed; "
            "lower --threads if it does",
            ram / memory.GIB,
            available / memory.GIB,
        )


def check_fitting(cfg: RunConfig, task, tok, config, kind: str, sets: dict) -> None:
    """Refuse a run whose every training or test example the scorer would drop as too long."""
    from fedbpt.core.models import causal, scorer

    n = cfg.n_prompt_tokens
    for split, examples in sets.items():
        if kind == "causal":
            kept = causal.count_fitting(tok, config, task, examples, n, cfg.placement)
            limit = causal.max_length(config)
        else:
            kept, limit = scorer.count_fitting(tok, task, examples, n), scorer.MAX_SEQ_LEN
        if len(examples) and not kept:
            raise ConfigError(
                f"every {split} example of site-1 is longer than the model's {limit} positions with a {n}-token "
                f"prompt: lower {opt('n_prompt_tokens')}, or use shorter texts"
            )
