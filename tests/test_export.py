"""The exported job folder is what a real deployment receives: complete, lean, polling as deployed, and free of this
machine's paths. FedBPTRecipe and job.py --export give the same folder."""

from __future__ import annotations

import ast
import filecmp
import json
import os
import site
import subprocess
import sys

import numpy as np
import pytest

from fedbpt.cli import main as job
from fedbpt.core.config import RunConfig
from fedbpt.core.server import checkpoint
from fedbpt.core.server.federation import Federation
from fedbpt.errors import ConfigError

# a hub id: exporting resolves nothing, so the job names no path of this machine
BASE = ["--model_name", "roberta-large", "--num_clients", "2", "--num_rounds", "3", "--intrinsic_dim", "8"]
OPTIONS = dict(model_name="roberta-large", num_clients=2, num_rounds=3, intrinsic_dim=8)
RESEARCH_OR_BENCH = ("fedbpt/research/", "fedbpt/cli/", "bench/", "tests/")


def export(tmp_path, *extra: str) -> str:
    out = str(tmp_path / "jobs")
    assert job.main([*BASE, "--export", "--export-dir", out, *extra]) == 0
    return os.path.join(out, "fedbpt")


def recipe_export(tmp_path, **kw) -> str:
    from fedbpt import FedBPTRecipe

    FedBPTRecipe(**{**OPTIONS, **kw}).export(str(tmp_path / "recipe_jobs"))
    return os.path.join(str(tmp_path / "recipe_jobs"), "fedbpt")


def configs(job_dir: str) -> tuple[dict, dict, dict]:
    def read(*parts):
        with open(os.path.join(job_dir, *parts)) as f:
            return json.load(f)

    app = ("app", "config")
    return read("meta.json"), read(*app, "config_fed_server.json"), read(*app, "config_fed_client.json")


def shipped_files(job_dir: str) -> list[str]:
    custom = os.path.join(job_dir, "app", "custom")
    return sorted(os.path.relpath(os.path.join(d, f), custom) for d, _, fs in os.walk(custom) for f in fs)


def strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


def test_export_names_our_components_with_the_run_settings(tmp_path):
    job_dir = export(tmp_path, "--min_clients", "1", "--round_timeout", "90")
    meta, server, client = configs(job_dir)
    assert meta["name"] == "fedbpt" and meta["min_clients"] == 1 and meta["deploy_map"] == {"app": ["@ALL"]}
    (wf,) = server["workflows"]
    assert wf["path"] == "fedbpt.flare.controller.FedBPTController"
    assert wf["args"]["config"]["round_timeout"] == 90 and wf["args"]["config"]["intrinsic_dim"] == 8
    (ex,) = client["executors"]
    assert ex["executor"]["path"] == "fedbpt.flare.executor.FedBPTExecutor"
    assert set(ex["tasks"]) == {"fedbpt_setup", "fedbpt_round", "fedbpt_eval"}
    assert ex["executor"]["args"]["config"] == wf["args"]["config"]
    # nothing that points into the exporting machine (the data folder is the sites' business: see core/site/settings.py)
    assert not [s for s in strings([meta, server, client]) if s.startswith(os.sep) or s.startswith("~")]


def test_recipe_exports_the_same_job_as_job_py(tmp_path):
    a, b = export(tmp_path, "--round_timeout", "30"), recipe_export(tmp_path, round_timeout=30)
    assert configs(a) == configs(b)
    assert shipped_files(a) == shipped_files(b)
    custom_a, custom_b = (os.path.join(x, "app", "custom") for x in (a, b))
    assert all(
        filecmp.cmp(os.path.join(custom_a, f), os.path.join(custom_b, f), shallow=False) for f in shipped_files(a)
    )


