"""job.py's command line: reference flag names, presets, and one-line errors for bad input."""

import os
import subprocess
import sys

import pytest
from helpers import REPO

from fedbpt.cli.options import resolve
from fedbpt.core.config import Launch, RunConfig, flag_of
from fedbpt.errors import ConfigError


def run_job(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "job.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_reference_flag_names_and_defaults():
    cfg, launch = resolve([])
    launch = launch.for_run(cfg)
    for key, value in {
        "num_clients": 10,
        "num_rounds": 200,
        "seed": 1234,
        "sigma": 1.0,
        "intrinsic_dim": 500,
        "n_prompt_tokens": 50,
        "k_shot": 200,
        "local_iter": 8,
        "local_popsize": 5,
        "iid": True,
        "alpha_dir": 0.5,
        "perturb": True,
        "perturb_rate": 0.5,
        "model_name": "roberta-large",
        "eval_clients": "site-1",
        "loss_type": "ce",
        "frac": 1.0,
    }.items():
        assert getattr(cfg, key) == value, key
    # "auto" is the reference's add (and its bare label words) for a masked LM such as roberta-large
    assert cfg.scorer_options("masked") == {"cat_or_add": "add", "label_encoding": "bare"}
    assert cfg.scorer_options("causal") == {"cat_or_add": "cat", "label_encoding": "space"}
    assert cfg.replace(cat_or_add="add").scorer_options("causal")["cat_or_add"] == "add"  # an explicit choice wins
    assert cfg.min_clients == 10 and launch.threads == 10  # default to num_clients
    cfg, launch = resolve(["--iid", "0", "--perturb", "0", "--export-dir", "/tmp/x", "--num_clients", "4"])
    assert cfg.iid is False and cfg.perturb is False and launch.export_dir == "/tmp/x"
    assert cfg.min_clients == 4


def test_command_line_wins_over_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("num_rounds: 3\nk_shot: 16\niid: false\n")
    cfg, _ = resolve(["--config", str(preset), "--num_rounds", "5"])
    assert cfg.num_rounds == 5 and cfg.k_shot == 16 and cfg.iid is False


def test_preset_with_an_unknown_key_is_refused(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("num_round: 3\n")
    with pytest.raises(ConfigError, match="num_round"):
        resolve(["--config", str(preset)])


def test_help_lists_every_option_with_its_type_and_default():
    out = run_job("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps the help lines
    for cls in (RunConfig, Launch):
        for name, info in cls.model_fields.items():
            assert flag_of(name) in text, name
            default = (
                "none"
                if info.default is None
                else str(
                    int(info.default)
                    if info.default in (True, False) and isinstance(info.default, bool)
                    else info.default
                )
            )
            assert f"default: {default}]" in text, name
    assert "[int; default: 10]" in text and "[0 or 1; default: 1]" in text  # --num_clients, --iid
    assert "[one of fedbpt, fedbpt_robust, fedavg, local; default: fedbpt]" in text  # --aggregation


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--task_name", "imdb"], "--task_name"),
        (["--loss_type", "mse"], "loss_type"),
        (["--num_clients", "0"], "--num_clients"),
        (["--intrinsic_dim", "0"], "--intrinsic_dim"),
        (["--num_clients", "3", "--eval_clients", "site-7"], "site-1..site-3"),
        (["--perturb", "1", "--loss_type", "perf"], "--perturb 0"),
        (["--frac", "1.5"], "--frac"),
        (["--local_popsize", "1"], "--local_popsize"),
        (["--local_adaptation", "tpa", "--local_popsize", "2"], "--local_popsize"),
        (["--bogus"], "--help"),
        (["--config", "configs/missing.yaml"], "--config"),
        (["--data_dir", "/nonexistent/dir"], "--data_dir"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(args, fix):
    out = run_job(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fix in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--model_name", "./no/such/model"], "does not exist"),
        (["--model_name", "roberta-large"], "tiny-random"),  # the hub is unreachable here (and in CI)
        (["--k_shot", "500"], "--k_shot"),
    ],
)
def test_data_and_model_errors_are_one_line(args, fix, toy_data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    out = run_job("--data_dir", toy_data_dir, "--workspace", str(tmp_path), "--k_shot", "8", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and fix in lines[0], out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "fedbpt_summary.json")
