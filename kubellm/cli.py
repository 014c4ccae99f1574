"""The `kubellm` command: a thin dispatcher.

Each subcommand's package is imported only when that subcommand runs, so
`kubellm operator` never imports torch and `kubellm serve` never imports kopf.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from kubellm import __version__


def _generate(argv: list[str]) -> int:
    from kubellm.runtime.generate_cli import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from kubellm.runtime.serve import main

    return main(argv)


def _route(argv: list[str]) -> int:
    from kubellm.router.main import main

    return main(argv)


def _operator(argv: list[str]) -> int:
    from kubellm.operator.main import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "serve a model over the OpenAI-compatible HTTP API"),
    "generate": (_generate, "generate text offline with the engine (no server)"),
    "route": (_route, "route OpenAI requests across a model's replicas (prefix- and load-aware)"),
    "operator": (_operator, "run the Kubernetes operator for LLMDeployment resources"),
}


def _usage() -> str:
    lines = [f"kubellm {__version__}", "", "usage: kubellm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["  version    print the version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("version", "--version"):
        print(__version__)
        return 0
    if command not in COMMANDS:
        print(f"kubellm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return COMMANDS[command][0](rest)
