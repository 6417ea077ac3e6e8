"""FedBPT's simulator environment: workspace policy, signals, and a summary on every outcome.

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
import signal
import sys
import tempfile
from collections.abc import Callable

from nvflare.recipe.sim_env import SimEnv

from fedbpt.core.config import Launch, RunConfig
from fedbpt.core.server.checkpoint import load
from fedbpt.core.server.summary import SUMMARY_FILE, atomic_write, strict_json
from fedbpt.errors import CheckpointError
from fedbpt.flare.console import LOG_FILE, write_log_config
from fedbpt.flare.workspace import check, collect, prepare, protected_folders, simulator_dir

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


def _rounds_done(checkpoint: str | None) -> int:
    if not checkpoint:
        return 0
    try:
        return load(checkpoint).round
    except CheckpointError:
        return 0


def finish_summary(
    workspace: str, resume: str | None, reason: str | None, resume_command: Callable[[str], str] | None = None
) -> dict:
    """The run's summary in W: the server's if it wrote one (a failed one gains rounds_done and resume), else a
    failed one with ``reason``. ``resume``: how to continue (``resume_command(checkpoint)``; default: the checkpoint's
    path). Written atomically, strict JSON."""
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
        how = resume_command or (lambda c: c)
        record["resume"] = how(ckpt) if ckpt and record["rounds_done"] else None
        atomic_write(path, strict_json(record).encode())
    return record


class FedBPTSimEnv(SimEnv):
    """NVFlare's simulator with a workspace this tool owns (flare.workspace: W/nvflare is what the simulator wipes),
    every process's log in W/fedbpt_log.txt, SIGINT/SIGTERM stopping the run's whole process tree, and a summary
    in W whatever ended the run (:attr:`record`, with :attr:`exit_code`).

    ``workspace``, ``threads``, ``gpu``, ``verbose``: as job.py's flags. ``resume_command(checkpoint)``: the
    command a failed run's summary gives to continue it (default: the checkpoint's path). The workspace is checked
    here, before anything is written; :meth:`prepare` (called by FedBPTRecipe.run once its checks pass) moves the
    previous run's results aside.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        workspace: str = Launch.model_fields["workspace"].default,
        threads: int | None = None,
        gpu: str | None = None,
        verbose: bool = False,
        resume_command: Callable[[str], str] | None = None,
    ) -> None:
        launch = Launch.build(workspace=workspace, threads=threads, gpu=gpu, verbose=verbose)
        check(launch.workspace, protected_folders())
        self.workspace = os.path.abspath(os.path.expanduser(launch.workspace))
        self.launch = launch.model_copy(update={"workspace": self.workspace, "threads": threads or num_clients})
        self.resume_command = resume_command
        self.resume: str | None = None
        self.rounds = 0
        self.record: dict = {}
        self.exit_code = 1
        super().__init__(
            num_clients=num_clients,
            num_threads=self.launch.threads,
            gpu_config=self.launch.gpu,
            workspace_root=simulator_dir(self.workspace),
        )

    def prepare(self, cfg: RunConfig) -> str | None:
        """Mark the workspace and move the previous run's results to W/previous; returns where ``cfg.resume`` is
        now (it may have been one of those results)."""
        self.rounds = cfg.num_rounds
        self.resume, notes = prepare(self.workspace, cfg.resume)
        for note in notes:
            print(note)
        return self.resume

    def deploy(self, job) -> str:
        log = os.path.join(self.workspace, LOG_FILE)
        where = f"here and in {log}" if self.launch.verbose else f"{log} (--verbose: here too)"
        sites = f"{self.num_clients} sites x {self.rounds} rounds"
        print(f"running {sites} in the NVFlare simulator; NVFlare's messages: {where}")
        sys.stdout.flush()  # before the simulator's processes write to the same console
        self.exit_code, self.record = self._guarded(job)
        return job.name

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> str:
        return self.workspace

    def _guarded(self, job) -> tuple[int, dict]:
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
            with tempfile.TemporaryDirectory(prefix="fedbpt-log-") as tmp:
                log_config = write_log_config(tmp, os.path.join(self.workspace, LOG_FILE), self.launch.verbose)
                rc = job.simulator_run(
                    simulator_dir(self.workspace),
                    n_clients=self.num_clients,
                    threads=self.launch.threads,
                    gpu=self.launch.gpu,
                    log_config=log_config,
                )
        except Exception as exc:  # the launcher itself failed: still stop the run and say so
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            interrupted.append(f"launcher error {type(exc).__name__}: {first}")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            stop_tree(grace=1.0)  # a client that outlived the simulator
        reason = f"interrupted by {interrupted[0]}" if interrupted and interrupted[0].startswith("SIG") else None
        if interrupted and reason is None:
            reason = interrupted[0]
        record = finish_summary(self.workspace, self.resume, reason, self.resume_command)
        if interrupted and interrupted[0].startswith("SIG"):
            return 128 + int(getattr(signal, interrupted[0])), record
        return (rc or (0 if record["status"] == "completed" else 1)), record
