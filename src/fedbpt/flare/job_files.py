"""Files a FedBPT job carries besides its config: what a real deployment's server needs to read.

A deployed server cannot read the submitting machine's files; the job folder is what travels.
"""

from __future__ import annotations

import os


def attach_to_job(job, cfg: dict, run_cfg: dict) -> None:
    """Ship the --resume checkpoint inside ``job`` (the server app's config folder) and point ``run_cfg``'s resume at
    its name there, which the controller resolves against that folder."""
    if not cfg.get("resume"):
        return
    job.add_file_to_server(cfg["resume"], app_folder_type="config")
    run_cfg["resume"] = os.path.basename(cfg["resume"])
