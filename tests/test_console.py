"""What job.py's console shows, without the simulator: rounded progress lines, the sites-done reports, the logging
configuration the simulator's processes apply (quiet and --verbose), the curves PNG and the flag itself."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO

from fedbpt.cli import curves
from fedbpt.cli.main import _draw_curves, _result_lines
from fedbpt.cli.options import message, resolve
from fedbpt.core.config import RunConfig, load_preset
from fedbpt.core.server.summary import RunSummary
from fedbpt.errors import ConfigError
from fedbpt.flare import workspace
from fedbpt.flare.console import LOG_FILE, write_log_config

LONG_DECIMAL = re.compile(r"\d\.\d{5,}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary_of(num_rounds: int = 3) -> RunSummary:
    return RunSummary(RunConfig.build(num_rounds=num_rounds), "acc")


def test_progress_lines_round_every_number():
    s = summary_of()
    row = {
        "round": 1,
        "clients": ["site-1", "site-2"],
        "train_acc": 0.48853211009174313,
        "train_loss": 1.1958999999999999,
        "dev_acc": 2 / 3,
        "test_acc": None,  # not evaluated this round
        "sigma": 0.96801234567,
        "best_fitness": 0.91012345678,
        "median_fitness": 0.963412345,
        "seconds": 7.2512345,
    }
    assert s.progress_line(row) == (
        "round 1/3 | train acc 0.4885 loss 1.1959 | dev 0.6667 | test - | clients 2 | fitness best 0.9101 median "
        "0.9634 | sigma 0.9680 | 7.25s"
    )
    final = {"round": 3, "train_acc": 1 / 3, "train_loss": 0.123456789, "dev_acc": 0.5, "test_acc": 0.48853211009174313}
    final["totals"] = {"queries": 7872, "eval_queries": 4616, "tokens": 818308}
    assert s.progress_line(final) == (
        "final (3 rounds) | train acc 0.3333 loss 0.1235 | dev 0.5000 | test 0.4885 | queries 7,872 search + "
        "4,616 eval, tokens 818,308"
    )


def test_the_best_round_line_is_rounded():
    s = summary_of()
    assert s.best_line() == "best round by dev acc: - (dev -, test -)"  # nothing evaluated yet
    s.best = {"round": 3, "dev_acc": 0.5, "dev_loss": 0.7, "test_acc": 0.48853211009174313}
    assert s.best_line() == "best round by dev acc: 3 (dev 0.5000, test 0.4885)"


def test_a_slow_broadcast_reports_each_answer_after_the_threshold():
    from fedbpt.flare.controller import Arrivals

    now, said = [100.0], []
    arrivals = Arrivals("round 3", 4, slow_after=20.0, clock=lambda: now[0], report=said.append)
    arrivals(client_task=None, fl_ctx=None)  # 0 s in: quiet
    now[0] = 119.0
    arrivals(client_task=None, fl_ctx=None)
    assert said == []
    now[0] = 121.0
    arrivals(client_task=None, fl_ctx=None)
    arrivals(client_task=None, fl_ctx=None)
    assert said == ["round 3: sites done 3/4", "round 3: sites done 4/4"]


def test_a_failing_report_never_reaches_nvflare():
    """NVFlare fails the site's task when result_received_cb raises."""
    from fedbpt.flare.controller import Arrivals

    def broken(line: str) -> None:
        raise OSError("console gone")

    arrivals = Arrivals("setup", 2, slow_after=0.0, report=broken)
    arrivals(client_task=None, fl_ctx=None)
    assert arrivals.done == 1


