"""`kubellm serve`: the OpenAI-compatible server. Every flag --foo-bar can also be set
as the environment variable KUBELLM_FOO_BAR (that is how the operator configures pods)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import uvicorn

from kubellm.runtime.api.tool_parsers import AUTO_PARSERS
from kubellm.runtime.engine_flags import add_engine_flags, engine_config, with_environment
from kubellm.runtime.logs import FORMATS, LEVELS, configure_logging

logger = logging.getLogger("kubellm.serve")

# After the engine dies: the error responses go out for this long, then the server stops;
# if stopping itself hangs (a step stuck in a collective), the process exits regardless.
FAILURE_GRACE_SECONDS = 2.0
FAILURE_EXIT_SECONDS = 15.0


def parser() -> argparse.ArgumentParser:
    """The server's own flags, then one flag per EngineConfig field (its name, default,
    help and choices come from the dataclass)."""
    p = argparse.ArgumentParser(prog="kubellm serve", description=__doc__)
    add = p.add_argument
    add("--served-model-name", default=None, help="the name clients send (default: --model)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/*")
    add(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests get to finish before they are aborted",
    )
    add(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='accepted for vLLM\'s command lines: tool_choice "auto" (the default with '
        "tools) is always on, its parser chosen from the chat template or --tool-call-parser",
    )
    add(
        "--tool-call-parser",
        default=None,
        choices=sorted(AUTO_PARSERS),
        help='the model\'s tool-call format, which tool_choice "auto" reads: hermes '
        "(Qwen2.5, Hermes; also what the fallback prompt of templates without tools asks "
        "for), llama3_json, mistral; default: inferred from the chat template at load",
    )
    add(
        "--headless",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a node other than node 0 (--node-rank 1..nnodes-1): run this node's ranks, "
        "serve no API",
    )
    add("--log-level", default="info", type=str.lower, choices=LEVELS)
    add(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="json: one JSON object per line (with the request id on access lines)",
    )
    add_engine_flags(p)
    return p


def parse_args(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    """Flags win over KUBELLM_* variables, which win over defaults."""
    return with_environment(parser(), environ).parse_args(argv)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /health turns 503 and new requests get 503 while in-flight ones
    finish (at most `timeout` seconds); then uvicorn stops, cancelling (and so aborting)
    whatever is left. A second signal stops at once. The process then exits 0: unlike
    uvicorn's own handler, this one does not re-raise the signal after shutdown."""

    def __init__(self, config: uvicorn.Config, app, timeout: float) -> None:
        super().__init__(config)
        self.app, self.timeout = app, timeout

    def handle_exit(self, sig, frame) -> None:
        if self.app.state.draining:
            self.should_exit = self.force_exit = True
            return
        self.app.state.draining = True
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True

    def _in_flight(self) -> int:
        """Requests in the engine, and those admitted that have not reached it yet."""
        engine = self.app.state.engine
        return (engine.num_in_flight if engine is not None else 0) + self.app.state.admitted


def load_in_background(config, app, server: uvicorn.Server) -> threading.Thread:
    """Load the model while the server already answers /health with 503; attach the
    engine when ready, or stop the server (exit code 1) if it cannot be loaded."""
    from kubellm.runtime.api.server import attach_engine
    from kubellm.runtime.core.async_engine import AsyncEngine
    from kubellm.runtime.core.engine import LLMEngine

    def load() -> None:
        try:
            engine = AsyncEngine(LLMEngine(config))
            engine.on_failure(lambda reason: stop_after_failure(server))
            attach_engine(app, engine)
        except Exception as exc:  # any failure: say why, and exit non-zero
            logger.error("kubellm serve: could not load %s: %s", config.model, exc)
            app.state.load_failed = True
            server.should_exit = True

    thread = threading.Thread(target=load, name="kubellm-load", daemon=True)
    thread.start()
    return thread


def stop_after_failure(server: uvicorn.Server) -> None:
    """The engine died: stop the server after a grace period (the process then exits 1),
    and exit at once should that not finish in time."""

    def stop() -> None:
        time.sleep(FAILURE_GRACE_SECONDS)
        server.should_exit = True
        time.sleep(FAILURE_EXIT_SECONDS)
        logger.error("kubellm serve: shutdown after the engine failure hangs; exiting")
        os._exit(1)

    threading.Thread(target=stop, name="kubellm-failure-exit", daemon=True).start()


def check_headless(headless: bool, node_rank: int) -> None:
    """Node 0 serves the API; every other node runs headless, as vLLM's do."""
    if headless and node_rank == 0:
        raise ValueError(
            "--headless is for the nodes other than node 0 (node_rank 0 runs the scheduler "
            "and serves the API): give this node --node-rank 1 or more, or drop --headless"
        )
    if not headless and node_rank > 0:
        raise ValueError(f"node_rank {node_rank} serves no API (node 0 does): add --headless")


def main(argv: list[str]) -> int:
    args = parse_args(argv, dict(os.environ))
    configure_logging(args.log_level, args.log_format)
    from kubellm.runtime.api.server import build_app

    try:
        config = engine_config(args)
        check_headless(args.headless, config.node_rank)
    except ValueError as exc:
        print(f"kubellm serve: {exc}", file=sys.stderr)
        return 2
    if args.headless:
        from kubellm.runtime.executor.headless import run_headless

        return run_headless(config)
    app = build_app(None, args.served_model_name or args.model, args.api_key, args.tool_call_parser)
    app.state.load_failed = False
    # access_log off: ours (kubellm.access) has request ids and token counts
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # uvicorn's records go through our handler, once
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(uv_config, app, args.shutdown_timeout)
    load_in_background(config, app, server)
    server.run()
    engine = app.state.engine
    if engine is not None:
        engine.shutdown()
    failed = app.state.load_failed or (engine is not None and engine.failure is not None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
