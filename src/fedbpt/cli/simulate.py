"""Run a built FedBPT job in the NVFlare simulator: workspace policy, signals, and a summary on every outcome.

NVFlare starts the simulator and every client in a session of its own (``setsid``), so a signal to the launcher
reaches none of them: a scheduler's SIGTERM, or ``timeout``, would leave them running. The launcher therefore
becomes a child subreaper (orphans of the run stay its descendants) and, on SIGINT or SIGTERM, stops its whole
process tree: SIGTERM, then SIGKILL after a grace period. Whatever ended the run, ``W/fedbpt_summary.json`` says
so: the server's own summary when it wrote one, else one written here with ``"status": "failed"``, the reason, the
rounds finished and the command that resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile

from fedbpt.cli.console import LOG_FILE, write_log_config
from fedbpt.cli.workspace import collect, simulator_dir
from fedbpt.core.checkpoint import load
from fedbpt.core.summary import SUMMARY_FILE, atomic_write, strict_json
from fedbpt.errors import CheckpointError

GRACE_SECONDS = 5.0
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process instead of init, so they can be found."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_tree(grace: float = GRACE_SECONDS) -> int:
    """SIGTERM every descendant of this process at once, SIGKILL those left after ``grace`` seconds; returns how
    many there were. The tree is read first, so processes whose parent dies first are not missed."""
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive + me.children(recursive=True):  # and any that was started meanwhile
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(me.children(recursive=True), timeout=grace)
    _reap()
    return len(procs)


def _reap() -> None:
    """Collect exit statuses of re-parented children (no zombies left behind)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def resume_command(argv: list[str], checkpoint: str) -> str:
    """The command line that continues this run from ``checkpoint`` (this run's flags, --resume replaced)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        args.append(a)
    return shlex.join([*invoked_as(), *args, "--resume", checkpoint])


def invoked_as() -> list[str]:
    """The program part of this process's command line: ``python job.py``, the ``fedbpt`` script, or ``python -m``."""
    from fedbpt.cli import main

    prog = sys.argv[0] if sys.argv else ""
    if not os.path.isfile(prog):  # python -c, an embedding host: the job script is what users run
        return [sys.executable, "job.py"]
    if os.path.samefile(prog, main.__file__):
        return [sys.executable, "-m", "fedbpt.cli.main"]
    return [sys.executable, prog] if prog.endswith(".py") else [prog]


def _rounds_done(checkpoint: str | None) -> int:
    if not checkpoint:
        return 0
    try:
        return load(checkpoint).round
    except CheckpointError:
        return 0


def finish_summary(workspace: str, argv: list[str], resume: str | None, reason: str | None) -> dict:
    """The run's summary in W: the server's if it wrote one (a failed one gains rounds_done and resume), else a
    failed one with ``reason``. Written atomically, strict JSON."""
    path = os.path.join(workspace, SUMMARY_FILE)
    summary_path, checkpoint = collect(workspace)
    record = None
    if summary_path is not None:
        with open(summary_path) as f:
            record = json.load(f)
    if record is None or (reason and record.get("status") != "completed"):
        record = dict(record or {}, status="failed", reason=reason or "the server stopped without a summary")
    if record["status"] != "completed":
        ckpt = checkpoint or resume  # nothing new written: the checkpoint this run started from still holds
        record["rounds_done"] = _rounds_done(ckpt)
        record["resume"] = resume_command(argv, ckpt) if ckpt and record["rounds_done"] else None
        atomic_write(path, strict_json(record).encode())
    return record


def run(recipe, cfg: dict, argv: list[str]) -> tuple[int, dict]:
    """Run ``recipe``'s job in the simulator under ``W/nvflare``; returns (exit code, summary record).

    The console shows the project's lines, warnings and errors; every process's log goes to ``W/fedbpt_log.txt``
    (fedbpt.cli.console); ``cfg["verbose"]`` shows NVFlare's messages on the console too."""
    workspace = cfg["workspace"]
    interrupted: list[str] = []

    def on_signal(signum, _frame) -> None:
        if not interrupted:
            interrupted.append(signal.Signals(signum).name)
            print(f"\n{interrupted[0]}: stopping every process of the run ...", file=sys.stderr, flush=True)
            stop_tree()

    become_subreaper()
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rc = 1
    try:
        # outside W/nvflare, which the simulator wipes before its clients read the file
        with recipe.simulator_polling() as job, tempfile.TemporaryDirectory(prefix="fedbpt-log-") as tmp:
            log_config = write_log_config(tmp, os.path.join(workspace, LOG_FILE), bool(cfg.get("verbose")))
            rc = job.simulator_run(
                simulator_dir(workspace),
                n_clients=cfg["num_clients"],
                threads=cfg["threads"],
                gpu=cfg["gpu"],
                log_config=log_config,
            )
    except Exception as exc:  # the launcher itself failed: still stop the run and say so
        interrupted.append(f"launcher error {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        stop_tree(grace=1.0)  # a client that outlived the simulator
    reason = f"interrupted by {interrupted[0]}" if interrupted and interrupted[0].startswith("SIG") else None
    if interrupted and reason is None:
        reason = interrupted[0]
    record = finish_summary(workspace, argv, cfg.get("resume"), reason)
    if interrupted and interrupted[0].startswith("SIG"):
        return 128 + int(getattr(signal, interrupted[0])), record
    return (rc or (0 if record["status"] == "completed" else 1)), record
