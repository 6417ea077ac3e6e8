"""How much memory a run needs, from its config and the model's files alone (nothing is loaded), and whether it
fits: preflight refuses, in one line naming the option to change, a run that would end minutes later in a
MemoryError or an out-of-memory kill.

What is counted (each term checked against a measurement in ``python -m bench.memory``):

- the server process: pycma's CMA-ES over z keeps about ``CMA_MATRICES`` d x d float64 arrays at its peak (the
  covariance, its eigenvectors, and the copies a tell and a checkpoint make);
- each client process: the Python process with torch and transformers imported, the weights in their dtype, the
  projection A (fp32), its local CMA-ES, the largest forward pass, and the text keys/values a causal LM holds
  after the input; on a GPU its RAM holds the weights while they load (an fp32 checkpoint cast to bf16: both);
- how many of them run at once: the simulator's ``--threads`` client processes, on the CPU or on the first GPU of
  their ``--gpu`` group (one process per group at a time when there are several groups).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedbpt.errors import ConfigError, opt

if TYPE_CHECKING:
    from fedbpt.core.config import RunConfig

GIB = 1 << 30
CMA_MATRICES = 8  # d x d float64 arrays at the server's peak (measured 4.6-6.4 during a round, plus the checkpoint)
PROCESS_BYTES = 700 << 20  # a Python process with torch, transformers and NVFlare imported (RSS, CPU)
CUDA_CONTEXT_BYTES = 600 << 20  # what a process's CUDA context and allocator take on its GPU before any tensor
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# per token of a forward pass, in units of (hidden x dtype bytes): the residual stream, q/k/v and attention output,
# layer-norm and FFN input copies alive at once, plus the FFN's intermediate width (twice: before and after the
# activation), counted separately
PASS_HIDDEN_COPIES = 8
HELD_TOKENS_PER_EXAMPLE = 64  # held text keys/values per training or dev example (SST-2 sentences: about 14-25)


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int  # key (or value) width per token per layer: kv heads x head dim


@dataclass(frozen=True)
class MemoryNeeds:
    """Bytes the run needs: per server and per client process, and the client parts that live on a GPU."""

    server: int
    process: int
    weights: int
    projection: int
    local_es: int
    activations: int
    held: int
    load_peak: int  # RAM while the weights load: an fp32 checkpoint read and cast holds both copies for a moment

    @property
    def client_on_device(self) -> int:
        """What a client puts on its device: weights, A, the largest pass, held keys/values."""
        return self.weights + self.projection + self.activations + self.held

    @property
    def client(self) -> int:
        """One client process on the CPU: everything in RAM."""
        return self.process + self.local_es + self.client_on_device


def model_shape(model_path: str, config) -> ModelShape:
    """The model's sizes from its config; the parameter count from the safetensors headers of a local folder (exact),
    else from the config (embeddings + per layer attention and FFN weights)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    inter = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(text, "head_dim", 0) or hidden // heads)
    params = safetensors_params(model_path)
    if params is None:
        vocab = int(getattr(text, "vocab_size", 0))
        params = vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter)
    return ModelShape(params, hidden, inter, layers, kv_heads * head_dim)


def safetensors_params(model_path: str) -> int | None:
    """Parameters stored in a local folder's safetensors files (read from their headers), or None."""
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors"))) if os.path.isdir(model_path) else []
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= int(dim)
                total += n
    return total


