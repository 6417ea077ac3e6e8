"""What a run must never do: delete files it did not create, leave processes behind, end without a summary that
says what happened, write NaN into JSON, or die on a small --bound."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import JOB, REPO

from fedbpt.cli.main import resume_command
from fedbpt.core.algorithm.aggregation import ServerES
from fedbpt.core.algorithm.search import local_search
from fedbpt.core.config import RunConfig
from fedbpt.core.server.federation import Federation
from fedbpt.core.server.summary import SUMMARY_FILE, RunSummary
from fedbpt.core.wire import ClientUpdate
from fedbpt.errors import ConfigError
from fedbpt.flare import simulator, workspace


def strict_load(path: str) -> dict:
    """json.load that refuses NaN and Infinity, as a strict JSON reader does."""

    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---- workspace policy ---------------------------------------------------------------------------------------
@pytest.fixture
def protected(tmp_path):
    home, project, cwd = tmp_path / "home", tmp_path / "home" / "project", tmp_path / "home" / "project" / "sub"
    cwd.mkdir(parents=True)
    return {"the current directory": str(cwd), "the project checkout": str(project), "the home directory": str(home)}


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda t: "", "workspace is empty"),
        (lambda t: "   ", "workspace is empty"),
        (lambda t: "/", "workspace / would be wiped"),
        (lambda t: str(t / "home" / "project" / "sub"), "holds the current directory"),
        (lambda t: str(t / "home" / "project"), "holds the current directory"),
        (lambda t: str(t / "home"), "holds the current directory"),
        (lambda t: str(t), "holds the current directory"),
        (lambda t: (t / "afile").write_text("x") and str(t / "afile"), "is a file"),
        (lambda t: _user_folder(t), "holds files this tool did not create"),
        (lambda t: (t / "f").write_text("x") and str(t / "f" / "ws"), "cannot be created"),
    ],
)
def test_a_workspace_that_could_destroy_other_files_is_refused(make, fragment, tmp_path, protected):
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=fragment) as err:
        workspace.check(path, protected)
    assert "\n" not in str(err.value)


def _user_folder(t) -> str:
    d = t / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return str(d)


def test_new_empty_and_marked_workspaces_are_accepted(tmp_path, protected):
    workspace.check(str(tmp_path / "new" / "ws"), protected)  # created later
    (tmp_path / "empty").mkdir()
    workspace.check(str(tmp_path / "empty"), protected)
    marked = tmp_path / "marked"
    workspace.prepare(str(marked), None)
    (marked / "nvflare").mkdir()
    workspace.check(str(marked), protected)


@pytest.mark.parametrize("ws", ["", ".", "userdir"])
def test_job_refuses_such_a_workspace_before_touching_anything(ws, tmp_path):
    """--workspace "" used to mean the current directory, which the simulator then wiped."""
    (tmp_path / "precious.txt").write_text("keep me")
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "notes.txt").write_text("keep me too")
    out = subprocess.run(
        [sys.executable, JOB, "--model_name", "tiny-random", "--workspace", ws],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --workspace"), out.stderr
    assert sorted(os.listdir(tmp_path)) == ["precious.txt", "userdir"]
    assert os.listdir(tmp_path / "userdir") == ["notes.txt"]


def test_a_new_run_moves_the_previous_results_and_keeps_its_resume_checkpoint(tmp_path):
    ws = tmp_path / "ws"
    workspace.prepare(str(ws), None)
    for name in workspace.RESULT_FILES:
        (ws / name).write_text(f"first run: {name}")
    (ws / "models").mkdir()
    (ws / "models" / "m.bin").write_text("model")
    ckpt = str(ws / "fedbpt_checkpoint.npz")
    resume, notes = workspace.prepare(str(ws), ckpt)
    assert resume == str(ws / "previous" / "fedbpt_checkpoint.npz")
    assert open(resume).read() == "first run: fedbpt_checkpoint.npz"
    assert len(notes) == 1 and "moved the previous run's results" in notes[0]
    assert not any((ws / n).exists() for n in workspace.RESULT_FILES)
    assert (ws / "models" / "m.bin").exists()
    # the run after that replaces previous/ (only the files an earlier move put there)
    (ws / SUMMARY_FILE).write_text("second run")
    (ws / "previous" / "mine.txt").write_text("a user's file")
    workspace.prepare(str(ws), None)
    assert open(ws / "previous" / SUMMARY_FILE).read() == "second run"
    assert not (ws / "previous" / "fedbpt_checkpoint.npz").exists()
    assert (ws / "previous" / "mine.txt").exists()


# ---- the summary of a run that did not finish -------------------------------------------------------------------
def test_a_run_killed_before_its_summary_gets_a_failed_one_with_the_resume_command(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    run_dir = ws / "nvflare" / "server" / "simulate_job"
    run_dir.mkdir(parents=True)
    (run_dir / "fedbpt_checkpoint.npz").write_bytes(b"checkpoint of round 3")
    monkeypatch.setattr(simulator, "_rounds_done", lambda path: 3 if path == str(ws / "fedbpt_checkpoint.npz") else 0)
    monkeypatch.setattr(sys, "argv", [JOB])
    argv = ["--config", "configs/tiny.yaml", "--resume", "old.npz", "--workspace", str(ws)]
    record = simulator.finish_summary(str(ws), None, "interrupted by SIGTERM", lambda c: resume_command(argv, c))
    on_disk = strict_load(str(ws / SUMMARY_FILE))
    assert on_disk == record
    assert record["status"] == "failed" and record["reason"] == "interrupted by SIGTERM"
    assert record["rounds_done"] == 3
    assert record["resume"].endswith(
        f"job.py --config configs/tiny.yaml --workspace {ws} --resume {ws / 'fedbpt_checkpoint.npz'}"
    )
    assert (ws / "fedbpt_checkpoint.npz").read_bytes() == b"checkpoint of round 3"


def test_a_run_killed_before_any_checkpoint_points_at_the_one_it_resumed_from(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    (ws / "nvflare").mkdir(parents=True)
    start = str(tmp_path / "start.npz")
    monkeypatch.setattr(simulator, "_rounds_done", lambda path: 2 if path == start else 0)
    script = tmp_path / "bin" / "fedbpt"  # the console script: its resume command names it, not job.py
    script.parent.mkdir()
    script.write_text("#!/usr/bin/env python\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    record = simulator.finish_summary(
        str(ws), start, "interrupted by SIGINT", lambda c: resume_command(["--resume", start], c)
    )
    assert record["rounds_done"] == 2 and record["resume"] == f"{script} --resume {start}"
    from fedbpt.cli import main

    monkeypatch.setattr(sys, "argv", [main.__file__])  # python -m fedbpt.cli.main
    assert resume_command([], start) == f"{sys.executable} -m fedbpt.cli.main --resume {start}"
    record = simulator.finish_summary(str(ws), None, "interrupted by SIGINT", lambda c: resume_command([], c))
    assert record["rounds_done"] == 0 and record["resume"] is None


def test_summaries_are_strict_json_and_a_run_without_scored_examples_fails(tmp_path):
    s = RunSummary(RunConfig.build(), "acc")
    empty = {"train_loss": float("nan"), "train_n": 0, "train_confusion": np.zeros((2, 2), dtype=np.int64)}
    s.add_round(0, np.zeros(4), {"site-1": empty}, ["site-1"], sigma=float("inf"))
    s.add_final(1, np.zeros(4), {"site-1": empty})
    assert s.status == "failed" and "no example was scored for train" in s.reason
    path = s.write(str(tmp_path))
    record = strict_load(path)
    assert record["rounds"][0]["train_acc"] is None and record["rounds"][0]["sigma"] is None


def test_preflight_refuses_a_run_whose_every_example_would_be_dropped(toy_data_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, JOB, "--model_name", "tiny-random", "--data_dir", toy_data_dir, "--k_shot", "8"]
        + ["--n_prompt_tokens", "600", "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "every train example of site-1 is longer" in lines[0], out.stderr
    assert "--n_prompt_tokens" in lines[0]
    assert not glob.glob(str(tmp_path / "ws" / "nvflare"))  # no process was started


# ---- server side ------------------------------------------------------------------------------------------------
def test_a_server_side_exception_leaves_a_failed_summary(tmp_path, monkeypatch):
    from fedbpt.flare.controller import FedBPTController

    cfg = RunConfig.build(intrinsic_dim=8, num_clients=2, num_rounds=2)
    ctrl = FedBPTController(config=cfg.to_job())
    ctrl.out_dir = str(tmp_path)
    panics = []
    monkeypatch.setattr(ctrl, "system_panic", lambda reason, fl_ctx: panics.append(reason))
    monkeypatch.setattr(ctrl, "log_error", lambda *a, **k: None)
    monkeypatch.setattr(ctrl, "log_exception", lambda *a, **k: None)

    def broken(abort_signal, fl_ctx):
        ctrl.fed = Federation(cfg, ["site-1", "site-2"])
        raise KeyError("a bug in round 1")

    monkeypatch.setattr(ctrl, "_control_flow", broken)
    ctrl.control_flow(None, None)
    record = strict_load(str(tmp_path / SUMMARY_FILE))
    assert record["status"] == "failed" and record["reason"].startswith("server error KeyError")
    assert panics == [record["reason"]]


def test_sites_that_failed_setup_are_left_out_of_every_round():
    cfg = RunConfig.build(intrinsic_dim=8, num_clients=4, min_clients=2, num_rounds=5)
    fed = Federation(cfg, ["site-1", "site-2", "site-3", "site-4"])
    fed.drop_sites(["site-2", "site-4"])
    for rnd in range(5):
        targets, _ = fed.start_round(rnd)
        assert targets == ["site-1", "site-3"]


@pytest.mark.parametrize("bound", [0.1, 0.01])
def test_a_small_bound_keeps_the_server_mean_in_the_box_for_every_round(bound):
    """pycma keeps the mean in genotype space, which near a small box's faces lies outside it; a client started
    from that point refused it, and the run died in round 1 with "0 usable updates"."""
    d, k = 50, 3
    server = ServerES(d, 1.0, k, seed=1, bound=bound)

    def objective(z):
        z = np.atleast_2d(z)
        return (z**2).sum(-1) + (z[:, 0] - bound / 2) ** 2

    for rnd in range(6):
        state = server.state(rnd)
        assert np.abs(state.mean).max() <= bound
        updates = []
        for i in range(k):
            res = local_search(state, objective, 5, 4, 10 * rnd + i, bound)
            assert np.abs(res.mean).max() <= bound
            updates.append(ClientUpdate(f"site-{i}", res.mean, res.fitness, res.sigmas, 5, 10, res.sigma_final))
        server.aggregate(updates)
    assert objective(server.state(6).mean)[0] < objective(np.full(d, bound))[0]


# ---- signals ----------------------------------------------------------------------------------------------------
def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(procs: list) -> list:
    """Those of ``procs`` still running (not ended, not a zombie)."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:  # ended between the two checks
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_process_and_leaves_a_failed_summary(sig, toy_data_dir, tmp_path):
    ws = tmp_path / "ws"
    args = [sys.executable, JOB, "--config", os.path.join(REPO, "configs", "tiny.yaml"), "--data_dir", toy_data_dir]
    args += ["--k_shot", "8", "--num_clients", "2", "--num_rounds", "500", "--workspace", str(ws)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not glob.glob(str(ws / "nvflare" / "server" / "*" / "fedbpt_checkpoint.npz")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no round finished in 600 s"
            time.sleep(0.5)
        tree = _descendants(proc.pid)
        assert len(tree) >= 3  # the simulator and its two clients
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig
    alive = _running(tree)
    deadline = time.time() + 10  # every process is gone within 10 s (a process that ended stays gone)
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = _running(tree)
    assert alive == [], [p.cmdline()[:4] for p in alive]
    record = strict_load(str(ws / SUMMARY_FILE))
    assert record["status"] == "failed" and record["reason"] == f"interrupted by {sig.name}"
    assert record["rounds_done"] >= 1
    assert record["resume"].endswith(f"--resume {ws / 'fedbpt_checkpoint.npz'}")
    assert f"continue with: {record['resume']}" in err


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda t: (t / "f").write_text("x") and t / "f", "is a file"),
        (lambda t: (t / "f").write_text("x") and t / "f" / "jobs", "cannot be created"),
        (lambda t: (t / "jobs" / "fedbpt").mkdir(parents=True) or (t / "jobs"), "cannot export to"),
    ],
)
def test_an_export_dir_that_cannot_hold_the_job_is_one_line(make, fragment, tmp_path):
    """A file, a path below a file, or a folder of the job's name that NVFlare did not make (it is left alone)."""
    target = make(tmp_path)
    out = subprocess.run(
        [sys.executable, JOB, "--export", "--export-dir", str(target), "--model_name", "roberta-large"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_setup_failures_are_named_with_their_errors():
    from fedbpt.flare.controller import FedBPTController

    ctrl = FedBPTController(config=RunConfig.build(intrinsic_dim=8, num_clients=3).to_job())
    ctrl.errors = {"site-2": "ConfigError: no 'train' file in --data_dir /x"}
    assert ctrl._failed({"site-3", "site-2"}) == (
        "site-2 (ConfigError: no 'train' file in --data_dir /x), site-3 (no result)"
    )


@pytest.mark.slow
def test_resuming_from_the_workspace_own_checkpoint_keeps_it(toy_data_dir, tmp_path):
    """README's pattern --resume W/fedbpt_checkpoint.npz --workspace W: the simulator's wipe used to delete the
    file being resumed (and the earlier run's results)."""
    ws = tmp_path / "ws"
    base = [sys.executable, JOB, "--config", os.path.join(REPO, "configs", "tiny.yaml"), "--data_dir", toy_data_dir]
    base += ["--k_shot", "8", "--num_clients", "2", "--workspace", str(ws)]
    first = subprocess.run(base + ["--num_rounds", "2"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = ws / "fedbpt_checkpoint.npz"
    saved = ckpt.read_bytes()
    second = subprocess.run(
        base + ["--num_rounds", "3", "--resume", str(ckpt)], capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "moved the previous run's results" in second.stdout
    assert (ws / "previous" / "fedbpt_checkpoint.npz").read_bytes() == saved  # the resumed file survived
    summary = strict_load(str(ws / SUMMARY_FILE))
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert strict_load(str(ws / "previous" / SUMMARY_FILE))["config"]["num_rounds"] == 2
