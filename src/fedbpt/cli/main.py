"""The command line: ``python job.py`` / ``fedbpt``. Builds the recipe and runs it in the guarded simulator, or
exports it.

    fedbpt --config configs/tiny.yaml                    # offline smoke run in the simulator
    fedbpt --model_name roberta-large --task_name sst2    # the paper's setting (GPU, hub access)
    fedbpt --export --export-dir ./jobs                   # job folder for `nvflare job submit`

Flags keep the reference example's names (cli.options builds them from the configuration). Everything is checked
before a process starts; bad input is one line (``error: ...``) and exit 2. A run's console shows the project's
lines (notes, a progress line per round, sites done in a slow round, the result) and every warning and error;
NVFlare's messages go to ``W/fedbpt_log.txt`` (``--verbose``: to the console too). The run ends with its summary,
its verdict, the log's and the curves' paths.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings

from fedbpt.errors import ConfigError

FAULT_ENV = "FEDBPT_FAULT"  # a fault plan for drills and tests (research/fault.py)


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
    prog = sys.argv[0] if sys.argv else ""
    if not os.path.isfile(prog):  # python -c, an embedding host: the job script is what users run
        return [sys.executable, "job.py"]
    if os.path.samefile(prog, __file__):
        return [sys.executable, "-m", "fedbpt.cli.main"]
    return [sys.executable, prog] if prog.endswith(".py") else [prog]


def _draw_curves(record: dict, workspace: str) -> str | None:
    """W/fedbpt_curves.png from the run's summary, or None with a warning: a plot never fails a run."""
    from fedbpt.cli import curves

    if not record.get("rounds"):  # stopped before its first round: nothing to draw, and the error says why
        return None
    path = os.path.join(workspace, curves.CURVES_FILE)
    try:
        return curves.write(record, path)
    except ImportError as exc:
        why = f"{exc.name or 'matplotlib'} is not installed (pip install matplotlib)"
    except Exception as exc:  # a summary it cannot read, a full disk, a matplotlib error: all the same here
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'}"
    print(f"warning: no curves drawn ({why})", file=sys.stderr)
    return None


def _result_lines(record: dict, workspace: str, curves_path: str | None) -> list[str]:
    """The console's last lines: summary, verdict, where NVFlare's log is, and (last) the curves."""
    from fedbpt.core.server.summary import SUMMARY_FILE, verdict
    from fedbpt.flare.console import LOG_FILE

    lines = [f"summary: {os.path.join(workspace, SUMMARY_FILE)} ({record['status']})"]
    line = verdict(record)
    if line:
        lines.append(line)
    lines.append(f"log: {os.path.join(workspace, LOG_FILE)} (every process, NVFlare's messages included)")
    if curves_path:
        lines.append(f"curves: {curves_path}")
    return lines


def _export(recipe, export_dir: str) -> int:
    try:
        recipe.export(export_dir)
    except (RuntimeError, OSError) as exc:  # e.g. a folder of that name that is not this job's
        raise ConfigError(f"cannot export to {export_dir}: {str(exc).splitlines()[0][:200]}") from None
    print(f"exported job to {os.path.join(os.path.abspath(export_dir), recipe.config.job_name)}")
    if not recipe.config.round_timeout:
        print("note: --round_timeout 0: a site that hangs stalls its round; set it for deployments")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedbpt.cli.options import message, resolve

    argv = sys.argv[1:] if argv is None else list(argv)
    # nvflare.recipe reads (and strips) --export/--export-dir from sys.argv when imported, and warns that it does:
    # here they are job.py's own flags, parsed from argv above, so the warning is noise
    warnings.filterwarnings("ignore", message="NVFlare reserves '--export'", category=UserWarning)
    fault_plan = os.environ.get(FAULT_ENV, "").strip() or None
    try:
        cfg, launch = resolve(argv)
        if fault_plan:
            from fedbpt.research.fault import parse

            parse(fault_plan)
        from fedbpt.flare.recipe import FedBPTRecipe, check_export_dir

        if launch.export:
            check_export_dir(launch.export_dir)
            return _export(FedBPTRecipe(cfg, fault_plan=fault_plan), launch.export_dir)
        from fedbpt.flare.simulator import FedBPTSimEnv

        launch = launch.for_run(cfg)
        env = FedBPTSimEnv(
            num_clients=cfg.num_clients,
            workspace=launch.workspace,
            threads=launch.threads,
            gpu=launch.gpu,
            verbose=launch.verbose,
            resume_command=lambda checkpoint: resume_command(argv, checkpoint),
        )
        recipe = FedBPTRecipe(cfg, fault_plan=fault_plan)
        recipe.run(env)
    except ConfigError as exc:
        print(f"error: {message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted before the run started; nothing was run", file=sys.stderr)
        return 130
    record = env.record
    curves_path = _draw_curves(record, env.workspace)
    print("\n".join(_result_lines(record, env.workspace, curves_path)), flush=True)
    if record["status"] != "completed":
        hint = f"; continue with: {record['resume']}" if record.get("resume") else " (no checkpoint to resume from)"
        print(f"error: the run stopped: {record.get('reason', 'see the server log')}{hint}", file=sys.stderr)
    return env.exit_code


def main_exit() -> None:
    """The ``fedbpt`` console script."""
    sys.exit(main())
