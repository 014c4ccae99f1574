"""FastAPI app: OpenAI's completions, chat completions and models, plus health and tokenize."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubellm import __version__
from kubellm.runtime.api.metrics import ServerMetrics
from kubellm.runtime.api.protocol import ChatCompletionRequest, CompletionRequest
from kubellm.runtime.async_engine import AsyncEngine
from kubellm.runtime.outputs import StepDelta
from kubellm.runtime.sampling_params import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str, param: str | None = None, code: int | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def build_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kubellm", version=__version__)
    app.state.draining = False  # set on SIGTERM by `kubellm serve`
    _install_error_handlers(app)
    _refuse_work_while_draining(app)
    if api_key:
        _require_api_key(app, api_key)
    metrics = ServerMetrics(engine, served_model_name)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Response:
        if app.state.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served_model_name, "object": "model", "created": 0, "owned_by": "kubellm"}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: dict) -> dict:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", "BadRequestError", "prompt")
        tokens = engine.tokenize(prompt)
        return {
            "tokens": tokens,
            "count": len(tokens),
            "max_model_len": engine.engine.max_model_len,
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check_model(body.model, served_model_name)
        prompts = _completion_prompts(body.prompt)
        if len(prompts) != 1:
            raise APIError(
                400, "only one prompt per request is supported", "BadRequestError", "prompt"
            )
        params = _params(body, body.max_tokens, body.logprobs)
        return await _respond(engine, metrics, raw, "cmpl", body, prompts[0], params)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check_model(body.model, served_model_name)
        tokenizer = engine.engine.tokenizer
        prompt = tokenizer.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in body.messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, max_tokens, logprobs)
        return await _respond(engine, metrics, raw, "chatcmpl", body, prompt_ids, params)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.status), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "extra_forbidden":
            message = f"{where!r} is not supported by this server"
        elif first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(error_body(message, "BadRequestError", where or None, 400), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        return JSONResponse(
            error_body(str(exc.detail), kind, None, exc.status_code), exc.status_code
        )


_ALWAYS_OPEN = ("/health", "/metrics", "/version")


def _refuse_work_while_draining(app: FastAPI) -> None:
    """While draining, in-flight requests finish but new work gets 503."""

    @app.middleware("http")
    async def gate(request: Request, call_next):
        if app.state.draining and request.url.path not in _ALWAYS_OPEN:
            body = error_body("the server is shutting down", "ServiceUnavailableError", None, 503)
            return JSONResponse(body, 503)
        return await call_next(request)


def _require_api_key(app: FastAPI, api_key: str) -> None:
    """Guard /v1/*; health, metrics and version stay open (probes and scrapers have no key)."""
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time
                body = error_body("Incorrect API key provided.", "AuthenticationError", None, 401)
                return JSONResponse(body, 401)
        return await call_next(request)


def _check_model(model: str, served: str) -> None:
    if model != served:
        raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


def _check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """Refuse up front what the engine could only cut short (vLLM's message and numbers)."""
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            f"completion.",
            "BadRequestError",
            "max_tokens",
        )


def _completion_prompts(prompt: str | list[str] | list[int]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def _params(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc), "BadRequestError") from None


async def _respond(engine, metrics: ServerMetrics, raw: Request, prefix, body, prompt, params):
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    if isinstance(prompt, str):
        prompt = engine.tokenize(prompt)
    _check_context(len(prompt), params.max_tokens, engine.engine.max_model_len)
    try:
        stream = metrics.observe(engine.generate(request_id, prompt, params))
        first = await anext(stream)
    except ValueError as exc:
        raise APIError(400, str(exc), "BadRequestError") from None
    chat = prefix == "chatcmpl"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(raw, stream, first, request_id, body.model, chat, params.n, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _collect(stream, first, request_id, body.model, chat, params.n)


async def _deltas(first: StepDelta, stream: AsyncIterator[StepDelta]):
    yield first
    async for delta in stream:
        yield delta


async def _collect(stream, first, request_id, model, chat, n) -> dict:
    texts, tokens, finish = [""] * n, [0] * n, [None] * n
    prompt_tokens = 0
    async for delta in _deltas(first, stream):
        texts[delta.index] += delta.new_text
        tokens[delta.index] += len(delta.new_token_ids)
        finish[delta.index] = delta.finish_reason
        prompt_tokens = delta.num_prompt_tokens
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i]},
            "finish_reason": finish[i],
        }
        if chat
        else {"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
        for i in range(n)
    ]
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(prompt_tokens, sum(tokens)),
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _sse(raw, stream, first, request_id, model, chat, n, include_usage):
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": request_id, "object": kind, "created": created, "model": model}
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(n)])
    completion_tokens, prompt_tokens = 0, 0
    async for delta in _deltas(first, stream):
        if await raw.is_disconnected():
            await stream.aclose()  # aborts the request and frees its blocks
            return
        completion_tokens += len(delta.new_token_ids)
        prompt_tokens = delta.num_prompt_tokens
        if chat:
            choice = {"index": delta.index, "delta": {"content": delta.new_text}}
        else:
            choice = {"index": delta.index, "text": delta.new_text, "logprobs": None}
        choice["finish_reason"] = delta.finish_reason
        yield chunk([choice])
    if include_usage:
        yield chunk([], _usage(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"
