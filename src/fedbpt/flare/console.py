"""What job.py's console shows of a simulator run, and where the rest goes: NVFlare's logging configuration.

The simulator and each of its client processes configure logging from one dictConfig file (the simulator's
``log_config``), so routing is decided here, once, with NVFlare's own handlers, formatters and filters:

- console, stdout: the project's lines only (INFO records of ``fedbpt.console``: progress, sites done, best round);
- console, stderr: every warning and error, NVFlare's included, so that a failed run can be read without --verbose;
- ``W/fedbpt_log.txt``: every record of every process of the run (server and sites), NVFlare's chatter included;
- NVFlare's usual per-process files (``W/nvflare/<site>/log.txt``, ``error_log.txt``, ...) as always.

With --verbose the console is NVFlare's ``concise`` mode instead (what the simulator shows by default).
"""

from __future__ import annotations

import copy
import json
import os

from fedbpt.core.server.summary import CONSOLE_LOGGER

LOG_FILE = "fedbpt_log.txt"  # in the workspace, beside the summary
_LOG_UTILS = "nvflare.fuel.utils.log_utils"


def log_config(log_path: str, verbose: bool = False) -> dict:
    """The dictConfig every process of the run applies; ``log_path`` (absolute) collects all their records."""
    from nvflare.fuel.utils.log_utils import LogMode, logmode_config_dict

    config = copy.deepcopy(logmode_config_dict[LogMode.CONCISE])
    handlers = config["handlers"]
    # Several processes append to one file: no rotation (a rotating handler renames the file under the others).
    handlers["runLogHandler"] = {
        "class": "logging.FileHandler",
        "level": "DEBUG",
        "formatter": "baseFormatter",
        "filename": log_path,
        "mode": "a",
        "delay": True,
    }
    root = config["loggers"]["root"]
    root["handlers"] = [*root["handlers"], "runLogHandler"]
    if verbose:
        return config
    config["formatters"]["messageFormatter"] = {"()": f"{_LOG_UTILS}.BaseFormatter", "fmt": "%(message)s"}
    config["formatters"]["problemFormatter"] = {
        "()": f"{_LOG_UTILS}.ColorFormatter",
        "fmt": "%(asctime)s - %(name)s - %(levelname)s - %(message)s",
    }
    config["filters"]["projectLines"] = {
        "()": f"{_LOG_UTILS}.LoggerNameFilter",
        "logger_names": [CONSOLE_LOGGER],
        "allow_all_error_logs": False,
    }
    handlers["consoleHandler"] = {
        "class": "logging.StreamHandler",
        "level": "INFO",
        "formatter": "messageFormatter",
        "filters": ["projectLines"],
        "stream": "ext://sys.stdout",
    }
    handlers["problemHandler"] = {
        "class": "logging.StreamHandler",
        "level": "WARNING",
        "formatter": "problemFormatter",
        "stream": "ext://sys.stderr",
    }
    root["handlers"].append("problemHandler")
    return config


def write_log_config(folder: str, log_path: str, verbose: bool = False) -> str:
    """Write :func:`log_config` as JSON into ``folder``; returns the file's path (the simulator's ``log_config``)."""
    path = os.path.join(folder, "fedbpt_log_config.json")
    with open(path, "w") as f:
        json.dump(log_config(log_path, verbose), f, indent=2)
    return path