# Each process of a simulator run applies the config file as the simulator and its workers do (dynamic_log_config
# with the file's path); the records stand for a progress line, NVFlare's per-task chatter (its simulator worker logs
# as __main__), NVFlare's internal INFO, a controller INFO line, an NVFlare warning and an error of ours.
APPLY_AND_LOG = textwrap.dedent(
    """
    import logging, sys
    from nvflare.fuel.utils.log_utils import dynamic_log_config
    config, folder = sys.argv[1], sys.argv[2]
    dynamic_log_config(config=config, dir_path=folder, reload_path=config)
    logging.getLogger("fedbpt.console").info("round 0/3 | train acc 0.4688")
    logging.getLogger("__main__.ClientTaskWorker").info("Finished one task run for client: site-1")
    logging.getLogger("nvflare.fuel.f3.cellnet.core_cell.CoreCell").info("server: creating listener")
    logging.getLogger("fedbpt.flare.controller.FedBPTController").info("summary written to /x")
    logging.getLogger("nvflare.private.fed.simulator.SimulatorRunner").warning("Subprocess died for client site-2")
    logging.getLogger("fedbpt.core.server.federation").error("round 1: no usable update from site-2")
    """
)
RECORDS = [
    "round 0/3 | train acc 0.4688",
    "Finished one task run for client: site-1",
    "server: creating listener",
    "summary written to /x",
    "Subprocess died for client site-2",
    "round 1: no usable update from site-2",
]


def apply_log_config(tmp_path, verbose: bool):
    log = tmp_path / LOG_FILE
    config = write_log_config(str(tmp_path), str(log), verbose)
    site = tmp_path / "site-1"
    site.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", APPLY_AND_LOG, config, str(site)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out, log.read_text(), site


def test_the_console_shows_project_lines_and_problems_the_log_file_everything(tmp_path):
    out, log, site = apply_log_config(tmp_path, verbose=False)
    assert out.stdout == "round 0/3 | train acc 0.4688\n"  # bare, as a person reads it
    problems = out.stderr.strip().splitlines()
    assert len(problems) == 2, out.stderr
    assert "SimulatorRunner - WARNING - Subprocess died for client site-2" in problems[0]
    assert "federation - ERROR - round 1: no usable update from site-2" in problems[1]
    assert all(record in log for record in RECORDS), log
    assert (site / "log.txt").is_file()  # NVFlare's own per-process files as always


def test_verbose_shows_nvflare_messages_on_the_console_as_nvflare_does(tmp_path):
    """--verbose is the simulator's own console (its concise mode): everything on stdout but nvflare.* INFO."""
    out, log, _ = apply_log_config(tmp_path, verbose=True)
    assert [r for r in RECORDS if r in out.stdout] == [r for r in RECORDS if r != "server: creating listener"]
    assert "- INFO - Finished one task run for client: site-1" in out.stdout and out.stderr == ""
    assert all(record in log for record in RECORDS), log


def test_verbose_is_a_launcher_switch():
    assert resolve([])[1].verbose is False
    assert resolve(["--verbose"])[1].verbose is True
    assert "verbose" not in RunConfig.model_fields  # the job the sites run does not depend on it
    with pytest.raises(ConfigError, match="--help"):
        resolve(["--verbose", "1"])


@pytest.mark.parametrize("value, expected", [("true", True), ("0", False)])
def test_verbose_in_a_preset_is_a_boolean(tmp_path, value, expected):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"verbose: {value}\n")
    assert load_preset(str(preset)) == {"verbose": expected}
    preset.write_text("verbose: loud\n")
    with pytest.raises(ConfigError) as err:
        load_preset(str(preset))
    assert "--verbose must be true/false or 0/1" in message(err.value)


def test_bad_verbose_in_a_preset_is_one_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("verbose: 2\n")
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "job.py"), "--config", str(preset)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --verbose") and "Traceback" not in out.stderr


