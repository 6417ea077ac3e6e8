"""Bad user input, case by case: each is refused with one line (a ConfigError) that names the fix.

One table covers presets, option values, the machine, data files and model folders. Every case builds its bad
input under tmp_path and returns the call that must refuse it; the message must contain the fragment and be a
single line. Nothing here builds a real model or starts a process, except the last test (job.py itself).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
from helpers import REPO

from fedbpt.cli.options import message, resolve
from fedbpt.core.config import Launch, RunConfig
from fedbpt.core.data.splits import load_split
from fedbpt.core.data.tasks import get_task
from fedbpt.core.models.resolve import check_model_folder
from fedbpt.errors import ConfigError
from fedbpt.flare.preflight import check_machine

ROW = '{"sentence": "a fine film", "label": 1}\n'


# --- builders: (tmp_path, monkeypatch) -> the call that must raise ------------------------------------------------


def preset(text: str | bytes, name: str = "p.yaml"):
    def build(tmp, _mp):
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return lambda: resolve(["--config", str(path)])

    return build


def launched(argv: list[str]):
    """What job.py checks of its command line before it builds anything: the run, and the launcher against it."""
    cfg, launch = resolve(argv)
    return cfg, launch.for_run(cfg)


def flags(*argv: str):
    return lambda _tmp, _mp: lambda: launched(list(argv))


def no_cuda(mp) -> None:
    import torch

    mp.setattr(torch.cuda, "is_available", lambda: False)
    mp.setattr(torch.cuda, "device_count", lambda: 0)


def machine(*argv: str):
    """check_machine on a validated config, on a machine that has no CUDA (whatever this one has)."""

    def build(_tmp, mp):
        no_cuda(mp)
        cfg, launch = resolve(list(argv))
        return lambda: check_machine(cfg, launch.for_run(cfg))

    return build


def data(files: dict[str, str | bytes], task: str = "sst2", split: str = "train"):
    def build(tmp, _mp):
        for name, content in files.items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return lambda: load_split(get_task(task), split, str(tmp))

    return build


def rows(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def safetensors_bytes() -> bytes:
    """A whole safetensors file holding one 2x2 float32 tensor, written by hand (8-byte header length, JSON)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


MASKED = {"model_type": "roberta", "architectures": ["RobertaForMaskedLM"]}


def model(files: dict[str, str | bytes | dict]):
    """A hand-made model folder (no real model): config.json and friends as given; dicts are written as JSON."""

    def build(tmp, _mp):
        folder = tmp / "model"
        folder.mkdir()
        for name, content in files.items():
            if isinstance(content, dict):
                content = json.dumps(content)
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return lambda: check_model_folder(str(folder))

    return build


