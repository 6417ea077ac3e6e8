"""The exported job folder is what a real deployment receives: it must be complete and free of this machine's paths."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import job
from fedbpt import checkpoint
from fedbpt.config import DEFAULTS, validate
from fedbpt.federation import Federation

BASE = ["--model_name", "tiny-random", "--num_clients", "2", "--num_rounds", "3", "--intrinsic_dim", "8"]


def export(tmp_path, *extra: str) -> str:
    out = str(tmp_path / "jobs")
    assert job.main([*BASE, "--export", "--export-dir", out, *extra]) == 0
    return os.path.join(out, "fedbpt")


def configs(job_dir: str) -> tuple[dict, dict, dict]:
    def read(*parts):
        with open(os.path.join(job_dir, *parts)) as f:
            return json.load(f)

    app = ("app", "config")
    return read("meta.json"), read(*app, "config_fed_server.json"), read(*app, "config_fed_client.json")


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
    assert wf["path"] == "fedbpt.controller.FedBPTController"
    assert wf["args"]["config"]["round_timeout"] == 90 and wf["args"]["config"]["intrinsic_dim"] == 8
    (ex,) = client["executors"]
    assert ex["executor"]["path"] == "fedbpt.executor.FedBPTExecutor"
    assert set(ex["tasks"]) == {"fedbpt_setup", "fedbpt_round", "fedbpt_eval"}
    assert ex["executor"]["args"]["config"] == wf["args"]["config"]
    # nothing that points into the exporting machine (the data folder is the sites' business: see site.py)
    assert not [s for s in strings([meta, server, client]) if s.startswith(os.sep) or s.startswith("~")]


def test_exported_job_keeps_nvflare_default_polling(tmp_path):
    """0.05 s polling is for the simulator: a deployed site would ask the server 20 times a second."""
    _, server, client = configs(export(tmp_path))
    assert "task_request_interval" not in json.dumps(server) + json.dumps(client)


def test_exported_custom_code_is_complete(tmp_path):
    custom = os.path.join(export(tmp_path), "app", "custom")
    shipped = {f[:-3] for f in os.listdir(os.path.join(custom, "fedbpt")) if f.endswith(".py")}
    needed = set()
    for name in shipped:
        with open(os.path.join(custom, "fedbpt", name + ".py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedbpt."):
                needed.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "fedbpt":
                pytest.fail(f"fedbpt/{name}.py uses 'from fedbpt import ...', which the exporter does not follow")
    assert {"controller", "executor", "checkpoint", "fault", "site"} <= shipped
    assert needed <= shipped, f"imported but not shipped: {sorted(needed - shipped)}"
    # and the shipped code imports on its own, without this repository on the path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import fedbpt.controller, fedbpt.executor, fedbpt.checkpoint; print(fedbpt.controller.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=custom, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(custom)


def test_export_with_resume_ships_the_checkpoint(tmp_path):
    cfg = validate(dict(DEFAULTS, model_name="tiny-random", num_clients=2, num_rounds=1, intrinsic_dim=8))
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
    cfg = validate(dict(DEFAULTS, model_name="tiny-random", num_clients=2, num_rounds=1, intrinsic_dim=9))
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
