"""Helpers shared by the deployment tests (not a test module)."""

from __future__ import annotations

import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "sst2"))
NO_DATA = f"the SST-2 copy is not at {SST2} (see shared/data/README.md)"


def small_sst2(out_dir: str, rows: int = 3000) -> str:
    """A small SST-2 folder (first ``rows`` training rows, the whole validation split) for fast runs.

    The real rows, so the pipeline reads real text; small, so every client process loads it in a second.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(SST2, "train.jsonl")) as src, open(os.path.join(out_dir, "train.jsonl"), "w") as dst:
        for i, line in enumerate(src):
            if i >= rows:
                break
            dst.write(line)
    shutil.copy(os.path.join(SST2, "validation.jsonl"), os.path.join(out_dir, "validation.jsonl"))
    return out_dir


class OwnedProcesses:
    """The processes a test started: one session (started with ``start_new_session``) and all their descendants.

    NVFlare starts each job's server and client processes in sessions of their own, so descendants are collected
    by walking the process tree while the deployment runs. Only these processes are ever signalled.
    """

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.known: dict[int, float] = {}  # pid -> create time (guards against pid reuse)

    def _add(self, proc) -> None:
        import psutil

        try:
            self.known.setdefault(proc.pid, proc.create_time())
            for child in proc.children(recursive=True):
                self.known.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass

    def scan(self) -> None:
        import psutil

        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.sid:
                    self._add(proc)
            except (OSError, psutil.Error):
                continue
        for proc in self.alive():
            self._add(proc)

    def alive(self) -> list:
        import psutil

        out = []
        for pid, created in self.known.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def wait_gone(self, timeout: float) -> list:
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            left = self.alive()
            if not left:
                return []
            time.sleep(0.5)
        return self.alive()

    def kill(self) -> None:
        import psutil

        procs = self.alive()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(procs, timeout=10)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