def test_exported_job_polls_at_the_deployment_interval(tmp_path):
    """0.05 s polling is for the simulator: a deployed site would ask the server 20 times a second."""
    from fedbpt import FedBPTRecipe

    _, server, client = configs(export(tmp_path))
    assert "task_request_interval" not in json.dumps(server) + json.dumps(client)  # NVFlare's default (2 s)
    _, server, _ = configs(recipe_export(tmp_path, task_request_interval=5.0))
    assert server["server"]["task_request_interval"] == 5.0
    # inside the simulator block the job polls at 0.05 s; afterwards an export is the deployed job again
    recipe = FedBPTRecipe(**OPTIONS)
    with recipe.simulator_polling() as fed_job:
        fed_job.export_job(str(tmp_path / "sim"))
    _, server, _ = configs(str(tmp_path / "sim" / "fedbpt"))
    assert server["server"]["task_request_interval"] == 0.05
    recipe.export(str(tmp_path / "after"))
    _, server, _ = configs(str(tmp_path / "after" / "fedbpt"))
    assert "task_request_interval" not in json.dumps(server)


def test_simenv_shares_the_cores_among_the_client_processes(toy_data_dir, tmp_path, monkeypatch):
    """torch_threads 0: in SimEnv each of the N client processes gets cores // N torch threads (torch alone would
    give every process all of them); a deployed job keeps 0 (one site per machine: torch's default)."""
    from nvflare.recipe import SimEnv
    from nvflare.recipe.spec import Recipe

    from fedbpt import FedBPTRecipe

    def threads_of(job_dir: str) -> int:
        (ex,) = configs(job_dir)[2]["executors"]
        return ex["executor"]["args"]["config"]["torch_threads"]

    runs = []

    def run_writes_the_job(self, env, server_exec_params=None, client_exec_params=None):
        out = tmp_path / f"sim{len(runs)}"
        self.job.export_job(str(out))
        runs.append(threads_of(str(out / "fedbpt")))

    monkeypatch.setattr(Recipe, "run", run_writes_the_job)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    recipe = FedBPTRecipe(preset="configs/tiny.yaml", data_dir=toy_data_dir, num_clients=2, num_rounds=1)
    recipe.run(SimEnv(num_clients=2))
    recipe.run(SimEnv(num_clients=2, num_threads=1))
    FedBPTRecipe(preset="configs/tiny.yaml", data_dir=toy_data_dir, num_clients=2, torch_threads=3).run(
        SimEnv(num_clients=2)
    )
    assert runs == [4, 8, 3]
    recipe.export(str(tmp_path / "deployed"))
    assert threads_of(str(tmp_path / "deployed" / "fedbpt")) == 0


