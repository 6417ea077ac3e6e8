"""A real NVFlare deployment on loopback (POC mode): provision, start, submit (the recipe through ProdEnv and the admin
kit; the exported job through the admin API), fetch, stop.

The exported job carries no data path: each site finds its data through its own ``local/fedbpt_site.json``, as a
site of a real project would. Results must equal, bit for bit, the same run done in-process (the simulator's
arithmetic): a deployment changes where the code runs, not what it computes. The second test stops the whole
deployment in the middle of a run, restarts it and resumes from the server's checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from deploy_util import PocDeployment, small_sst2
from helpers import NO_SST2, SST2

from fedbpt.core.server.checkpoint import CHECKPOINT_FILE, load
from fedbpt.errors import CheckpointError

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(SST2), reason=NO_SST2)]

JOB_ARGS = [  # configs/tiny.yaml, but naming no data folder: the sites know where their data is
    "--model_name", "tiny-random", "--task_name", "sst2", "--n_prompt_tokens", "10", "--intrinsic_dim", "50",
    "--num_clients", "2", "--k_shot", "8", "--torch_threads", "1", "--round_timeout", "300",
]  # fmt: skip
JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("poc"))
    home = os.environ.get("HOME")
    dep = PocDeployment(root)
    os.environ["HOME"] = dep.home  # the Session API in this process reads ~ too
    try:
        data = small_sst2(os.path.join(root, "data"))
        t0 = time.time()
        dep.prepare()
        # Site-local data: each site says where its files are (site-2 also states its shard explicitly).
        with open(os.path.join(dep.prod, "site-1", "local", "fedbpt_site.json"), "w") as f:
            json.dump({"data_dir": data}, f)
        with open(os.path.join(dep.prod, "site-2", "local", "fedbpt_site.json"), "w") as f:
            json.dump({"data_dir": data, "site_index": 2}, f)
        t1 = time.time()
        dep.start()
        dep.timings.update(prepare=t1 - t0, start=time.time() - t1)
        yield dep, data
    finally:
        t0 = time.time()
        failure = dep.stop()
        left = dep.kill_leftovers()
        os.environ["HOME"] = home
        print(f"\nPOC stop: {time.time() - t0:.1f}s{'; nvflare poc stop failed: ' + failure[-300:] if failure else ''}")
    assert not left, f"processes still running after stopping the deployment: {[p.pid for p in left]}"


def tiny_model(data: str) -> str:
    """tiny-random is built from the training texts, so the export names the folder built from the sites' data (on
    this machine every site reads it; a real project ships a model folder to every site)."""
    from helpers import resolve

    from fedbpt.flare.preflight import prepare_config

    return prepare_config(resolve([*JOB_ARGS, "--data_dir", data])).model_name


def export(tmp_path, data: str, *extra: str) -> str:
    from fedbpt.cli import main as job

    out = str(tmp_path / "jobs")
    assert job.main([*JOB_ARGS, "--model_name", tiny_model(data), *extra, "--export", "--export-dir", out]) == 0
    return os.path.join(out, "fedbpt")


def wait_finished(dep: PocDeployment, session, job_id: str) -> dict:
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:
        dep.scan()  # job processes run in sessions of their own: collect them while they live
        meta = session.get_job_meta(job_id)
        if meta["status"].startswith("FINISHED"):
            return meta
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} did not finish in {JOB_TIMEOUT}s")


def run_to_completion(dep: PocDeployment, job_dir: str, tmp_path) -> tuple[dict, str]:
    """Submit, wait until it finished completed, download: (the summary, the downloaded server workspace)."""
    session = dep.session()
    try:
        job_id = session.submit_job(job_dir)
        meta = wait_finished(dep, session, job_id)
        result = session.download_job_result(job_id, str(tmp_path / "download"))
    finally:
        session.close()
    assert meta["status"] == "FINISHED:COMPLETED", meta
    workspace = os.path.join(result, "workspace")
    with open(os.path.join(workspace, "fedbpt_summary.json")) as f:
        return json.load(f), workspace


def in_process(data: str, rounds: int, cache: str):
    from helpers import resolve

    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool
    from fedbpt.flare.preflight import prepare_config

    cfg = prepare_config(resolve([*JOB_ARGS, "--num_rounds", str(rounds), "--data_dir", data]))
    return run_in_process(cfg, RuntimePool(cfg, cache))


def test_the_recipe_runs_on_a_provisioned_project_through_prodenv(poc, tmp_path):
    """ProdEnv, as on a real project: the admin's startup kit submits the recipe's job to a project provisioned on
    loopback (``nvflare poc prepare -i project.yml`` provisions it, ``nvflare poc start`` starts the server and each
    site from its own startup kit), the sites read their data through ``local/fedbpt_site.json``, and the result is
    downloaded through the same kit. The numbers equal the in-process run's."""
    from helpers import resolve
    from nvflare.recipe import ProdEnv

    from fedbpt import FedBPTRecipe

    dep, data = poc
    recipe = FedBPTRecipe(resolve([*JOB_ARGS, "--model_name", tiny_model(data), "--num_rounds", "2"]))
    assert recipe.config.data_dir is None  # nothing about where the sites' data lives travels with the job
    t0 = time.time()
    run = recipe.run(ProdEnv(startup_kit_location=os.path.join(dep.prod, dep.ADMIN), login_timeout=60))
    deadline = time.time() + JOB_TIMEOUT
    while not str(run.get_status()).startswith("FINISHED") and time.time() < deadline:
        dep.scan()  # job processes run in sessions of their own: collect them while they live
        time.sleep(1.0)
    assert run.get_status() == "FINISHED:COMPLETED"
    result = run.get_result(timeout=120)
    print(
        f"\nPOC: prepare {dep.timings['prepare']:.1f}s, start {dep.timings['start']:.1f}s, "
        f"2-round job through ProdEnv {time.time() - t0:.1f}s"
    )
    workspace = os.path.join(result, "workspace")
    with open(os.path.join(workspace, "fedbpt_summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert all(r["clients"] == ["site-1", "site-2"] and not r["missing"] for r in summary["rounds"])
    assert summary["final"]["test_acc"] is not None and summary["config"]["data_dir"] is None
    z = np.load(os.path.join(workspace, "prompt_final.npy"))
    assert z.shape == (summary["config"]["intrinsic_dim"],)
    assert load(os.path.join(workspace, CHECKPOINT_FILE)).round == 2

    local = in_process(data, 2, str(tmp_path / "cache"))
    assert np.array_equal(local.final_z, z)
    assert [r["sigma"] for r in local.rounds] == [r["sigma"] for r in summary["rounds"]]


def test_run_resumes_after_the_server_is_stopped(poc, tmp_path):
    dep, data = poc
    session = dep.session()
    try:
        job_id = session.submit_job(export(tmp_path / "long", data, "--num_rounds", "40"))
        server_ckpt = os.path.join(dep.prod, "server", job_id, CHECKPOINT_FILE)
        deadline, done = time.time() + JOB_TIMEOUT, 0
        while done < 2 and time.time() < deadline:
            dep.scan()
            time.sleep(0.5)
            try:
                done = load(server_ckpt).round if os.path.exists(server_ckpt) else 0
            except CheckpointError:  # never half-written (atomic rename), but be explicit about what we tolerate
                pytest.fail("the server's checkpoint was unreadable while the run was going")
    finally:
        session.close()
    assert done >= 2, "the long job wrote no checkpoint in time"

    t0 = time.time()
    failure = dep.stop()  # the whole deployment goes down mid-run
    t_stop = time.time() - t0
    assert not failure, failure
    assert not dep.alive(), "processes still running after 'nvflare poc stop'"
    saved = str(tmp_path / CHECKPOINT_FILE)
    shutil.copy(server_ckpt, saved)
    done = load(saved).round
    with open(os.path.join(dep.prod, "server", job_id, "fedbpt_summary.json")) as f:
        stopped = json.load(f)
    assert stopped["status"] == "failed" and stopped["reason"].startswith("aborted")
    assert len(stopped["rounds"]) >= done

    t0 = time.time()
    dep.start()
    t_restart = time.time() - t0
    job_dir = export(tmp_path / "resume", data, "--num_rounds", str(done + 2), "--resume", saved)
    summary, workspace = run_to_completion(dep, job_dir, tmp_path)
    print(f"\nPOC: stopped after {done} rounds in {t_stop:.1f}s, restarted in {t_restart:.1f}s")
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == list(range(done + 2))
    assert summary["rounds"][:done] == stopped["rounds"][:done]
    local = in_process(data, done + 2, str(tmp_path / "cache"))
    assert np.array_equal(local.final_z, np.load(os.path.join(workspace, "prompt_final.npy")))
