"""FastAPI app: OpenAI's completions, chat completions and models; health, version,
tokenize and metrics.

The app can exist before its engine: `kubellm serve` listens at once (so probes see
503 "loading" rather than a refused connection) and attaches the engine once loaded.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from kubellm import __version__
from kubellm.runtime.api.chat_prompt import render_chat, tool_call_format
from kubellm.runtime.api.errors import APIError, install_error_handlers
from kubellm.runtime.api.metrics import ServerMetrics
from kubellm.runtime.api.middleware import (
    AccessLog,
    AccessRecord,
    refuse_work_until_ready,
    require_api_key,
)
from kubellm.runtime.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    TokenizeRequest,
    TokenizeResponse,
)
from kubellm.runtime.api.responses import ResponseShape, TokenText, collect, sse
from kubellm.runtime.api.tool_parsers import (
    AUTO_PARSERS,
    ToolParser,
    mistral,
    named_function,
    required_calls,
)
from kubellm.runtime.core.admission import AdmissionError, Admitted
from kubellm.runtime.core.async_engine import AsyncEngine, EngineDeadError, GenerationError
from kubellm.runtime.core.sampling_params import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's, for /v1/completions only
logger = logging.getLogger(__name__)


def build_app(
    engine: AsyncEngine | None,
    served_model_name: str,
    api_key: str | None = None,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """`engine` may be None and given later to `attach_engine` (503 until then).
    `tool_call_parser` (a name in AUTO_PARSERS) reads the calls of `tool_choice: auto`;
    without one, the engine's chat template tells (`tool_call_format`)."""
    app = FastAPI(title="kubellm", version=__version__)
    app.state.engine = None
    app.state.asked_tool_call_parser = tool_call_parser
    app.state.draining = False  # set on SIGTERM by `kubellm serve`
    install_error_handlers(app)
    refuse_work_until_ready(app)
    if api_key:
        require_api_key(app, api_key)
    app.add_middleware(AccessLog)  # outermost: it sees the 401s and 503s too
    if engine is not None:
        attach_engine(app, engine)
    metrics = ServerMetrics(lambda: app.state.engine, served_model_name)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Readiness: 200 once the model is loaded; 503 while loading, once the engine
        died or hangs, and while draining."""
        engine = app.state.engine
        if engine is None:
            return JSONResponse({"status": "loading"}, 503)
        trouble = _engine_trouble(engine)
        if trouble is not None:
            return trouble
        if app.state.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/live")
    async def live() -> JSONResponse:
        """Liveness: 503 only once the engine died or hangs in a step (loading and
        draining are alive: restarting would not help them)."""
        engine = app.state.engine
        trouble = None if engine is None else _engine_trouble(engine)
        return trouble or JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served_model_name, "object": "model", "created": 0, "owned_by": "kubellm"}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        if body.model is not None:
            _check_model(body.model, served_model_name)
        engine = app.state.engine
        tokens = engine.admission.tokenize(body.prompt, body.add_special_tokens)
        return TokenizeResponse(
            tokens=tokens, count=len(tokens), max_model_len=engine.max_model_len
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check_model(body.model, served_model_name)
        engine = app.state.engine
        given = _prompt_list(body.prompt)
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        echo = [p if isinstance(p, str) else None for p in given] if body.echo else None
        prompt_logprobs = body.logprobs if body.echo else None
        params = _params(body, max_tokens, body.logprobs, prompt_logprobs)
        return await _respond(engine, metrics, raw, "cmpl", body, given, params, echo)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check_model(body.model, served_model_name)
        engine = app.state.engine
        tool_parser = _tool_parser(body, *app.state.auto_tool_call_parser)
        prompt = render_chat(engine.tokenizer, body.messages, body.tools)
        max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = body.max_tokens  # None: up to the context length, as vLLM
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, max_tokens, logprobs)
        if tool_parser is mistral:
            params.skip_special_tokens = False  # its [TOOL_CALLS] marker is a special token
        return await _respond(
            engine, metrics, raw, "chatcmpl", body, [prompt], params, tool_parser=tool_parser
        )

    return app


def attach_engine(app: FastAPI, engine: AsyncEngine) -> None:
    """Serve `engine` from now on, with the parser of `tool_choice: auto` chosen for its
    model (logged with the reason)."""
    asked = app.state.asked_tool_call_parser
    if asked is not None:
        name, why = asked, "--tool-call-parser"
    else:
        name, why = tool_call_format(engine.tokenizer.chat_template)
    if name is None:
        logger.warning('tool_choice "auto": no parser (%s); set --tool-call-parser', why)
    else:
        logger.info('tool_choice "auto": the %s parser (%s)', name, why)
    app.state.auto_tool_call_parser = (name, why)
    app.state.engine = engine


def _engine_trouble(engine: AsyncEngine) -> JSONResponse | None:
    """503 when the engine died or a step hangs; None when it works."""
    if engine.failure is not None:
        return JSONResponse({"status": "failed", "reason": engine.failure}, 503)
    stalled = engine.stalled_seconds()
    if stalled is not None:
        reason = f"a step has been running for {stalled:.0f} s"
        return JSONResponse({"status": "stalled", "reason": reason}, 503)
    return None


def _check_model(model: str, served: str) -> None:
    if model != served:
        raise APIError(404, f"The model `{model}` does not exist.", "model")


def _tool_parser(
    body: ChatCompletionRequest, auto_parser: str | None, why: str
) -> ToolParser | None:
    """What reads the reply's tool calls (None: the reply is text), once the request's
    tools and tool_choice are known to agree. `auto_parser` (None: none is known, `why`)
    reads the calls of `auto`."""
    names = [tool.function.name for tool in body.tools or []]
    if len(set(names)) < len(names):
        raise APIError(400, f"tools must have distinct names, got {names}", "tools")
    choice = body.chosen_tool_use()
    if choice != "none" and not names:
        raise APIError(400, "tool_choice needs tools to choose from", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            message = f"tool_choice names {choice.function.name!r}, not among the tools {names}"
            raise APIError(400, message, "tool_choice")
        return named_function(choice.function.name)
    if choice == "required":
        return required_calls
    if choice == "auto":
        if auto_parser is None:
            raise APIError(
                400,
                f'"auto" tool choice: kubellm cannot tell this model\'s '
                f"tool-call format ({why}); start the server with "
                f"--tool-call-parser NAME ({', '.join(sorted(AUTO_PARSERS))}), "
                'or send tool_choice "required" or a named function',
                "tool_choice",
            )
        return AUTO_PARSERS[auto_parser]
    return None


def _prompt_list(prompt: str | list[int] | list[str | list[int]]) -> list:
    """One prompt (text or token ids) or a list of them, as a list."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    return list(prompt) or [[]]  # [] is an empty prompt: the engine says so


