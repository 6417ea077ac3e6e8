"""Faults in the NVFlare simulator, injected with FEDBPT_FAULT: sites that raise, crash or hang.

Two simulator runs (each ~30-60 s on 2 cores) serve several tests through module fixtures:
- tolerated: 3 sites, --min_clients 1; site-2 raises in round 0 and crashes in round 1, site-3 hangs in round 1.
- stopped: 2 sites, --min_clients 2, --gpu 0,1; site-2 raises in round 1, so the run stops; it is then resumed.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from deploy_util import small_sst2
from helpers import NO_SST2, REPO, SST2

from fedbpt.core.server.checkpoint import CHECKPOINT_FILE

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir(SST2), reason=NO_SST2)]

ROUND_TIMEOUT = 10


def run_job(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FEDBPT_FAULT"}
    if fault:
        env["FEDBPT_FAULT"] = fault
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "job.py"), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def base_args(data: str, workspace: str, clients: int, rounds: int) -> list[str]:
    return [
        "--config", os.path.join(REPO, "configs", "tiny.yaml"), "--data_dir", data, "--workspace", workspace,
        "--num_clients", str(clients), "--num_rounds", str(rounds), "--k_shot", "8", "--torch_threads", "1",
    ]  # fmt: skip


def site_log(workspace: str, site: str) -> str:
    logs = glob.glob(os.path.join(workspace, "nvflare", site, "**", "log.txt"), recursive=True)
    return "".join(open(p).read() for p in logs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return small_sst2(str(tmp_path_factory.mktemp("sst2")))


@pytest.fixture(scope="module")
def tolerated(data, tmp_path_factory):
    ws = str(tmp_path_factory.mktemp("tolerated"))
    args = base_args(data, ws, 3, 3) + ["--min_clients", "1", "--round_timeout", str(ROUND_TIMEOUT)]
    out = run_job(args, fault="site-2:0:raise,site-2:1:exit,site-3:1:hang")
    with open(os.path.join(ws, "fedbpt_summary.json")) as f:
        return out, json.load(f), ws


def test_faulty_sites_are_left_out_and_the_run_completes(tolerated):
    out, summary, _ = tolerated
    assert out.returncode == 0, out.stderr[-2000:]
    assert summary["status"] == "completed" and summary["final"] is not None
    got = [(r["clients"], r["missing"]) for r in summary["rounds"]]
    assert got == [
        (["site-1", "site-3"], ["site-2"]),  # site-2 raised
        (["site-1"], ["site-2", "site-3"]),  # site-2's process died, site-3 hangs
        (["site-1"], ["site-2", "site-3"]),  # both are gone for good
    ]


def test_missing_sites_are_logged(tolerated):
    out, _, _ = tolerated
    log = out.stdout + out.stderr
    assert "site-2 failed fedbpt_round: InjectedFault: site-2: injected fault in round 0" in log
    assert "round 0: no usable update from site-2" in log
    assert "site-2 did not answer fedbpt_round in time: later rounds will not wait for it" in log
    assert "site-3 did not answer fedbpt_round in time: later rounds will not wait for it" in log
    assert "round 1: no usable update from site-2, site-3" in log


def test_lost_sites_are_not_waited_for_again(tolerated):
    _, summary, _ = tolerated
    seconds = [r["seconds"] for r in summary["rounds"]]
    assert seconds[1] >= ROUND_TIMEOUT  # the round in which they failed waited for them
    assert seconds[2] < ROUND_TIMEOUT / 2  # the next one did not


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    ws = str(tmp_path_factory.mktemp("stopped"))
    out = run_job(base_args(data, ws, 2, 3) + ["--gpu", "0,1"], fault="site-2:1:raise")
    return out, ws


def test_too_few_clients_stop_the_run_with_a_clear_message(stopped):
    out, ws = stopped
    assert out.returncode != 0
    ckpt = os.path.join(ws, CHECKPOINT_FILE)
    last = out.stderr.strip().splitlines()[-1]
    with open(os.path.join(ws, "fedbpt_summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "failed" and [r["round"] for r in summary["rounds"]] == [0]
    assert summary["rounds_done"] == 1 and summary["resume"].endswith(f"--resume {ckpt}")
    assert last == (
        "error: the run stopped: round 1: 1 usable updates, fewer than --min_clients 2 (missing: site-2); "
        f"continue with: {summary['resume']}"
    )


def test_gpu_groups_reach_the_clients_as_cuda_visible_devices(stopped):
    """--gpu 0,1 puts site-1 on GPU group 0 and site-2 on group 1; with no GPU here both fall back to the CPU."""
    _, ws = stopped
    assert "on cpu (CUDA_VISIBLE_DEVICES=0)" in site_log(ws, "site-1")
    assert "on cpu (CUDA_VISIBLE_DEVICES=1)" in site_log(ws, "site-2")


def test_resumed_run_equals_an_uninterrupted_one(stopped, data, tmp_path):
    _, ws = stopped
    ckpt = os.path.join(ws, CHECKPOINT_FILE)
    with open(os.path.join(ws, "fedbpt_summary.json")) as f:
        first_round = json.load(f)["rounds"][0]
    resumed = str(tmp_path / "resumed")
    out = run_job(base_args(data, resumed, 2, 3) + ["--resume", ckpt])
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(resumed, "fedbpt_summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][0] == first_round  # carried over from the checkpoint
    z = np.load(os.path.join(resumed, "prompt_final.npy"))

    from helpers import resolve

    from fedbpt.core.server.inprocess import run_in_process
    from fedbpt.core.site.runtime import RuntimePool
    from fedbpt.flare.preflight import prepare_config

    cfg = prepare_config(resolve(base_args(data, str(tmp_path), 2, 3)))
    uninterrupted = run_in_process(cfg, RuntimePool(cfg, str(tmp_path / "cache")))
    assert np.array_equal(uninterrupted.final_z, z)
    assert [r["sigma"] for r in uninterrupted.rounds] == [r["sigma"] for r in summary["rounds"]]
