"""What wraps every request: the loading/draining gate, the API key, the access log."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubellm.runtime.api.errors import error_response

access_logger = logging.getLogger("kubellm.access")

ALWAYS_OPEN = ("/health", "/live", "/metrics", "/version")  # probes and scrapers: no key, no gate


def refuse_work_until_ready(app: FastAPI) -> None:
    """503 for everything but probes while the model loads (`app.state.engine` is None),
    once the engine died, and while draining (in-flight requests finish; new ones are
    refused). `app.state.admitted` counts the requests let through whose handler has not
    returned: one admitted just before a SIGTERM may not have reached the engine yet,
    and the drain must wait for it too."""
    app.state.admitted = 0

    @app.middleware("http")
    async def gate(request: Request, call_next):
        if request.url.path in ALWAYS_OPEN:
            return await call_next(request)
        if app.state.engine is None:
            return error_response(503, "the model is still loading")
        if app.state.engine.failure is not None:
            return error_response(503, f"the engine failed: {app.state.engine.failure}")
        if app.state.draining:
            return error_response(503, "the server is shutting down")
        app.state.admitted += 1
        try:
            return await call_next(request)  # a stream's handler returns once submitted
        finally:
            app.state.admitted -= 1


def require_api_key(app: FastAPI, api_key: str) -> None:
    """Guard /v1/* with `Authorization: Bearer <key>`, compared in constant time."""
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "Incorrect API key provided.")
        return await call_next(request)


@dataclass
class AccessRecord:
    """What a handler tells the access log; streams update it as tokens go out."""

    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class AccessLog:
    """One line per /v1/* request once its response has fully gone out (streams too):
    request id, method, path, status, tokens in and out, latency, client."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            record = scope.get("state", {}).get("access") or AccessRecord("-")
            client = scope.get("client") or ("-", 0)
            access_logger.info(
                "%s %s %s %d prompt_tokens=%d completion_tokens=%d %.3fs client=%s",
                record.request_id,
                scope["method"],
                scope["path"],
                status,
                record.prompt_tokens,
                record.completion_tokens,
                time.perf_counter() - started,
                client[0],
                extra={"request_id": record.request_id},
            )
