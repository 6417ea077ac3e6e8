"""The simulator workspace: a folder this tool owns, so that nothing the user put elsewhere is ever deleted.

Layout of ``--workspace W``::

    W/.fedbpt-workspace      marker: W was made by this tool (a folder without it is refused unless empty)
    W/nvflare/               the NVFlare simulator's workspace: wiped by the simulator at every start
    W/models/                --model_cache_dir W/models, if given: tiny-random / planted builds (kept)
    W/fedbpt_summary.json    this run's results, copied out of W/nvflare when the run ends, or written by the
    W/prompt_*.npy           launcher when the run failed or was interrupted
    W/fedbpt_checkpoint.npz
    W/fedbpt_log.txt         every process's log (NVFlare's messages); W/fedbpt_curves.png: the run's curves
    W/previous/              the previous run's results, moved here (with a note) when a new run starts

The simulator deletes its whole workspace before it starts; giving it ``W/nvflare`` instead of ``W`` is what keeps a
resume checkpoint, a previous run's results and any other file in ``W`` alive.
"""

from __future__ import annotations

import glob
import os
import shutil

from fedbpt.core.server.checkpoint import CHECKPOINT_FILE
from fedbpt.core.server.summary import SUMMARY_FILE
from fedbpt.errors import ConfigError, opt
from fedbpt.flare.console import LOG_FILE

MARKER = ".fedbpt-workspace"
SIM_DIR = "nvflare"
PREVIOUS_DIR = "previous"
RESULT_FILES = (SUMMARY_FILE, "prompt_best.npy", "prompt_final.npy", CHECKPOINT_FILE)  # copied from the server
CURVES_FILE = "fedbpt_curves.png"  # drawn by the command line (cli.curves) from the summary
LAUNCHER_FILES = (LOG_FILE, CURVES_FILE)  # written in W by the launcher and the run's processes
RUN_FILES = RESULT_FILES + LAUNCHER_FILES  # what a new run moves to W/previous/


def protected_folders() -> dict[str, str]:
    """Folders a workspace may not be, nor contain: the simulator wipes its workspace."""
    here = os.getcwd()
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    folders = {"the current directory": here, "the home directory": os.path.expanduser("~")}
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")):  # an editable install: the source checkout
        folders["the project checkout"] = checkout
    return folders


def simulator_dir(workspace: str) -> str:
    return os.path.join(workspace, SIM_DIR)


def _inside(path: str, folder: str) -> bool:
    """path is folder or lies inside it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check(workspace: str, protected: dict[str, str]) -> None:
    """Refuse a workspace whose wipe could destroy what this tool did not create (before anything is written).

    ``protected``: name -> folder (the current directory, the project checkout, the home directory); the
    workspace may not be any of them, nor contain one of them. An existing folder must be empty or carry the
    marker of a previous workspace.
    """
    if not workspace or not workspace.strip():
        raise ConfigError(
            f"{opt('workspace')} is empty: pass a folder for the run, e.g. {opt('workspace')} /tmp/nvflare/fedbpt"
        )
    path = os.path.abspath(os.path.expanduser(workspace))
    if os.path.realpath(path) == os.sep:
        raise ConfigError(f"{opt('workspace')} / would be wiped by the simulator: pass a folder of its own")
    for name, folder in protected.items():
        if folder and _inside(folder, path):
            raise ConfigError(
                f"{opt('workspace')} {path} holds {name} ({folder}), which the simulator would wipe: pass a folder "
                "of its own"
            )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{opt('workspace')} {path} is a file: pass a folder (it is created if missing)")
    if os.path.isdir(path):
        entries = set(os.listdir(path))
        if entries and MARKER not in entries:
            raise ConfigError(
                f"{opt('workspace')} {path} holds files this tool did not create: pass a new or empty folder "
                f"(or one a previous run of job.py made)"
            )
    else:
        parent = os.path.dirname(path)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{opt('workspace')} {path} cannot be created ({parent} is not a writable folder)")


def prepare(workspace: str, resume: str | None) -> tuple[str | None, list[str]]:
    """Mark the workspace and move the previous run's results into W/previous/ (replacing the one before).

    Returns the --resume path to use (moved along if it was one of those results) and notes for the user.
    """
    os.makedirs(workspace, exist_ok=True)
    with open(os.path.join(workspace, MARKER), "w") as f:
        f.write("made by fedbpt job.py; W/nvflare is wiped at every run, W/previous holds the run before\n")
    notes = []
    found = [n for n in RUN_FILES if os.path.isfile(os.path.join(workspace, n))]
    if found:
        prev = os.path.join(workspace, PREVIOUS_DIR)
        if os.path.isdir(prev):
            for name in RUN_FILES:  # only what an earlier move put there
                if os.path.isfile(os.path.join(prev, name)):
                    os.remove(os.path.join(prev, name))
        os.makedirs(prev, exist_ok=True)
        for name in found:
            src = os.path.join(workspace, name)
            if resume and os.path.realpath(resume) == os.path.realpath(src):
                resume = os.path.join(prev, name)
            os.replace(src, os.path.join(prev, name))
        notes.append(f"note: moved the previous run's results ({', '.join(found)}) to {prev}")
    return resume, notes


def collect(workspace: str) -> tuple[str | None, str | None]:
    """Copy the server's summary, prompts and checkpoint from the simulator's workspace to W.

    Returns (summary path or None, checkpoint path of this run or None). A checkpoint is copied even when no
    summary was written (the server was killed): it is what a resume needs.
    """
    sim = simulator_dir(workspace)
    summary = checkpoint = None
    for name in RESULT_FILES:
        found = sorted(glob.glob(os.path.join(sim, "server", "*", name)), key=os.path.getmtime)
        if not found:
            continue
        dst = os.path.join(workspace, name)
        shutil.copy(found[-1], dst)
        if name == SUMMARY_FILE:
            summary = dst
        elif name == CHECKPOINT_FILE:
            checkpoint = dst
    return summary, checkpoint
