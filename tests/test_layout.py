"""The package's layering: the core runs without NVFlare, production modules never reach research code, and
``import fedbpt`` is cheap."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from helpers import REPO

SRC = os.path.join(REPO, "src", "fedbpt")


def modules(sub: str) -> list[str]:
    return sorted(f[:-3] for f in os.listdir(os.path.join(SRC, sub)) if f.endswith(".py") and f != "__init__.py")


def imported(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):  # lazy imports inside functions count: NVFlare's exporter follows them too
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_import_fedbpt_loads_neither_nvflare_nor_torch():
    code = "import sys, fedbpt; print(sorted(m for m in ('nvflare', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_core_imports_without_nvflare():
    names = ", ".join(f"fedbpt.core.{m}" for m in modules("core"))
    code = f"import sys, {names}; print('nvflare' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("sub", ["core", "flare"])
def test_production_modules_never_import_research_or_cli_code(sub):
    # the one exception: preparing a run config builds tiny-random / planted before the job exists
    allowed = {("core", "preflight"): {"fedbpt.research.tiny"}, ("flare", "recipe"): {"fedbpt.research.fault"}}
    for m in modules(sub):
        bad = {
            i for i in imported(os.path.join(SRC, sub, m + ".py")) if i.startswith(("fedbpt.research", "fedbpt.cli"))
        }
        assert bad <= allowed.get((sub, m), set()), f"fedbpt/{sub}/{m}.py imports {sorted(bad)}"


def test_requirements_install_the_package_with_the_pinned_torch():
    """requirements.txt lists no dependency of its own (pyproject.toml's is the one list): torch as pinned there, then
    the package itself."""
    import tomllib

    with open(os.path.join(REPO, "requirements.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert lines == [next(d for d in deps if d.startswith("torch")), "."]
    for name in ("job.py", "src", "configs", "requirements.txt", "README.md", "tests", "figs"):
        assert os.path.exists(os.path.join(REPO, name)), name  # the mission's top-level layout
