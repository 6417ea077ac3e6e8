"""A real NVFlare deployment on loopback (POC mode): provision, start, submit the exported job, fetch, stop.

The exported job carries no data path: each site finds its data through its own ``local/fedbpt_site.json``, as a
site of a real project would. The result must equal, bit for bit, the same run done in-process, which is what the
simulator runs too: the deployment changes where the code runs, not what it computes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from deploy_util import NO_DATA, SST2, OwnedProcesses, small_sst2

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(SST2), reason=NO_DATA)]

JOB_ARGS = [  # configs/tiny.yaml, but naming no data folder: the sites know where their data is
    "--model_name", "tiny-random", "--task_name", "sst2", "--n_prompt_tokens", "10", "--intrinsic_dim", "50",
    "--num_clients", "2", "--num_rounds", "2", "--k_shot", "8", "--torch_threads", "1", "--round_timeout", "300",
]  # fmt: skip
ADMIN = "admin@nvidia.com"
JOB_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    out = subprocess.run([nvflare, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"nvflare {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_exported_job_runs_on_a_poc_deployment(tmp_path, monkeypatch):
    import job

    t_start = time.time()
    home, poc, jobs, download = (tmp_path / n for n in ("home", "poc", "jobs", "download"))
    home.mkdir()
    data = small_sst2(str(tmp_path / "data"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDBPT_FAULT")}
    env.update(
        HOME=str(home),  # the POC CLI keeps its settings in ~/.nvflare
        NVFLARE_POC_WORKSPACE=str(poc),
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),  # start.sh runs 'python3'
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    monkeypatch.setenv("HOME", str(home))  # the Session API in this process reads it too

    # Provision: the standard 2-site POC project, then the same project on free ports (other deployments may run).
    cli(env, "poc", "prepare", "-n", "2", "--force")
    project = yaml.safe_load((poc / "project.yml").read_text())
    port = free_port()
    for p in project["participants"]:
        if p["type"] == "server":
            p["fed_learn_port"] = port
            p["admin_port"] = port
    (tmp_path / "project.yml").write_text(yaml.safe_dump(project))
    cli(env, "poc", "prepare", "-i", str(tmp_path / "project.yml"), "--force")
    prod = poc / project["name"] / "prod_00"
    assert f"localhost:{port}" in (prod / "site-1" / "startup" / "fed_client.json").read_text()
    # Site-local data: each site says where its files are (site-2 also states its shard explicitly).
    (prod / "site-1" / "local" / "fedbpt_site.json").write_text(json.dumps({"data_dir": data}))
    (prod / "site-2" / "local" / "fedbpt_site.json").write_text(json.dumps({"data_dir": data, "site_index": 2}))

    assert job.main([*JOB_ARGS, "--export", "--export-dir", str(jobs)]) == 0
    job_dir = jobs / "fedbpt"
    t_prepared = time.time()

    log = open(tmp_path / "poc_start.log", "w")
    starter = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "nvflare"), "poc", "start"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # everything the deployment starts lives in this session or below it
    )
    owned = OwnedProcesses(starter.pid)
    summary = job_meta = None
    try:
        assert starter.wait(timeout=180) == 0, (tmp_path / "poc_start.log").read_text()
        owned.scan()
        t_started = time.time()

        from nvflare.fuel.flare_api.flare_api import new_secure_session

        session = new_secure_session(ADMIN, str(prod / ADMIN), timeout=60)
        try:
            job_id = session.submit_job(str(job_dir))
            deadline = time.time() + JOB_TIMEOUT
            while time.time() < deadline:
                owned.scan()  # job processes run in sessions of their own: collect them while they live
                job_meta = session.get_job_meta(job_id)
                if job_meta["status"].startswith("FINISHED"):
                    break
                time.sleep(1.0)
            t_job = time.time()
            result = session.download_job_result(job_id, str(download))
        finally:
            session.close()
        workspace = os.path.join(result, "workspace")
        with open(os.path.join(workspace, "fedbpt_summary.json")) as f:
            summary = json.load(f)
    finally:
        owned.scan()
        t_stop0 = time.time()
        stop = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "nvflare"), "poc", "stop"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        left = owned.wait_gone(timeout=60)
        t_stopped = time.time()
        if left:
            owned.kill()  # never leak, but this is a failure of the deployment's own shutdown
        log.close()
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not left, f"processes still running after 'nvflare poc stop': {[p.pid for p in left]}"
    print(
        f"\nPOC timings: provision+export {t_prepared - t_start:.1f}s, start {t_started - t_prepared:.1f}s, "
        f"job {t_job - t_started:.1f}s, stop {t_stopped - t_stop0:.1f}s, total {t_stopped - t_start:.1f}s; "
        f"{len(owned.known)} processes started and all gone"
    )

    assert job_meta["status"] == "FINISHED:COMPLETED", job_meta
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert all(r["clients"] == ["site-1", "site-2"] and not r["missing"] for r in summary["rounds"])
    assert summary["final"]["test_acc"] is not None and summary["config"]["data_dir"] is None
    z = np.load(os.path.join(workspace, "prompt_final.npy"))
    assert z.shape == (summary["config"]["intrinsic_dim"],)
    from fedbpt.checkpoint import CHECKPOINT_FILE, load

    assert load(os.path.join(workspace, CHECKPOINT_FILE)).round == 2

    # The same run in-process (the simulator's arithmetic): identical prompt and trajectory.
    from fedbpt.client import RuntimePool
    from fedbpt.config import resolve
    from fedbpt.federation import run_in_process

    cfg = resolve([*JOB_ARGS, "--data_dir", data])
    local = run_in_process(cfg, RuntimePool(cfg, str(tmp_path / "cache")))
    assert np.array_equal(local.final_z, z)
    assert [r["sigma"] for r in local.rounds] == [r["sigma"] for r in summary["rounds"]]
