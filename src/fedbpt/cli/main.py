"""The command line: ``python job.py`` / ``fedbpt``. Runs the job in a guarded simulator, or exports it.

    fedbpt --config configs/tiny.yaml                    # offline smoke run in the simulator
    fedbpt --model_name roberta-large --task_name sst2    # the paper's setting (GPU, hub access)
    fedbpt --export --export-dir ./jobs                   # job folder for `nvflare job submit`

Flags keep the reference example's names. Everything is checked before a process starts; bad input is one line
(``error: ...``) and exit 2. A run's console shows the project's lines (notes, a progress line per round, sites done
in a slow round, the result) and every warning and error; NVFlare's messages go to ``W/fedbpt_log.txt``
(``--verbose``: to the console too). The run ends with its summary, its verdict, the log's and the curves' paths.
"""

from __future__ import annotations

import os
import sys
import warnings

from fedbpt.errors import ConfigError

FAULT_ENV = "FEDBPT_FAULT"  # a fault plan for drills and tests (research/fault.py)


def protected_folders() -> dict[str, str]:
    """Folders a workspace may not be, nor contain: the simulator wipes its workspace."""
    here = os.getcwd()
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    folders = {"the current directory": here, "the home directory": os.path.expanduser("~")}
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")):  # an editable install: the source checkout
        folders["the project checkout"] = checkout
    return folders


def _export(cfg: dict, fault_plan: str | None) -> int:
    from fedbpt.core.preflight import prepare_config
    from fedbpt.flare.recipe import FedBPTRecipe, check_export_dir

    check_export_dir(cfg["export_dir"])
    cfg = prepare_config(cfg)  # here, so that its errors name the flags (the recipe names keyword options)
    recipe = FedBPTRecipe(config=cfg, fault_plan=fault_plan)
    try:
        recipe.export(cfg["export_dir"])
    except (RuntimeError, OSError) as exc:  # e.g. a folder of that name that is not this job's
        raise ConfigError(f"cannot export to {cfg['export_dir']}: {str(exc).splitlines()[0][:200]}") from None
    print(f"exported job to {os.path.join(os.path.abspath(cfg['export_dir']), cfg['job_name'])}")
    if not cfg["round_timeout"]:
        print("note: --round_timeout 0: a site that hangs stalls its round; set it for deployments")
    return 0


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
    from fedbpt.cli.console import LOG_FILE
    from fedbpt.core.summary import SUMMARY_FILE, verdict

    lines = [f"summary: {os.path.join(workspace, SUMMARY_FILE)} ({record['status']})"]
    line = verdict(record)
    if line:
        lines.append(line)
    lines.append(f"log: {os.path.join(workspace, LOG_FILE)} (every process, NVFlare's messages included)")
    if curves_path:
        lines.append(f"curves: {curves_path}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from fedbpt.core.config import resolve

    argv = sys.argv[1:] if argv is None else list(argv)
    # nvflare.recipe reads (and strips) --export/--export-dir from sys.argv when imported, and warns that it does:
    # here they are job.py's own flags, parsed from argv above, so the warning is noise
    warnings.filterwarnings("ignore", message="NVFlare reserves '--export'", category=UserWarning)
    fault_plan = os.environ.get(FAULT_ENV, "").strip() or None
    try:
        cfg = resolve(argv)
        if fault_plan:
            from fedbpt.research.fault import parse

            parse(fault_plan)
        if cfg["export"]:
            return _export(cfg, fault_plan)
        from fedbpt.cli import workspace
        from fedbpt.core.preflight import preflight, prepare_config
        from fedbpt.flare.recipe import FedBPTRecipe, simulated_torch_threads

        workspace.check(cfg["workspace"], protected_folders())
        cfg["workspace"] = os.path.abspath(os.path.expanduser(cfg["workspace"]))
        if not cfg["torch_threads"]:
            cfg["torch_threads"] = simulated_torch_threads(cfg["threads"])
        cfg = prepare_config(cfg)
        preflight(cfg)
        cfg["resume"], notes = workspace.prepare(cfg["workspace"], cfg["resume"])
        recipe = FedBPTRecipe(config=cfg, fault_plan=fault_plan)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted before the run started; nothing was run", file=sys.stderr)
        return 130
    from fedbpt.cli import simulate
    from fedbpt.cli.console import LOG_FILE

    log = os.path.join(cfg["workspace"], LOG_FILE)
    for note in notes:
        print(note)
    where = f"here and in {log}" if cfg["verbose"] else f"{log} (--verbose: here too)"
    n, rounds = cfg["num_clients"], cfg["num_rounds"]
    print(f"running {n} sites x {rounds} rounds in the NVFlare simulator; NVFlare's messages: {where}")
    sys.stdout.flush()  # before the simulator's processes write to the same console
    rc, record = simulate.run(recipe, cfg, argv)
    curves_path = _draw_curves(record, cfg["workspace"])
    print("\n".join(_result_lines(record, cfg["workspace"], curves_path)), flush=True)
    if record["status"] != "completed":
        hint = f"; continue with: {record['resume']}" if record.get("resume") else " (no checkpoint to resume from)"
        print(f"error: the run stopped: {record.get('reason', 'see the server log')}{hint}", file=sys.stderr)
    return rc


def main_exit() -> None:
    """The ``fedbpt`` console script."""
    sys.exit(main())
