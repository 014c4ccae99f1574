"""Response bodies: whole completions and Server-Sent Event chunks, as OpenAI sends them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import accumulate

from kubellm.runtime.api.errors import error_body
from kubellm.runtime.api.middleware import AccessRecord
from kubellm.runtime.api.tool_parsers import ParsedCall, ToolParser
from kubellm.runtime.core.async_engine import GenerationError
from kubellm.runtime.core.outputs import StepDelta
from kubellm.runtime.core.sequence import TokenLogprobs

_MIN_LOGPROB = -9999.0  # JSON has no -Infinity


@dataclass
class ResponseShape:
    """What every chunk of one response shares."""

    request_id: str
    model: str
    chat: bool
    num_choices: int
    logprobs: bool
    token_text: TokenText
    # completions' echo: per prompt, its text and token ids, put before each of its choices
    echo: list[tuple[str, list[int]]] | None = None
    tool_parser: ToolParser | None = None  # chat: reads the reply's tool calls
    created: int = field(default_factory=lambda: int(time.time()))

    def echoed(self, index: int, delta: StepDelta) -> tuple[str, list[TokenLogprobs | int]]:
        """What goes before choice `index`'s first delta: the prompt's text and logprob
        entries (its first token, which nothing predicts, as a bare id)."""
        text, ids = self.echo[index * len(self.echo) // self.num_choices]
        if not self.logprobs:
            return text, []
        return text, [ids[0], *delta.prompt_logprobs[1:]]


class TokenText:
    """Each token id's own text (what logprobs are reported against), cached."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_call(call_id: str, call: ParsedCall) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's: a reply that ended by calling tools says so."""
    return "tool_calls" if called and reason == "stop" else reason


class ToolCallStream:
    """One choice's reply as OpenAI streams it with tools: content deltas, then per call
    its index, id, type and name first, then its arguments in fragments."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.ids: list[str] = []
        self.arguments_sent: list[int] = []
        self.memo: dict = {}  # the parser's scanning state: each parse resumes the last

    def delta(self, new_text: str, finished: bool) -> dict:
        self.text += new_text
        parsed = self.parser(self.text, finished, self.memo)
        delta: dict = {}
        if len(parsed.content) > self.content_sent:
            delta["content"] = parsed.content[self.content_sent :]
            self.content_sent = len(parsed.content)
        calls = [self._call_delta(index, call) for index, call in enumerate(parsed.calls)]
        calls = [call for call in calls if call is not None]
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _call_delta(self, index: int, call: ParsedCall) -> dict | None:
        if index == len(self.ids):
            self.ids.append(_call_id())
            self.arguments_sent.append(len(call.arguments))
            return {"index": index, **_tool_call(self.ids[index], call)}
        sent = self.arguments_sent[index]
        if len(call.arguments) <= sent:
            return None
        self.arguments_sent[index] = len(call.arguments)
        return {"index": index, "function": {"arguments": call.arguments[sent:]}}


def completion_logprobs(entries: list[TokenLogprobs | int], text: TokenText, offset: int) -> dict:
    """The legacy completions shape; `offset` is where the first token starts in the text.
    A bare token id (an echoed prompt's first token) has null logprobs, as OpenAI's."""
    scored = [e if isinstance(e, TokenLogprobs) else None for e in entries]
    tokens = [text(e.token_id if isinstance(e, TokenLogprobs) else e) for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else max(e.logprob, _MIN_LOGPROB) for e in scored],
        "top_logprobs": [
            None if e is None else {text(t): max(lp, _MIN_LOGPROB) for t, lp in e.top.items()}
            for e in scored
        ],
        "text_offset": list(accumulate((len(t) for t in tokens[:-1]), initial=offset)),
    }