def _params(
    body, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def _echo_texts(given: list[str | None], admitted: list[Admitted], tokenizer) -> list:
    """Each prompt's text as sent (token ids decoded) with its ids."""
    prompts = [a.token_ids for a in admitted]
    decoded = [tokenizer.decode(ids) if text is None else text for text, ids in zip(given, prompts)]
    return list(zip(decoded, prompts))


async def _respond(
    engine: AsyncEngine,
    metrics: ServerMetrics,
    raw: Request,
    prefix: str,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[str | list[int]],
    params: SamplingParams,
    echo: list[str | None] | None = None,
    tool_parser: ToolParser | None = None,
):
    """Admit (off the event loop) -> submit -> reply. `prompts`: completions' as sent,
    chat's rendered; `echo`: completions' prompts to put before their choices, as sent
    (None: token ids, decoded once they are known to be valid); `tool_parser` reads chat
    replies' calls."""
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    record = raw.state.access = AccessRecord(request_id)
    options = {"whole_reply_fits": True, "add_special_tokens": prefix != "chatcmpl"}
    if params.structured_output is not None:
        options["constraint_param"] = body.constraint_field()
    try:
        admitted = await asyncio.to_thread(engine.admission.admit, prompts, params, **options)
        stream = engine.submit(request_id, admitted)
    except AdmissionError as exc:
        raise APIError(400, str(exc), exc.param) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc)) from None
    shape = ResponseShape(
        request_id=request_id,
        model=body.model,
        chat=prefix == "chatcmpl",
        num_choices=len(prompts) * params.n,
        logprobs=params.logprobs is not None,
        token_text=TokenText(engine.tokenizer),
        echo=None if echo is None else _echo_texts(echo, admitted, engine.tokenizer),
        tool_parser=tool_parser,
    )
    observed = metrics.observe(stream, params.n)

    def release() -> None:
        if not stream.closed:
            metrics.count_aborted(stream.remaining)
            stream.close()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = sse(observed, shape, record, include_usage, on_close=release)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        return await _unless_client_leaves(raw, collect(observed, shape, record))
    except GenerationError as exc:
        raise APIError(500, str(exc)) from None
    finally:
        release()


async def _unless_client_leaves(raw: Request, work):
    """Await `work`, but cancel it if the client disconnects first (its request is then
    aborted by the caller's cleanup rather than generated for nobody)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(raw))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # no-op once done
    if task in done:
        return task.result()
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass
