"""Helpers shared by the deployment tests (not a test module)."""

from __future__ import annotations

import os
import shutil

from helpers import SST2


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


class PocDeployment:
    """An NVFlare POC deployment (server + 2 sites on loopback) in its own HOME and workspace, on free ports.

    Tracks every process it starts (:class:`OwnedProcesses`) and stops only those.
    """

    ADMIN = "admin@nvidia.com"

    def __init__(self, root: str) -> None:
        import sys

        self.root = root
        self.home = os.path.join(root, "home")
        self.workspace = os.path.join(root, "poc")
        self.nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
        os.makedirs(self.home, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDBPT_FAULT")}
        self.env.update(
            HOME=self.home,  # the POC CLI keeps its settings in ~/.nvflare
            NVFLARE_POC_WORKSPACE=self.workspace,
            PATH=os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", ""),  # start.sh runs python3
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        self.owned: list[OwnedProcesses] = []
        self.prod = ""
        self.timings: dict[str, float] = {}

    def cli(self, *args: str, check: bool = True, timeout: float = 300):
        import subprocess

        out = subprocess.run([self.nvflare, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"nvflare {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def prepare(self) -> None:
        """The standard 2-site POC project, then the same project moved to a free port."""
        import socket

        import yaml

        self.cli("poc", "prepare", "-n", "2", "--force")
        with open(os.path.join(self.workspace, "project.yml")) as f:
            project = yaml.safe_load(f)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for p in project["participants"]:
            if p["type"] == "server":
                p["fed_learn_port"] = p["admin_port"] = port
        path = os.path.join(self.root, "project.yml")
        with open(path, "w") as f:
            yaml.safe_dump(project, f)
        self.cli("poc", "prepare", "-i", path, "--force")
        self.prod = os.path.join(self.workspace, project["name"], "prod_00")
        with open(os.path.join(self.prod, "site-1", "startup", "fed_client.json")) as f:
            assert f"localhost:{port}" in f.read()

    def start(self) -> None:
        import subprocess

        with open(os.path.join(self.root, "poc_start.log"), "a") as log:
            starter = subprocess.Popen(
                [self.nvflare, "poc", "start"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # everything the deployment starts lives in this session or below it
            )
            self.owned.append(OwnedProcesses(starter.pid))
            rc = starter.wait(timeout=180)
        self.scan()
        if rc != 0:
            with open(os.path.join(self.root, "poc_start.log")) as f:
                raise AssertionError(f"nvflare poc start failed ({rc}):\n{f.read()[-3000:]}")

    def scan(self) -> None:
        for owned in self.owned:
            owned.scan()

    def session(self):
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        return new_secure_session(self.ADMIN, os.path.join(self.prod, self.ADMIN), timeout=60)

    def alive(self) -> list:
        return [p for owned in self.owned for p in owned.alive()]

    def stop(self) -> str:
        """``nvflare poc stop``; returns its failure output ('' if it worked). Waits until our processes are gone.

        NVFlare 2.9 keeps a job that was running when the server stopped in state RUNNING after a restart; 'poc
        stop' then fails aborting it ("Job ... is not running"). The fallback is the sites' and server's own
        shutdown files (nvflare poc stop -p/-ex), which does not go through the job store.
        """
        self.scan()
        out = self.cli("poc", "stop", check=False, timeout=180)
        failure = "" if out.returncode == 0 else (out.stdout + out.stderr).strip()
        if failure:
            self.cli("poc", "stop", "-p", "site-1", "-p", "site-2", check=False, timeout=180)
            self.cli("poc", "stop", "-ex", "site-1", check=False, timeout=180)
        for owned in self.owned:
            owned.wait_gone(timeout=60)
        return failure

    def kill_leftovers(self) -> list:
        left = self.alive()
        for owned in self.owned:
            owned.kill()
        return left
