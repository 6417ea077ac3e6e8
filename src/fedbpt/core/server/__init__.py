"""The server's side of a run without NVFlare: round logic, the run's record, checkpoints, in-process runs."""
