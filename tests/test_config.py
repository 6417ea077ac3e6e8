"""The typed run configuration: one owner per option (type, default, help, choices), the recipe's keywords and the
command line generated from it, and errors that name the option the way each front end spells it."""

from __future__ import annotations

import inspect
import typing

import pytest

from fedbpt.cli.options import build_parser, message
from fedbpt.core import wire
from fedbpt.core.algorithm import aggregation, baselines, search
from fedbpt.core.config import Launch, RunConfig, flag_of, kind_of
from fedbpt.core.data import splits
from fedbpt.core.models import scorer
from fedbpt.errors import ConfigError, opt


def test_every_field_owns_its_type_default_help_and_group():
    for cls in (RunConfig, Launch):
        for name, info in cls.model_fields.items():
            kind_of(info.annotation)  # one of bool, int, float, str, a choice (optionally nullable)
            assert info.description and len(info.description) > 10, name
            assert (info.json_schema_extra or {}).get("group"), name
            assert info.default is None or kind_of(info.annotation)[0] != "int" or isinstance(info.default, int), name
    assert not set(RunConfig.model_fields) & set(Launch.model_fields)


def test_choices_are_the_implementing_modules_own_lists():
    choices = {name: kind_of(info.annotation)[2] for name, info in RunConfig.model_fields.items()}
    assert choices["server_sigma"] == tuple(aggregation.SIGMA_RULES)
    assert choices["aggregation"] == baselines.AGGREGATIONS
    assert choices["eq7"] == search.EQ7_FORMS and choices["local_adaptation"] == search.STEP_ADAPTATIONS
    assert choices["loss_type"] == scorer.LOSS_TYPES and choices["precision"] == scorer.PRECISIONS
    assert choices["cat_or_add"] == ("auto", *scorer.PROMPT_MODES)
    assert choices["prompt_placement"] == ("auto", *scorer.PLACEMENTS)
    assert choices["partition"] == splits.PARTITIONS and choices["cov_mode"] == wire.COV_MODES
    for form in search.EQ7_FORMS:  # each listed choice is implemented
        search.eq7_fitness([[1.0]], [[2.0]], form)
    for rule in aggregation.SIGMA_RULES:
        aggregation.ServerES(4, 1.0, 2, 0, sigma_rule=rule)


def test_the_recipe_takes_one_typed_keyword_per_run_option():
    from fedbpt import FedBPTRecipe

    params = inspect.signature(FedBPTRecipe.__init__).parameters
    options = {n: p for n, p in params.items() if n in RunConfig.model_fields}
    assert list(options) == list(RunConfig.model_fields)  # every option, in the configuration's order
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in options.values())
    assert not [p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD]  # no **options
    hints = typing.get_type_hints(FedBPTRecipe.__init__)
    python = {"bool": bool, "int": int, "float": float, "str": str, "choice": str}
    for name, info in RunConfig.model_fields.items():
        assert hints[name] == python[kind_of(info.annotation)[0]] | None, name


def test_the_command_line_has_one_flag_per_option_and_keeps_the_reference_forms():
    actions = {a.dest: a for a in build_parser()._actions}
    for cls in (RunConfig, Launch):
        for name in cls.model_fields:
            assert flag_of(name) in actions[name].option_strings, name
    assert actions["iid"].choices == (0, 1) and actions["perturb"].choices == (0, 1)  # the NVFlare example's 0/1
    assert actions["export"].nargs == 0 and actions["verbose"].nargs == 0  # switches
    assert actions["export_dir"].option_strings == ["--export-dir"]
    assert actions["aggregation"].choices == baselines.AGGREGATIONS


def test_an_error_names_its_option_as_each_front_end_spells_it():
    err = ConfigError(f"{opt('k_shot')} must be at least 1; lower {opt('export_dir')}", option="k_shot")
    assert err.option == "k_shot"
    assert str(err) == "k_shot must be at least 1; lower export_dir"  # a Python caller's keywords
    assert message(err) == "--k_shot must be at least 1; lower --export-dir"  # job.py's flags
    assert message(ConfigError(f"pass {opt('preset')} FILE")) == "pass --config FILE"
    within = err.within("config file p.yaml: ")
    assert within.option == "k_shot" and str(within).startswith("config file p.yaml: k_shot must")
    assert str(ConfigError("a plain message with 50% and {braces}")) == "a plain message with 50% and {braces}"


def test_cross_field_rules_and_defaults_resolved_from_other_fields():
    cfg = RunConfig.build(num_clients=4, k_shot=16)
    assert (cfg.min_clients, cfg.dev_shot) == (4, 16)  # default to num_clients, k_shot
    assert RunConfig.build(num_clients=4, frac=0.5, min_clients=1).clients_per_round == 2
    with pytest.raises(ConfigError) as err:
        RunConfig.build(num_clients=3, min_clients=4)
    assert err.value.option == "min_clients" and "between 1 and num_clients (3)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        Launch.build(threads=5).for_run(RunConfig.build(num_clients=3))
    assert message(err.value) == "--threads must be between 1 and --num_clients (3), got 5"
    assert Launch.build().for_run(RunConfig.build(num_clients=3)).threads == 3


def test_a_job_carries_the_configuration_as_a_plain_dict_and_reads_it_back():
    cfg = RunConfig.build(num_clients=3, aggregation="fedbpt_robust", iid=False)
    job = cfg.to_job()
    assert type(job) is dict and RunConfig.from_job(job) == cfg
    with pytest.raises(ConfigError, match="k_shot must be an integer"):  # a hand-edited job: one clear line
        RunConfig.from_job({**job, "k_shot": "many"})