CASES = [
    # presets: syntax, encoding, shape
    ("yaml_syntax", preset("num_clients: [1, 2\n"), "is not valid YAML at line"),
    ("yaml_mapping_syntax", preset("seed: 1: 2\n"), "is not valid YAML"),
    ("json_syntax", preset('{"num_clients": 3,}', "p.json"), "is not valid JSON at line 1"),
    ("preset_not_utf8", preset(b"num_rounds: 3\nmodel_name: caf\xe9\n"), "is not UTF-8 text (byte 0xe9 on line 2)"),
    ("json_not_utf8", preset(b'{"model_name": "\xff"}', "p.json"), "is not UTF-8"),
    ("preset_not_mapping", preset("- 1\n- 2\n"), "holds a list, not a mapping"),
    ("yaml_duplicate_key", preset("seed: 1\nseed: 2\n"), "'seed' is given twice"),
    ("json_duplicate_key", preset('{"seed": 1, "seed": 2}', "p.json"), "'seed' is given twice"),
    ("preset_non_string_key", preset("1: 2\n"), "unknown keys ['1']"),
    ("preset_list_key", preset("[a]: 1\n"), "key ['a'] is not an option name"),
    # presets: types
    ("int_from_string", preset('num_clients: "ten"\n'), "--num_clients must be an integer, got 'ten'"),
    ("int_from_list", preset("num_clients: [1, 2]\n"), "--num_clients must be an integer, got [1, 2]"),
    ("int_truncated", preset("num_clients: 2.7\n"), "--num_clients must be an integer, got 2.7"),
    ("int_from_bool", preset("k_shot: true\n"), "--k_shot must be an integer, got True"),
    ("int_nullable_typed", preset('min_clients: "2"\n'), "--min_clients must be an integer"),
    ("int_null", preset("num_rounds: null\n"), "--num_rounds cannot be null"),
    ("float_from_string", preset('sigma: "big"\n'), "--sigma must be a number, got 'big'"),
    ("float_null", preset("sigma:\n"), "--sigma cannot be null"),
    ("float_nan_json", preset('{"sigma": NaN}', "p.json"), "--sigma must be a finite number in (0, 1000], got nan"),
    ("bool_from_string_no", preset('iid: "no"\n'), "--iid must be true/false or 0/1, got 'no'"),
    ("bool_from_string_false", preset('perturb: "false"\n'), "--perturb must be true/false or 0/1, got 'false'"),
    ("bool_from_2", preset("iid: 2\n"), "--iid must be true/false or 0/1, got 2"),
    ("bool_from_float", preset("perturb: 1.0\n"), "--perturb must be true/false or 0/1"),
    ("bool_export_string", preset('export: "yes"\n'), "--export must be true/false or 0/1"),
    ("bool_null", preset("iid: null\n"), "--iid cannot be null"),
    ("str_from_int", preset("job_name: 2024\n"), "--job_name must be a string, got 2024"),
    ("str_null", preset("model_name: null\n"), "--model_name cannot be null"),
    ("str_from_list", preset("task_name: [sst2]\n"), "--task_name must be a string"),
    ("choice_from_int", preset("loss_type: 1\n"), "--loss_type 1 is not one of ce, hinge, perf"),
    ("choice_null", preset("cov_mode: null\n"), "--cov_mode cannot be null"),
    ("preset_where", preset('seed: "x"\n'), "(config file "),
    # option values
    ("seed_negative", flags("--seed", "-1"), "--seed must be an integer in [0, 2**63 - 1]"),
    ("seed_too_large", flags("--seed", str(2**64)), "--seed must be an integer in [0, 2**63 - 1]"),
    (
        "robust_with_bound",
        flags("--aggregation", "fedbpt_robust", "--bound", "1"),
        "--aggregation fedbpt_robust searches unbounded: use --bound 0",
    ),
    ("job_name_slash", flags("--job_name", "a/b"), "--job_name 'a/b' is not a folder name"),
    ("job_name_space", flags("--job_name", "my job"), "--job_name 'my job' is not a folder name"),
    ("job_name_dotdot", flags("--job_name", ".."), "--job_name '..' is not a folder name"),
    ("job_name_hidden", flags("--job_name", ".fedbpt"), "--job_name '.fedbpt' is not a folder name"),
    ("sigma_nan", flags("--sigma", "nan"), "--sigma must be a finite number in (0, 1000], got nan"),
    ("sigma_inf", flags("--sigma", "inf"), "--sigma must be a finite number in (0, 1000], got inf"),
    ("sigma_zero", flags("--sigma", "0"), "--sigma must be a finite number in (0, 1000], got 0.0"),
    ("sigma_negative", flags("--sigma", "-1"), "--sigma must be a finite number in (0, 1000]"),
    ("sigma_absurd", flags("--sigma", "1e4"), "--sigma must be a finite number in (0, 1000], got 10000.0"),
    ("bound_nan", flags("--bound", "nan"), "--bound must be a finite number >= 0"),
    ("bound_inf", flags("--bound", "inf"), "--bound must be a finite number >= 0"),
    ("bound_negative", flags("--bound", "-1"), "--bound must be a finite number >= 0"),
    ("alpha_dir_inf", flags("--alpha_dir", "inf"), "--alpha_dir must be a finite number > 0, got inf"),
    ("alpha_dir_nan", flags("--alpha_dir", "nan"), "--alpha_dir must be a finite number > 0, got nan"),
    ("alpha_dir_zero", flags("--alpha_dir", "0"), "--alpha_dir must be a finite number > 0"),
    ("perturb_rate_nan", flags("--perturb_rate", "nan"), "--perturb_rate must be a finite number in [0, 1]"),
    ("frac_nan", flags("--frac", "nan"), "--frac must be a finite number in (0, 1], got nan"),
    ("torch_threads_negative", flags("--torch_threads", "-1"), "--torch_threads must be 0 (automatic) or more"),
    ("round_timeout_negative", flags("--round_timeout", "-5"), "--round_timeout must be 0 (no limit) or more"),
    ("batch_size_zero", flags("--batch_size", "0"), "--batch_size must be at least 1"),
    ("dev_shot_zero", flags("--dev_shot", "0"), "--dev_shot must be at least 1, got 0"),
    ("gpu_word", flags("--gpu", "banana"), "--gpu 'banana' is not a list of GPU groups"),
    ("gpu_negative", flags("--gpu", "-1"), "--gpu '-1' is not a list of GPU groups"),
    ("gpu_empty_id", flags("--gpu", "0,,1"), "--gpu '0,,1' is not a list of GPU groups"),
    ("gpu_unclosed", flags("--gpu", "[0,1"), "--gpu '[0,1' is not a list of GPU groups"),
    ("gpu_nested", flags("--gpu", "[[0],1]"), "--gpu '[[0],1]' is not a list of GPU groups"),
    ("gpu_empty_group", flags("--gpu", "[],1"), "--gpu '[],1' is not a list of GPU groups"),
    ("gpu_over_clients", flags("--num_clients", "2", "--gpu", "0,1,[2]"), "--gpu 0,1,[2] has 3 GPU groups for 2"),
    ("gpu_empty", flags("--gpu", ""), "--gpu is empty"),
    ("eval_clients_empty", flags("--eval_clients", ""), "--eval_clients is empty"),
    ("eval_clients_commas", flags("--eval_clients", " , "), "--eval_clients ' , ' names no site"),
    ("data_dir_empty", flags("--data_dir", ""), "--data_dir is empty"),
    ("workspace_empty", flags("--workspace", ""), "--workspace is empty"),
    ("cli_int_truncated", flags("--num_clients", "2.7"), "invalid int value: '2.7'"),
    ("cli_iid_not_01", flags("--iid", "2"), "--iid: invalid choice"),
    # the machine (as one without CUDA)
    ("device_unknown", machine("--device", "banana"), "--device 'banana' is not a torch device"),
    ("device_bad_index", machine("--device", "cuda:x"), "--device 'cuda:x' is not a torch device"),
    ("device_cuda_without_cuda", machine("--device", "cuda"), "has no CUDA GPU"),
    ("device_cuda0_without_cuda", machine("--device", "cuda:0"), "use --device cpu"),
    ("device_meta", machine("--device", "meta"), "use --device cpu or cuda"),
    ("bf16_without_cuda", machine("--precision", "bf16"), "--precision bf16 needs a CUDA device"),
    ("fp16_on_cpu", machine("--precision", "fp16", "--device", "cpu"), "not --device cpu: use --precision fp32"),
    # data files
    (
        "jsonl_bad_line",
        data({"train.jsonl": ROW + '{"sentence": "x", "label": \n'}),
        "train.jsonl line 2 is not valid JSON",
    ),
    (
        "jsonl_not_utf8",
        data({"train.jsonl": ROW.encode() + b'{"sentence": "\xff", "label": 0}\n'}),
        "line 2 is not UTF-8",
    ),
    ("jsonl_line_not_object", data({"train.jsonl": ROW + "[1, 2]\n"}), "line 2 is not an object of columns"),
    ("jsonl_first_not_object", data({"train.jsonl": "3\n" + ROW}), "line 1 is not an object of columns"),
    ("label_string", data({"train.jsonl": rows({"sentence": "a", "label": "1"})}), "label '1' is not an integer"),
    ("label_null", data({"train.jsonl": rows({"sentence": "a", "label": None})}), "label null is not an integer"),
    ("label_float", data({"train.jsonl": ROW + rows({"sentence": "a", "label": 0.5})}), "line 2: label 0.5 is not"),
    ("label_bool", data({"train.jsonl": rows({"sentence": "a", "label": True})}), "label True is not an integer"),
    ("label_out_of_range", data({"train.jsonl": rows({"sentence": "a", "label": 2})}), "label 2 is outside 0..1"),
    ("label_negative", data({"train.jsonl": rows({"sentence": "a", "label": -1})}), "label -1 is outside 0..1"),
    ("label_float_out_of_range", data({"train.jsonl": rows({"sentence": "a", "label": 3.0})}), "label 3 is outside"),
    ("text_column_missing", data({"train.jsonl": rows({"text": "a", "label": 0})}), "lacks columns ['sentence']"),
    ("text_missing_on_a_line", data({"train.jsonl": ROW + ROW + rows({"label": 0})}), "line 3 has no 'sentence'"),
    ("label_missing_on_a_line", data({"train.jsonl": ROW + rows({"sentence": "a"})}), "line 2 has no 'label'"),
    ("text_null", data({"train.jsonl": rows({"sentence": None, "label": 0})}), "'sentence' is null"),
    ("text_number", data({"train.jsonl": rows({"sentence": 12, "label": 0})}), "'sentence' is int 12, not text"),
    ("train_empty", data({"train.jsonl": ""}), "train.jsonl holds no examples"),
    ("train_blank_lines", data({"train.jsonl": "\n \n"}), "holds no examples"),
    (
        "json_array_broken",
        data({"train.json": '[{"sentence": "a",\n "label": }]'}),
        "train.json is not valid JSON at line 2",
    ),
    ("json_columns_ragged", data({"train.json": '{"sentence": ["a", "b"], "label": [0]}'}), "different lengths"),
    ("csv_not_utf8", data({"train.csv": b"sentence,label\na,0\n\xff\xfe,1\n"}), "train.csv line 3 is not UTF-8"),
    ("csv_ragged", data({"train.csv": "sentence,label\na,0\nb,1,3,4\n"}), "cannot read"),
    ("csv_header_only", data({"train.csv": "sentence,label\n"}), "train.csv holds no examples"),
    ("csv_empty", data({"train.csv": ""}), "train.csv is empty"),
    ("csv_float_label", data({"train.csv": "sentence,label\na,0\nb,0.5\n"}), "row 2: label 0.5 is not an integer"),
    ("csv_string_label", data({"train.csv": "sentence,label\na,x\n"}), "label 'x' is not an integer"),
    ("csv_empty_text", data({"train.csv": "sentence,label\n,1\n"}), "'sentence' is null"),
    ("parquet_truncated", data({"train.parquet": b"PAR1garbage"}), "cannot read"),
    ("test_split_empty", data({"validation.jsonl": ""}, split="validation"), "validation.jsonl holds no examples"),
    (
        "snli_only_unlabelled",
        data({"test.jsonl": rows({"premise": "p", "hypothesis": "h", "label": -1})}, "snli", "test"),
        "no labelled examples",
    ),
    # model folders
    ("model_empty_folder", model({}), "is empty"),
    ("model_no_config", model({"model.safetensors": safetensors_bytes()}), "has no config.json"),
    ("model_config_syntax", model({"config.json": '{"model_type": '}), "config.json is not valid JSON"),
    ("model_config_not_utf8", model({"config.json": b'{"model_type": "\xff"}'}), "config.json is not UTF-8"),
    ("model_config_not_object", model({"config.json": "[]"}), "config.json is not a JSON object"),
    ("model_config_no_type", model({"config.json": {"hidden_size": 8}}), "names no model_type"),
    ("model_unknown_type", model({"config.json": {"model_type": "bogus"}}), "cannot read the config of model"),
    ("model_not_an_lm", model({"config.json": {"model_type": "vit"}}), "neither a masked nor a causal LM"),
    ("model_no_weights", model({"config.json": MASKED}), "has no PyTorch weights"),
    ("model_tf_weights_only", model({"config.json": MASKED, "tf_model.h5": b"x"}), "only tf_model.h5"),
    ("model_weights_empty", model({"config.json": MASKED, "model.safetensors": b""}), "model.safetensors is empty"),
    (
        "model_safetensors_truncated",
        model({"config.json": MASKED, "model.safetensors": safetensors_bytes()[:-3]}),
        "is unreadable",
    ),
    (
        "model_safetensors_header_cut",
        model({"config.json": MASKED, "model.safetensors": safetensors_bytes()[:5]}),
        "is unreadable",
    ),
    ("model_bin_garbage", model({"config.json": MASKED, "pytorch_model.bin": b"PK\x03\x04cut"}), "neither a torch zip"),
    (
        "model_index_missing_shard",
        model(
            {"config.json": MASKED, "model.safetensors.index.json": {"weight_map": {"w": "model-00001.safetensors"}}}
        ),
        "lacks weight shards",
    ),
    (
        "model_index_no_map",
        model({"config.json": MASKED, "model.safetensors.index.json": {"metadata": {}}}),
        "has no weight_map",
    ),
    (
        "model_no_tokenizer",
        model({"config.json": MASKED, "model.safetensors": safetensors_bytes()}),
        "has no tokenizer",
    ),
]


@pytest.mark.parametrize("case, build, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_fix(case, build, fragment, tmp_path, monkeypatch):
    call = build(tmp_path, monkeypatch)
    with pytest.raises(ConfigError) as err:
        call()
    text = message(err.value)  # as job.py prints it: options by their flags
    assert fragment in text, text
    assert "\n" not in text and text.strip() == text, text


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


# --- good input still passes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("iid: 0\n", {"iid": False}),
        ("iid: false\nperturb: 1\n", {"iid": False, "perturb": True}),
        ("iid: no\n", {"iid": False}),  # an unquoted YAML boolean
        ("num_clients: 3.0\n", {"num_clients": 3, "min_clients": 3, "threads": 3}),
        ("sigma: 2\n", {"sigma": 2.0}),
        ("gpu: 0\n", {"gpu": "0"}),
        ("gpu: 0, 1\n", {"gpu": "0,1"}),
        ("gpu: '[0, 1], [2]'\n", {"gpu": "[0,1],[2]"}),
        ("min_clients: null\nnum_clients: 4\n", {"min_clients": 4}),
        ("job_name: my-job_1.2\n", {"job_name": "my-job_1.2"}),
        ("eval_clients: site-2, site-1, site-2\nnum_clients: 2\n", {"eval_clients": "site-2,site-1"}),
        ("", {"num_clients": RunConfig.model_fields["num_clients"].default}),
    ],
)
def test_good_presets_pass(tmp_path, text, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    cfg, launch = launched(["--config", str(path)])
    for key, value in expected.items():
        got = getattr(cfg if key in RunConfig.model_fields else launch, key)
        assert got == value and type(got) is type(value), key


def test_good_json_preset_with_byte_order_mark(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"num_clients": 4, "perturb": 0, "frac": 1}).encode())
    cfg, _ = resolve(["--config", str(path)])
    assert cfg.num_clients == 4 and cfg.perturb is False and cfg.frac == 1.0


def test_the_shipped_presets_and_flags_pass():
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        path = os.path.join(REPO, "configs", name)
        preset_cfg, _ = resolve(["--config", path, "--data_dir", REPO])  # any folder: presets may name ../shared
        assert preset_cfg.task_name
    cfg, launch = resolve(
        ["--gpu", "0, 1", "--seed", "0", "--sigma", "1000", "--bound", "0", "--iid", "0", "--perturb", "1"]
    )
    assert launch.gpu == "0,1" and cfg.seed == 0 and cfg.iid is False and cfg.perturb is True


def test_validation_is_idempotent():
    cfg = RunConfig.build(num_clients=3, eval_clients="site-2, site-2")
    assert cfg.eval_clients == "site-2" and RunConfig.build(**cfg.model_dump()) == cfg == cfg.replace()


def test_the_configuration_is_frozen_and_strict():
    cfg = RunConfig.build()
    with pytest.raises(ValueError):
        cfg.k_shot = 3  # frozen: a run cannot change under its sites
    with pytest.raises(ConfigError, match="unknown options"):
        RunConfig.build(k_shots=3)
    with pytest.raises(ConfigError) as err:
        RunConfig.build(k_shot="3")
    assert err.value.option == "k_shot" and str(err.value) == "k_shot must be an integer, got '3'"
    assert message(err.value) == "--k_shot must be an integer, got '3'"
    with pytest.raises(ConfigError, match="unknown options"):
        RunConfig.build(workspace="/tmp/x")  # a launcher option is not part of the run
    assert Launch.build(workspace="/tmp/x").workspace == "/tmp/x"


def test_good_machine_settings_pass(monkeypatch):
    no_cuda(monkeypatch)
    for argv in ([], ["--device", "cpu"], ["--device", "cpu", "--precision", "fp32"]):
        cfg, launch = resolve(argv)
        check_machine(cfg, launch.for_run(cfg))


def test_good_data_files_pass(tmp_path):
    task = get_task("sst2")
    (tmp_path / "train.jsonl").write_bytes(
        b"\xef\xbb\xbf" + rows({"sentence": "a", "label": 1.0}).encode() + b"\n\n" + ROW.encode()
    )
    ex = load_split(task, "train", str(tmp_path))
    assert ex.texts == [("a",), ("a fine film",)] and ex.labels.tolist() == [1, 1]
    (tmp_path / "validation.json").write_text(json.dumps([{"sentence": "b", "label": 0, "idx": 3}]))
    assert load_split(task, "validation", str(tmp_path)).labels.tolist() == [0]
    (tmp_path / "validation.json").write_text(json.dumps({"sentence": ["b", "c"], "label": [0, 1]}))
    assert load_split(task, "validation", str(tmp_path)).texts == [("b",), ("c",)]
    (tmp_path / "validation.json").write_text(rows({"sentence": "d", "label": 1}, {"sentence": "e", "label": 0}))
    assert load_split(task, "validation", str(tmp_path)).labels.tolist() == [1, 0]  # JSON lines named .json


def test_a_whole_hand_made_model_folder_passes_and_hub_ids_are_left_alone(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MASKED))
    (folder / "model.safetensors").write_bytes(safetensors_bytes())
    (folder / "tokenizer.json").write_text("{}")
    check_model_folder(str(folder))
    check_model_folder("FacebookAI/roberta-large")  # not a folder: nothing to check here


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("num_clients: [1, 2\n", "is not valid YAML"),
        ('num_clients: "ten"\n', "--num_clients must be an integer"),
        ('iid: "no"\n', "--iid must be true/false or 0/1"),
    ],
)
def test_job_py_prints_one_error_line_and_exits_2(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "job.py"), "--config", str(path), "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "ws")