def chat_logprobs(entries: list[TokenLogprobs], text: TokenText) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token = text(token_id)
        return {
            "token": token,
            "logprob": max(logprob, _MIN_LOGPROB),
            "bytes": list(token.encode()),
        }

    return {
        "content": [
            entry(e.token_id, e.logprob) | {"top_logprobs": [entry(*kv) for kv in e.top.items()]}
            for e in entries
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs | int] = field(default_factory=list)


async def collect(
    stream: AsyncIterator[tuple[int, StepDelta]], shape: ResponseShape, record: AccessRecord
) -> dict:
    """The whole response once every choice has finished."""
    choices = [_Choice() for _ in range(shape.num_choices)]
    prompt_tokens: dict[str, int] = {}
    async for index, delta in stream:
        choice = choices[index]
        if shape.echo is not None and choice.num_tokens == 0:
            choice.text, choice.logprobs = shape.echoed(index, delta)
        choice.text += delta.new_text
        choice.num_tokens += len(delta.new_token_ids)
        choice.finish_reason = delta.finish_reason
        choice.logprobs.extend(delta.new_logprobs)
        prompt_tokens[delta.request_id] = delta.num_prompt_tokens
    record.prompt_tokens = sum(prompt_tokens.values())
    record.completion_tokens = sum(c.num_tokens for c in choices)
    return {
        "id": shape.request_id,
        "object": "chat.completion" if shape.chat else "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": [_whole_choice(i, c, shape) for i, c in enumerate(choices)],
        "usage": usage(record.prompt_tokens, record.completion_tokens),
    }


def _whole_choice(index: int, choice: _Choice, shape: ResponseShape) -> dict:
    if shape.chat:
        logprobs = chat_logprobs(choice.logprobs, shape.token_text) if shape.logprobs else None
        parsed = shape.tool_parser(choice.text, True) if shape.tool_parser else None
        message: dict = {"role": "assistant", "content": choice.text}
        if parsed and parsed.calls:
            calls = [_tool_call(_call_id(), call) for call in parsed.calls]
            message = {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": _finish_reason(choice.finish_reason, "tool_calls" in message),
        }
    logprobs = completion_logprobs(choice.logprobs, shape.token_text, 0) if shape.logprobs else None
    return {
        "index": index,
        "text": choice.text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
    }


async def sse(
    stream: AsyncIterator[tuple[int, StepDelta]],
    shape: ResponseShape,
    record: AccessRecord,
    include_usage: bool,
    on_close,
) -> AsyncIterator[str]:
    """Role deltas first (chat), then one chunk per delta, an optional usage chunk,
    `[DONE]`. `on_close` runs however the stream ends (a client that hung up too)."""
    try:
        if shape.chat:
            role = {"role": "assistant", "content": ""}
            yield _chunk(shape, [{"index": i, "delta": role} for i in range(shape.num_choices)])
        text_length = [0] * shape.num_choices
        tools = [
            ToolCallStream(shape.tool_parser) for _ in range(shape.num_choices) if shape.tool_parser
        ]
        started: set[int] = set()  # choices that sent their first chunk (echo goes there)
        prompt_tokens: dict[str, int] = {}
        async for index, delta in stream:
            record.completion_tokens += len(delta.new_token_ids)
            prompt_tokens[delta.request_id] = delta.num_prompt_tokens
            record.prompt_tokens = sum(prompt_tokens.values())
            first = shape.echo is not None and index not in started
            started.add(index)
            choice = _delta_choice(index, delta, shape, text_length[index], first)
            if tools:
                choice["delta"] = tools[index].delta(
                    delta.new_text, finished=delta.finish_reason is not None
                )
                choice["finish_reason"] = _finish_reason(
                    delta.finish_reason, bool(tools[index].ids)
                )
                if not (choice["delta"] or choice["finish_reason"] or shape.logprobs):
                    continue  # text held back (a call's marker may be starting): nothing new
            yield _chunk(shape, [choice])
            text_length[index] += len(choice.get("text", delta.new_text))
        if include_usage:
            yield _chunk(shape, [], usage(record.prompt_tokens, record.completion_tokens))
        yield "data: [DONE]\n\n"
    except GenerationError as exc:  # the status line went out long ago: say it in-band
        yield f"data: {json.dumps(error_body(500, str(exc)))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        on_close()


def _delta_choice(
    index: int, delta: StepDelta, shape: ResponseShape, offset: int, first: bool
) -> dict:
    logprobs = None
    if shape.chat:
        if shape.logprobs:
            logprobs = chat_logprobs(delta.new_logprobs, shape.token_text)
        choice = {"index": index, "delta": {"content": delta.new_text}, "logprobs": logprobs}
    else:
        text, entries = shape.echoed(index, delta) if first else ("", [])
        if shape.logprobs:
            entries = [*entries, *delta.new_logprobs]
            logprobs = completion_logprobs(entries, shape.token_text, offset)
        choice = {"index": index, "text": text + delta.new_text, "logprobs": logprobs}
    choice["finish_reason"] = delta.finish_reason
    return choice


def _chunk(shape: ResponseShape, choices: list[dict], usage_body: dict | None = None) -> str:
    body = {
        "id": shape.request_id,
        "object": "chat.completion.chunk" if shape.chat else "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": choices,
    }
    if usage_body is not None:
        body["usage"] = usage_body
    return f"data: {json.dumps(body)}\n\n"