def record(**changes) -> dict:
    """A hand-made summary: 4 rounds, dev skipped in round 2 (--eval_every), a final evaluation."""
    rounds = [
        {"round": r, "train_acc": a, "train_loss": loss, "dev_acc": d, "sigma": s}
        for r, a, loss, d, s in [
            (0, 0.50, 0.90, 0.50, 0.97),
            (1, 0.62, 0.81, 0.58, 0.95),
            (2, 0.70, 0.74, None, 0.92),
            (3, 0.74, 0.70, 0.66, 0.90),
        ]
    ]
    out = {
        "status": "completed",
        "metric": "acc",
        "rounds": rounds,
        "final": {"round": 4, "train_acc": 0.75, "train_loss": 0.69, "dev_acc": 0.64, "test_acc": 0.70},
        "best": {"round": 3, "dev_acc": 0.66, "test_acc": 0.704},
        "no_prompt": {"test_acc": 0.63, "test_n": 872},
        "prompt": {"model_name": "/models/smollm2-135m", "task_name": "sst2"},
    }
    return {**out, **changes}


def png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
        return im.size


def test_the_curves_are_a_png(tmp_path):
    path = curves.write(record(), str(tmp_path / curves.CURVES_FILE))
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    width, height = png_size(path)
    assert width > 800 and height > 200
    assert os.listdir(tmp_path) == [curves.CURVES_FILE]  # no temporary file left


@pytest.mark.parametrize(
    "changes",
    [
        {"no_prompt": None},  # a run without an eval client's no-prompt score
        {"final": None, "status": "failed"},  # stopped after some rounds
        {"best": {"round": None, "test_acc": None}, "metric": "f1"},
    ],
)
def test_partial_summaries_still_draw(tmp_path, changes):
    rec = record(**changes)
    rec["rounds"][1]["sigma"] = 1.05e7  # the diverging ablation: drawn on a log scale
    png_size(curves.write(rec, str(tmp_path / "c.png")))


def test_a_summary_without_rounds_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="no rounds"):
        curves.write(record(rounds=[]), str(tmp_path / "c.png"))
    assert os.listdir(tmp_path) == []


def test_a_failure_to_draw_is_a_warning(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "gone")  # the workspace vanished: the write fails
    assert _draw_curves(record(), missing) is None
    assert "warning: no curves drawn (FileNotFoundError" in capsys.readouterr().err

    def broken(rec):
        raise RuntimeError("matplotlib exploded\nsecond line")

    monkeypatch.setattr(curves, "render", broken)
    assert _draw_curves(record(), str(tmp_path)) is None
    assert capsys.readouterr().err.strip() == "warning: no curves drawn (RuntimeError: matplotlib exploded)"
    assert os.listdir(tmp_path) == []
    assert _draw_curves(record(rounds=[]), str(tmp_path)) is None  # nothing to draw: no warning either
    assert capsys.readouterr().err == ""


def test_the_result_lines_end_with_the_log_and_the_curves(tmp_path):
    ws = str(tmp_path)
    lines = _result_lines(record(), ws, os.path.join(ws, curves.CURVES_FILE))
    assert lines[0] == f"summary: {os.path.join(ws, 'fedbpt_summary.json')} (completed)"
    assert lines[1] == (
        "test accuracy: no prompt 63.0% -> tuned prompt 70.4% (+7.4 points, 872 examples; the best-dev prompt, round 3)"
    )
    assert lines[2].startswith(f"log: {os.path.join(ws, LOG_FILE)} ")
    assert lines[3] == f"curves: {os.path.join(ws, curves.CURVES_FILE)}"
    assert not any(LONG_DECIMAL.search(line) for line in lines)


def test_plotting_loads_neither_matplotlib_nor_nvflare_on_import():
    code = "import sys, fedbpt.cli.curves; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = json.loads(out.stdout.replace("'", '"'))
    assert "matplotlib" not in loaded and "nvflare" not in loaded, loaded


def test_a_new_run_moves_the_previous_log_and_curves(tmp_path):
    ws = tmp_path / "ws"
    workspace.prepare(str(ws), None)
    for name in workspace.LAUNCHER_FILES:
        (ws / name).write_text(f"first run: {name}")
    workspace.prepare(str(ws), None)  # a new run appends to no earlier log
    assert not any((ws / n).exists() for n in workspace.LAUNCHER_FILES)
    assert (ws / "previous" / LOG_FILE).read_text() == f"first run: {LOG_FILE}"
