"""End to end: job.py in the NVFlare simulator, its summary, and the exported job folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, resolve

from fedbpt.core.server.inprocess import run_in_process
from fedbpt.core.server.summary import verdict
from fedbpt.core.site.runtime import RuntimePool
from fedbpt.flare.preflight import prepare_config

SMALL = [
    "--model_name",
    "tiny-random",
    "--k_shot",
    "8",
    "--n_prompt_tokens",
    "6",
    "--intrinsic_dim",
    "20",
    "--local_iter",
    "3",
]

pytestmark = pytest.mark.slow


def launch(tmp_path, data_dir, *args) -> tuple[subprocess.Popen, Path]:
    """Start job.py in the simulator; :func:`finish` waits for it."""
    ws = tmp_path / "ws"
    cmd = [sys.executable, os.path.join(REPO, "job.py"), "--data_dir", data_dir, "--workspace", str(ws), *SMALL, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ws


def finish(proc: subprocess.Popen, ws: Path):
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    with open(ws / "fedbpt_summary.json") as f:
        return json.load(f), ws, stdout, stderr


def simulate(tmp_path, data_dir, *args):
    return finish(*launch(tmp_path, data_dir, *args))


@pytest.fixture(scope="module")
def three_clients(tmp_path_factory, toy_data_dir):
    return simulate(tmp_path_factory.mktemp("sim3"), toy_data_dir, "--num_clients", "3", "--num_rounds", "3")


def fobs_bytes_down(fobs, rnd: int, d: int, cov_mode: str) -> int:
    """What the controller counts for a round's message: the FOBS-serialised Shareable of these shapes."""
    from nvflare.apis.dxo import DXO, DataKind

    from fedbpt.core.algorithm.search import GlobalState
    from fedbpt.core.wire import encode_state

    state = GlobalState(rnd, np.zeros(d), 1.0, np.eye(d))
    return len(
        fobs.dumps(
            DXO(
                data_kind=DataKind.COLLECTION, data={"state": encode_state(state, cov_mode), "evaluate": 1}
            ).to_shareable()
        )
    )


def test_simulator_run_writes_a_complete_summary(three_clients, nvflare_fobs):
    summary, ws, log, _ = three_clients
    assert summary["status"] == "completed"
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert sorted(r["clients"]) == ["site-1", "site-2", "site-3"]
        for key in ("dev_acc", "test_acc", "train_acc"):
            assert 0.0 <= r[key] <= 1.0
        assert r["sigma"] > 0 and np.isfinite(r["best_fitness"]) and r["seconds"] > 0
        assert r["best_fitness"] <= r["median_fitness"]
        # the default --cov_mode none sends the paper's message: mean (d float64) and sigma, no covariance
        none, diag = (fobs_bytes_down(nvflare_fobs, r["round"], 20, mode) for mode in ("none", "diag"))
        assert diag - none >= 20 * 4  # the diagonal (d float32) would show
        assert abs(r["bytes_down"] - none) < 64  # FOBS details of the server process differ by a few bytes
        assert r["bytes_up"] > 20 * 8  # the upload carries the mean
        assert f"round {r['round']}/3" in log  # one progress line per round
    final = summary["final"]
    assert final["round"] == 3 and 0.0 <= final["dev_acc"] <= 1.0
    # best is chosen by dev accuracy among the evaluated prompts (rounds 0..2 and the final one), a tie by the lower
    # dev loss, then the earlier round
    devs = {r["round"]: (r["dev_acc"], r["dev_loss"]) for r in rounds} | {3: (final["dev_acc"], final["dev_loss"])}
    best = summary["best"]
    assert best["round"] == min(devs, key=lambda k: (-devs[k][0], devs[k][1], k))
    assert (best["dev_acc"], best["dev_loss"]) == devs[best["round"]]
    z_best, z_final = np.load(ws / best["z"]), np.load(ws / final["z"])
    assert z_best.shape == z_final.shape == (20,)
    if best["round"] == 0:
        assert not z_best.any()  # round 0 is the zero prompt
    # tiny-random is built once before the run and named by its folder (a hash of texts, label words and seed)
    assert os.path.basename(summary["prompt"].pop("model_name")).startswith("tiny-random-sst2-")
    assert summary["prompt"] == {
        "task_name": "sst2",
        "seed": 1234,
        "intrinsic_dim": 20,
        "n_prompt_tokens": 6,
        "cat_or_add": "auto",  # as configured: add for this masked model (config.MODEL_KIND_DEFAULTS)
        "prompt_placement": "front",  # auto resolved: the paper's placement
        "sigma": 1.0,
    }
    assert (
        ws / "nvflare" / "server" / "simulate_job" / "tb_events"
    ).is_dir()  # TensorBoard scalars through NVFlare analytics


# Every line job.py's console may show without --verbose, and NVFlare's per-task chatter that it must not
PROJECT_LINE = re.compile(
    r"note: .*|running \d+ sites x \d+ rounds in the NVFlare simulator; NVFlare's messages: .*"
    r"|(setup|round \d+|final evaluation): sites done \d+/\d+|round \d+/\d+ \| .*|final \(\d+ rounds\) \| .*"
    r"|best round by dev acc: .*|summary: .*|test accuracy: .*|log: .*|curves: .*"
)
CHATTER = ("Finished one task run", "ClientTaskWorker started", "Initialize ClientRunner", "End the Simulator run")


