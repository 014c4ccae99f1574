"""`kubellm route`: an OpenAI-compatible router in front of one model's replicas.

Each flag can also be set as KUBELLM_<FLAG> (`--replica` as a comma-separated list);
flags win over variables."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aiohttp import web

from kubellm.router.discovery import EndpointSliceWatch
from kubellm.router.policy import LOAD_FACTOR, POLICIES
from kubellm.router.prefix import PREFIX_CHARS
from kubellm.router.replicas import ReplicaSet
from kubellm.router.server import Router, RouterSettings, build_app

logger = logging.getLogger("kubellm.router")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubellm route", description=__doc__)
    add = p.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--replica", action="append", default=[], help="a replica's base URL (repeatable)")
    add(
        "--discover",
        default=None,
        metavar="SERVICE",
        help="the replicas' Service (name[.namespace]): its ready endpoints, watched",
    )
    add("--policy", default="prefix", choices=POLICIES)
    add(
        "--load-factor",
        type=float,
        default=LOAD_FACTOR,
        help="prefix: a replica keeps its prefixes while its load stays within this many "
        "times the mean (at least 1)",
    )
    add("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/*")
    add(
        "--queue-timeout",
        type=float,
        default=60.0,
        help="seconds a request waits for a ready replica before a 503",
    )
    add("--max-queue", type=int, default=1024, help="requests that may wait at once")
    add("--retries", type=int, default=2, help="other replicas tried before a reply starts")
    add(
        "--prefix-chars",
        type=int,
        default=PREFIX_CHARS,
        help="characters of the prompt that the prefix policy hashes",
    )
    add(
        "--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"]
    )
    return p


def parse_args(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    """Flags win over KUBELLM_* variables, which win over defaults."""
    p = parser()
    for action in p._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        value = environ.get("KUBELLM_" + flag[2:].upper().replace("-", "_")) if flag else None
        if value is None or flag == "--help":
            continue
        if isinstance(action, argparse._AppendAction):
            action.default = [v.strip() for v in value.split(",") if v.strip()]
        else:
            action.default = action.type(value) if action.type else value
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv, dict(os.environ))
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if bool(args.replica) == bool(args.discover):
        print(
            "kubellm route: name the replicas with --replica URL (repeatable) or "
            "--discover SERVICE, one of the two",
            file=sys.stderr,
        )
        return 2
    if args.load_factor < 1:
        print(
            f"kubellm route: --load-factor must be at least 1 (the mean load), got "
            f"{args.load_factor:g}",
            file=sys.stderr,
        )
        return 2
    settings = RouterSettings(
        args.policy,
        args.retries,
        args.queue_timeout,
        args.max_queue,
        args.prefix_chars,
        args.api_key,
        args.load_factor,
    )
    replicas = ReplicaSet(args.replica)
    discovery = EndpointSliceWatch(args.discover, replicas) if args.discover else None
    router = Router(replicas, settings, discovery)
    logger.info("routing to %s by %s", args.discover or ", ".join(args.replica), args.policy)
    web.run_app(
        build_app(router),
        host=args.host,
        port=args.port,
        print=None,
        handler_cancellation=True,
        access_log=None,
    )
    return 0
