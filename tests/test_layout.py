"""The package's layering: each layer imports only itself and the layers below it, no module cycles, the core runs
without NVFlare, and ``import fedbpt`` is cheap.

Layers, bottom up: ``errors``; ``core`` (NVFlare-free, shipped in every job; its roles in ``CORE_ROLES``);
``research`` (tiny random models, planted tasks, fault plans: inputs built before a job, or drills); ``flare`` (the
NVFlare job: controller, executor, recipe, preparation, the guarded simulator); ``cli`` (job.py's front end).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from helpers import REPO

SRC = os.path.join(REPO, "src", "fedbpt")
LAYERS = ("errors", "core", "research", "flare", "cli")


def modules(sub: str) -> list[str]:
    """The modules under ``fedbpt.<sub>``, subpackages included (``fedbpt.core.models.scorer``)."""
    out = []
    for root, dirs, files in os.walk(os.path.join(SRC, sub)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        pkg = "fedbpt." + os.path.relpath(root, SRC).replace(os.sep, ".")
        out += [f"{pkg}.{f[:-3]}" for f in files if f.endswith(".py") and f != "__init__.py"]
    return sorted(out)


def all_modules() -> list[str]:
    return ["fedbpt.errors"] + [m for sub in LAYERS[1:] for m in modules(sub)]


def imported(module: str) -> set[str]:
    """The fedbpt modules ``module`` imports, lazy imports inside functions included (NVFlare's exporter follows
    them too); ``from fedbpt.core import memory`` counts as fedbpt.core.memory."""
    path = os.path.join(SRC, *module.split(".")[1:]) + ".py"
    with open(path) as f:
        tree = ast.parse(f.read())
    known = set(all_modules())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedbpt"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fedbpt"))
    return out - {module}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1]) if module.count(".") else -1


def test_every_module_imports_only_its_layer_and_those_below():
    bad = [
        f"{m} imports {i}" for m in all_modules() for i in sorted(imported(m)) if i != "fedbpt" and layer(i) > layer(m)
    ]
    assert not bad, bad


# The core's roles, bottom up: a module imports only its own role and those before it. server and site are peers:
# neither imports the other (the wire format is all they share).
CORE_ROLES = ("state", "data", "models", "algorithm", "wire", "config", "memory", "server", "site")


def role(module: str) -> str:
    return module.split(".")[2]


def test_the_core_roles_import_downward_only():
    core = [m for m in all_modules() if m.startswith("fedbpt.core.")]
    assert sorted({role(m) for m in core}) == sorted(CORE_ROLES)  # each module or folder of the core has a role
    bad = [
        f"{m} imports {i}"
        for m in core
        for i in sorted(imported(m))
        if i.startswith("fedbpt.core.") and CORE_ROLES.index(role(i)) > CORE_ROLES.index(role(m))
    ]
    bad += [
        f"{m} imports {i}"
        for m in core
        for i in imported(m)
        if i.startswith("fedbpt.core.") and {role(m), role(i)} == {"server", "site"}
    ]
    assert not bad, bad


def test_no_import_cycles():
    names = set(all_modules())
    graph = {m: {i for i in imported(m) if i in names} for m in names}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_import_fedbpt_loads_neither_nvflare_nor_torch():
    code = "import sys, fedbpt; print(sorted(m for m in ('nvflare', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_core_imports_without_nvflare():
    names = ", ".join(modules("core"))
    code = f"import sys, {names}; print('nvflare' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("module", ["fedbpt.flare.controller", "fedbpt.flare.executor"])
def test_what_a_job_ships_holds_no_research_or_front_end_code(module):
    """The server's and the clients' components, and all they import: the code every deployed job carries."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(i for i in imported(m) if i in set(all_modules()))
    assert not [m for m in seen if layer(m) in (LAYERS.index("research"), LAYERS.index("cli"))], sorted(seen)


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