def test_the_console_shows_the_run_and_the_log_file_nvflare(three_clients):
    summary, ws, out, err = three_clients
    lines = out.strip().splitlines()
    assert [line for line in lines if not PROJECT_LINE.fullmatch(line)] == [], out
    assert not any(chatter in out + err for chatter in CHATTER), out + err
    assert not re.search(r"\d\.\d{5,}", out)  # every accuracy rounded
    for r in summary["rounds"]:
        assert sum(line.startswith(f"round {r['round']}/3 | ") for line in lines) == 1  # one progress line each
    assert sum(line.startswith("final (3 rounds) | ") for line in lines) == 1
    line = verdict(summary)
    assert (
        line is not None and lines.index(line) == lines.index(f"summary: {ws / 'fedbpt_summary.json'} (completed)") + 1
    )
    assert lines[-2].startswith(f"log: {ws / 'fedbpt_log.txt'} ")
    assert lines[-1] == f"curves: {ws / 'fedbpt_curves.png'}"
    log = (ws / "fedbpt_log.txt").read_text()
    assert all(chatter in log for chatter in CHATTER), log[-3000:]
    assert "round 2/3 | " in log and line in log  # the controller's lines too
    png = ws / "fedbpt_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        assert im.size[0] > 800


def test_the_simulator_and_the_in_process_runner_agree(three_clients, toy_data_dir, tmp_path):
    """The NVFlare classes are glue only: the same config gives the same prompt without NVFlare."""
    summary, ws, _, _ = three_clients
    cfg = prepare_config(
        resolve(
            [
                "--data_dir",
                toy_data_dir,
                *SMALL,
                "--num_clients",
                "3",
                "--num_rounds",
                "3",
                "--model_cache_dir",
                str(ws / "models"),
                "--torch_threads",
                "1",
            ]
        )
    )
    pool = RuntimePool(cfg, str(tmp_path))
    try:
        local = run_in_process(cfg, pool)
    finally:
        pool.close()
    np.testing.assert_array_equal(local.final_z, np.load(ws / summary["final"]["z"]))
    assert [r["train_acc"] for r in local.rounds] == [r["train_acc"] for r in summary["rounds"]]


def test_fewer_threads_than_clients_gives_the_same_run(tmp_path, toy_data_dir):
    """With --threads 1 every task runs in a fresh process: nothing may depend on executor state. That run is also
    --verbose: NVFlare's messages on the console, the same results."""
    args = ["--num_clients", "2", "--num_rounds", "1"]  # a round and the final evaluation: 3 fresh processes a site
    # both at once: the runs are independent, and much of a run is spent starting processes and polling
    runs = [
        launch(tmp_path / f"t{n}", toy_data_dir, *args, "--threads", str(n), *(["--verbose"] if n == 1 else []))
        for n in (1, 2)
    ]
    try:
        (one, ws1, out1, _), (two, ws2, out2, _) = (finish(*run) for run in runs)
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert one["status"] == two["status"] == "completed"
    np.testing.assert_array_equal(np.load(ws1 / "prompt_final.npy"), np.load(ws2 / "prompt_final.npy"))
    assert [r["dev_acc"] for r in one["rounds"]] == [r["dev_acc"] for r in two["rounds"]]
    assert "- INFO - Finished one task run" in out1 and "round 0/1 | " in out1
    for run in (one, two):
        assert all(set(r["setup_seconds"]) == set(r["import_seconds"]) == {"site-1", "site-2"} for r in run["rounds"])
    # --threads 1: each task's fresh process sets the site up again, from its own set-up cache (written once)
    assert all(v > 0 for r in one["rounds"] for v in r["setup_seconds"].values())
    assert all(v == 0 for r in two["rounds"] for v in r["setup_seconds"].values())  # built by the setup task
    metas = sorted(ws1.rglob("fedbpt_setup/site-*/*/meta.json"))
    assert [m.parent.parent.name for m in metas] == ["site-1", "site-2"]
    assert all(m.parent.parent.parent.parent.name == m.parent.parent.name for m in metas)  # in the site's workspace
    assert "set-up cache read" in "".join(p.read_text(errors="replace") for p in ws1.rglob("*log.txt"))
    assert "Finished one task run" not in out2 and out2.strip().splitlines()[-1].startswith("curves: ")


def test_job_py_export_names_the_job_folder(tmp_path):
    """job.py as a subprocess; test_export.py checks the folder's contents in depth."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "job.py"),
            "--export",
            "--export-dir",
            str(tmp_path),
            "--job_name",
            "fedbpt_x",
            *SMALL,
            "--model_name",
            "roberta-large",
            "--num_clients",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job = tmp_path / "fedbpt_x"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["name"] == "fedbpt_x" and meta["min_clients"] == 2
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert server["workflows"][0]["path"] == "fedbpt.flare.controller.FedBPTController"
    assert server["workflows"][0]["args"]["config"]["intrinsic_dim"] == 20
    assert client["executors"][0]["executor"]["path"] == "fedbpt.flare.executor.FedBPTExecutor"
    text = json.dumps([server, client])
    assert str(REPO) not in text and "/tmp/" not in text  # nothing from the exporting machine
