"""The engine's flags, one per `EngineConfig` field (its name, default, help and choices
come from the dataclass), shared by `kubellm serve` and `kubellm generate`; and the
`KUBELLM_*` variables, read here for every flag of an entry point's parser.

Settings enter once: the entry points read the environment through `with_environment`,
flags win over variables, variables over defaults, and everything below takes only the
`EngineConfig` that results (a program's own `LLM(...)` is not steered by variables).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from kubellm.runtime.config import EngineConfig

_TYPES = {"str": str, "int": int, "float": float}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(EngineConfig):
        kind = f.type.removesuffix(" | None")
        if kind == "bool":
            how = {"action": argparse.BooleanOptionalAction}
        else:
            how = {"type": _TYPES[kind], "choices": f.metadata["choices"]}
        parser.add_argument(
            "--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **how
        )


def with_environment(
    parser: argparse.ArgumentParser, environ: dict[str, str]
) -> argparse.ArgumentParser:
    """Every flag --foo-bar defaults to $KUBELLM_FOO_BAR where that is set."""
    for action in parser._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        value = environ.get("KUBELLM_" + flag[2:].upper().replace("-", "_"))
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            action.default = value.lower() in ("1", "true", "yes", "on")
        else:
            action.default = action.type(value) if action.type else value
    return parser


def engine_settings(args: argparse.Namespace) -> dict[str, object]:
    """The EngineConfig fields the parsed flags hold."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig)}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags describe (ValueError for a refused setting)."""
    return EngineConfig(**engine_settings(args))
