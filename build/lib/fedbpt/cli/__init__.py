"""The command line (job.py, the fedbpt script): guarded simulator runs and exports."""