def estimate(
    cfg: RunConfig,
    shape: ModelShape,
    kind: str,
    examples_per_site: int,
    kv_budget: int = 8 << 30,
    hold_budget: int = 16 << 30,
) -> MemoryNeeds:
    """The memory ``cfg`` needs with a model of ``shape`` (``kind`` masked or causal); ``examples_per_site``:
    the train + dev examples of the largest site (held as keys/values after the input); ``kv_budget`` and
    ``hold_budget``: the causal scorer's caps on a pass's keys/values and on the held ones, on the run's device."""
    d = cfg.intrinsic_dim
    es = CMA_MATRICES * d * d * 8
    width = DTYPE_BYTES[cfg.precision]
    pass_tokens = cfg.max_batch_tokens
    kv = 0  # a causal pass keeps its keys/values; the scorer caps them at kv_budget bytes, so the pass at fewer tokens
    per_token = 2 * shape.layers * shape.kv_width * width
    if kind == "causal":
        pass_tokens = max(1, min(pass_tokens, kv_budget // max(1, per_token)))
        kv = pass_tokens * per_token
    activations = pass_tokens * (PASS_HIDDEN_COPIES * shape.hidden + 2 * shape.intermediate) * width + kv
    held = 0
    if kind == "causal" and cfg.placement == "after_input":
        held = min(hold_budget, per_token * examples_per_site * HELD_TOKENS_PER_EXAMPLE)
    return MemoryNeeds(
        server=PROCESS_BYTES + es,
        process=PROCESS_BYTES,
        weights=shape.params * width,
        projection=d * cfg.n_prompt_tokens * shape.hidden * 4,
        local_es=es,
        activations=activations,
        held=held,
        load_peak=shape.params * (4 + (width if width != 4 else 0)),
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def ram_needed(threads: int, needs: MemoryNeeds, on_gpu: bool) -> tuple[int, int]:
    """(the run's RAM: server and ``threads`` client processes at once, one client process's RAM)."""
    client_ram = needs.process + needs.local_es + (needs.load_peak if on_gpu else needs.client_on_device)
    return needs.server + threads * client_ram, client_ram


def check_fits(
    threads: int, gpu: str | None, needs: MemoryNeeds, available_ram: int | None, gpu_bytes: list[int] | None = None
) -> None:
    """Refuse a simulator run that cannot fit: the server and ``threads`` clients in ``available_ram`` (the
    machine's total: a run over what is free now may still fit), on CUDA each GPU's clients in ``gpu_bytes[i]``
    (the GPUs this process sees, by physical id)."""
    from fedbpt.core.config import gpu_groups

    on_gpu = gpu_bytes is not None
    ram, client_ram = ram_needed(threads, needs, on_gpu)
    if available_ram is not None and ram > available_ram:
        if needs.server > available_ram / 2:
            fix = f"lower {opt('intrinsic_dim')} (the server's CMA-ES keeps d x d matrices)"
        else:
            fit = max(0, int((available_ram - needs.server) // client_ram))
            fix = (
                f"run {opt('threads')} {fit} clients at once"
                if fit
                else f"use a smaller model or {opt('intrinsic_dim')}"
            )
        raise ConfigError(
            f"this run needs about {_gib(ram)} of memory (server {_gib(needs.server)}, {threads} client processes at "
            f"{_gib(client_ram)} each) and the machine has {_gib(available_ram)} available: {fix}"
        )
    if not on_gpu:
        return
    groups = gpu_groups(gpu) if gpu else [",".join(str(i) for i in range(len(gpu_bytes)))]
    per_group = 1 if len(groups) > 1 else threads  # several groups: NVFlare runs one client per group at a time
    users: dict[int, int] = {}
    for group in groups:
        first = int(group.split(",")[0])  # a client runs on the first GPU of its group
        users[first] = users.get(first, 0) + per_group
    each = needs.client_on_device + CUDA_CONTEXT_BYTES
    for gpu, count in sorted(users.items()):
        if gpu < len(gpu_bytes) and count * each > gpu_bytes[gpu]:
            fit = int(gpu_bytes[gpu] // each)
            fix = (
                f"run {opt('threads')} {fit} clients at once, spread them over GPU groups ({opt('gpu')} 0,1), or use "
                f"{opt('precision')} bf16"
                if fit
                else f"use {opt('precision')} bf16, a lower {opt('max_batch_tokens')}, or a larger GPU"
            )
            raise ConfigError(
                f"GPU {gpu} would hold {count} client processes at {_gib(each)} each ({_gib(count * each)}) and has "
                f"{_gib(gpu_bytes[gpu])}: {fix}"
            )


def machine_ram() -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) of this machine in bytes; None where they cannot be read."""
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found.get("MemTotal"), found.get("MemAvailable")
