"""FedBPTRecipe as a user's own script drives it: SimEnv, then an export for POC; the same prompt as job.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import JOB, REPO

pytestmark = pytest.mark.slow

USER_SCRIPT = """\
import sys

from nvflare.recipe import SimEnv

from fedbpt import FedBPTRecipe

data, sim, jobs = sys.argv[1:]
recipe = FedBPTRecipe(preset="configs/tiny.yaml", data_dir=data, num_clients=2, num_rounds=2, torch_threads=1)
recipe.run(SimEnv(num_clients=2, workspace_root=sim))
recipe.export(jobs)  # then: nvflare job submit -j jobs/fedbpt (POC or production)
"""


def final_prompt(folder: str) -> np.ndarray:
    with open(os.path.join(folder, "fedbpt_summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed", summary.get("reason")
    return np.load(os.path.join(folder, summary["final"]["z"]))


def test_a_user_script_runs_simenv_exports_for_poc_and_matches_job_py(toy_data_dir, tmp_path):
    script = tmp_path / "my_fedbpt.py"
    script.write_text(USER_SCRIPT)
    assert len(USER_SCRIPT.strip().splitlines()) < 15
    sim, jobs, ws = str(tmp_path / "sim"), str(tmp_path / "jobs"), str(tmp_path / "ws")
    args = ["--config", "configs/tiny.yaml", "--data_dir", toy_data_dir, "--num_clients", "2", "--num_rounds", "2"]
    # the script and job.py at once: independent runs, much of each spent starting processes and polling
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in (
            [sys.executable, str(script), toy_data_dir, sim, jobs],
            [sys.executable, JOB, *args, "--torch_threads", "1", "--workspace", ws],
        )
    ]
    try:
        errs = [proc.communicate(timeout=900)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, err in zip(procs, errs):
        assert proc.returncode == 0, err[-3000:]
    via_recipe = final_prompt(os.path.join(sim, "fedbpt", "server", "simulate_job"))

    with open(os.path.join(jobs, "fedbpt", "app", "config", "config_fed_server.json")) as f:
        assert "task_request_interval" not in f.read()  # the export polls as deployed, not at SimEnv's 0.05 s

    via_job_py = final_prompt(ws)
    assert via_recipe.shape == (50,) and np.any(via_recipe != 0)
    np.testing.assert_array_equal(via_recipe, via_job_py)


def test_simenv_must_run_the_recipes_number_of_clients(toy_data_dir):
    from nvflare.recipe import SimEnv

    from fedbpt import ConfigError, FedBPTRecipe

    recipe = FedBPTRecipe(preset=os.path.join(REPO, "configs", "tiny.yaml"), data_dir=toy_data_dir, num_clients=2)
    with pytest.raises(ConfigError, match="SimEnv runs 3 clients, the recipe's num_clients is 2"):
        recipe.run(SimEnv(num_clients=3, workspace_root="/nonexistent/never-created"))


POC_SCRIPT = """\
import json, os, sys

from nvflare.recipe import PocEnv

from fedbpt import FedBPTRecipe

data = sys.argv[1]
recipe = FedBPTRecipe(preset="configs/tiny.yaml", data_dir=data, num_clients=2, num_rounds=2, k_shot=8, torch_threads=1)
run = recipe.run(PocEnv(num_clients=2))
result = run.get_result(timeout=600, clean_up=False)
with open(os.path.join(result, "workspace", "fedbpt_summary.json")) as f:
    print(json.dumps({"status": run.get_status(), "summary": json.load(f)["status"]}))
"""


def test_the_recipe_runs_on_a_poc_deployment(toy_data_dir, tmp_path):
    """PocEnv provisions, starts and stops a local deployment itself (here in a private HOME and POC workspace)."""
    import psutil

    script = tmp_path / "poc_run.py"
    script.write_text(POC_SCRIPT)
    ws = str(tmp_path / "poc")
    env = dict(os.environ, HOME=str(tmp_path / "home"), NVFLARE_POC_WORKSPACE=ws)
    out = subprocess.run(
        [sys.executable, str(script), toy_data_dir], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"status": "FINISHED:COMPLETED", "summary": "completed"}
    # PocEnv's stop asks every process to end; a site's restart loop (sub_start.sh) notices within seconds
    left = [p for p in psutil.process_iter(["cmdline"]) if ws in " ".join(p.info["cmdline"] or [])]
    _, alive = psutil.wait_procs(left, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, [p.info["cmdline"] for p in alive]
