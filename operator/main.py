"""`kubellm operator`: run the kopf operator for LLMDeployments.

Namespaces to watch: `--namespace` (repeatable), else KUBELLM_WATCH_NAMESPACES (comma
separated), else the whole cluster. One replica at a time (standalone: no peering).
"""

from __future__ import annotations

import argparse
import os

import kopf


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubellm operator", description=__doc__)
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace")
    p.add_argument("--all-namespaces", "-A", action="store_true", help="watch the whole cluster")
    p.add_argument(
        "--liveness",
        default=os.environ.get("KUBELLM_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint for the operator's own probe ('' to turn it off)",
    )
    p.add_argument("--verbose", action="store_true")
    return p


def namespaces(args: argparse.Namespace, environ: dict[str, str]) -> list[str]:
    """The namespaces to watch; empty means the whole cluster."""
    if args.all_namespaces:
        return []
    if args.namespace:
        return args.namespace
    listed = environ.get("KUBELLM_WATCH_NAMESPACES", "")
    return [n.strip() for n in listed.split(",") if n.strip()]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    watched = namespaces(args, dict(os.environ))
    import kubellm.operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose)
    kopf.run(
        clusterwide=not watched,
        namespaces=watched,
        standalone=True,
        liveness_endpoint=args.liveness or None,
    )
    return 0
