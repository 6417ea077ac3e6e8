"""The command line, generated from the configuration's fields: one flag per field, with its type, default, help and
choices, in the field's group. ``--iid`` and ``--perturb`` (the run's booleans) keep the reference's 0/1 form;
the launcher's booleans (``--export``, ``--verbose``) are switches."""

from __future__ import annotations

import argparse

from fedbpt.core.config import Launch, RunConfig, flag_of, group_of, kind_of, load
from fedbpt.errors import ConfigError

CONFIG_HELP = "YAML or JSON preset (e.g. configs/tiny.yaml); flags given on the command line win"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, named fix, exit 2
        raise ConfigError(f"{message} (see python job.py --help)")


def _shown(default) -> str:
    return "none" if default is None else str(int(default) if isinstance(default, bool) else default)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="FedBPT (federated black-box prompt tuning) as an NVFlare job.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for cls in (RunConfig, Launch):
        for name, info in cls.model_fields.items():
            group = group_of(cls, name)
            if group not in groups:
                groups[group] = p.add_argument_group(group)
            kind, nullable, choices = kind_of(info.annotation)
            kw: dict = {"dest": name, "default": argparse.SUPPRESS}
            if kind == "bool" and cls is Launch:
                kw["action"] = "store_true"
                shown = "switch"
            elif kind == "bool":
                kw.update(type=int, choices=(0, 1))
                shown = "0 or 1"
            elif kind == "choice":
                kw["choices"] = choices
                shown = "one of " + ", ".join(choices)
            else:
                kw["type"] = {"int": int, "float": float, "str": str}[kind]
                kw["metavar"] = kind.upper()
                shown = kind
            kw["help"] = f"{info.description} [{shown}; default: {_shown(info.default)}]"
            groups[group].add_argument(flag_of(name), **kw)
    return p


def resolve(argv: list[str] | None = None) -> tuple[RunConfig, Launch]:
    """defaults <- preset (--config) <- command line, validated: the run and how this machine launches it."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("config", None)
    return load(preset, args)


def message(exc: ConfigError) -> str:
    """The error as the command line says it: options by their flags."""
    return exc.render(flag_of)