def test_exported_custom_code_is_complete_and_holds_no_research_code(tmp_path):
    job_dir = export(tmp_path)
    custom = os.path.join(job_dir, "app", "custom")
    shipped = shipped_files(job_dir)
    modules = {f[:-3].replace(os.sep, ".") for f in shipped if f.endswith(".py")}
    assert {
        "fedbpt.flare.controller",
        "fedbpt.flare.executor",
        "fedbpt.core.server.checkpoint",
        "fedbpt.core.site.settings",
    } <= modules
    assert not [f for f in shipped if f.startswith(RESEARCH_OR_BENCH)], shipped
    assert all(f.startswith(("fedbpt/core/", "fedbpt/flare/", "fedbpt/errors.py")) for f in shipped), shipped
    needed = set()
    for f in shipped:
        with open(os.path.join(custom, f)) as src:
            tree = ast.parse(src.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedbpt."):
                subs = {f"{node.module}.{a.name}" for a in node.names}  # from fedbpt.core import memory
                needed |= (subs & modules) or {node.module}
            elif isinstance(node, ast.ImportFrom) and node.module == "fedbpt":
                pytest.fail(f"{f} uses 'from fedbpt import ...', which the exporter does not follow")
    assert needed <= modules, f"imported but not shipped: {sorted(needed - modules)}"
    # and the shipped code imports on its own from the job folder (its package __init__ files stay behind): -S
    # skips the .pth files, so the editable install of this checkout cannot supply what the folder lacks
    code = (
        f"import sys; sys.path[:0] = ['.']; sys.path += {site.getsitepackages()!r}; "
        "import fedbpt.flare.controller as c, fedbpt.flare.executor as e; print(c.__file__); print(e.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=custom, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(line.startswith(custom) for line in out.stdout.split()), out.stdout


def test_a_fault_plan_ships_the_fault_injector_and_only_then(tmp_path):
    _, _, client = configs(recipe_export(tmp_path, fault_plan="site-2:1:raise"))
    (ex,) = client["executors"]
    assert ex["executor"]["path"] == "fedbpt.flare.drill.FaultInjectingExecutor"
    assert ex["executor"]["args"]["plan"] == "site-2:1:raise"
    shipped = shipped_files(os.path.join(str(tmp_path / "recipe_jobs"), "fedbpt"))
    assert {"fedbpt/flare/drill.py", "fedbpt/research/fault.py"} <= set(shipped)
    with pytest.raises(ConfigError, match="item 'site-2:x' is not site:round:mode"):
        recipe_export(tmp_path, fault_plan="site-2:x")


def test_recipe_options_are_checked_strictly(capsys):
    from fedbpt import FedBPTRecipe

    with pytest.raises(TypeError, match="num_client"):  # typed keywords: a misspelt option is Python's own error
        FedBPTRecipe(num_client=3)
    # messages name the keyword options, as a Python caller wrote them (job.py names its flags)
    for bad, name in (
        (dict(num_rounds="many"), "num_rounds"),
        (dict(num_rounds=0), "num_rounds"),
        (dict(frac=2.0), "frac"),
    ):
        with pytest.raises(ConfigError) as exc:
            FedBPTRecipe(**bad)
        assert str(exc.value).startswith(f"{name} ") and "--" not in str(exc.value), exc.value
    assert job.main(["--num_rounds", "0"]) == 2
    assert "error: --num_rounds must be at least 1, got 0" in capsys.readouterr().err  # job.py names its flags
    with pytest.raises(ConfigError, match="task_request_interval must be a positive number"):
        FedBPTRecipe(task_request_interval=0)


def test_export_with_resume_ships_the_checkpoint(tmp_path):
    cfg = RunConfig.build(**{**OPTIONS, "num_rounds": 1})
    fed = Federation(cfg, ["site-1", "site-2"])
    fed.start_round(0)
    path = checkpoint.save(fed, 0, str(tmp_path / "run"))
    job_dir = export(tmp_path, "--resume", path)
    _, server, _ = configs(job_dir)
    assert server["workflows"][0]["args"]["config"]["resume"] == checkpoint.CHECKPOINT_FILE  # relative
    shipped = os.path.join(job_dir, "app", "config", checkpoint.CHECKPOINT_FILE)
    with open(shipped, "rb") as a, open(path, "rb") as b:
        assert a.read() == b.read()
    # the controller resolves the relative name against its app config folder
    assert checkpoint.resolve_path("fedbpt_checkpoint.npz", "/ws/run/app_server/config") == (
        "/ws/run/app_server/config/fedbpt_checkpoint.npz"
    )
    assert np.array_equal(checkpoint.load(shipped).arrays["es.mean"], fed.server.es.mean)


def test_export_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    cfg = RunConfig.build(**{**OPTIONS, "intrinsic_dim": 9, "num_rounds": 1})
    path = checkpoint.save(Federation(cfg, ["site-1", "site-2"]), 0, str(tmp_path / "run"))
    out = str(tmp_path / "jobs")
    assert job.main([*BASE, "--export", "--export-dir", out, "--resume", path]) == 2
    assert "--intrinsic_dim 9 there, 8 here" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_deployed_sites_may_have_any_names(tmp_path, capsys):
    """Simulator sites are site-1..N; a real project names its sites (eval clients included) as it likes."""
    export(tmp_path, "--eval_clients", "hospital-a")
    assert job.main([*BASE, "--eval_clients", "hospital-a"]) == 2
    assert "--eval_clients hospital-a is not a site: sites are site-1..site-2" in capsys.readouterr().err
