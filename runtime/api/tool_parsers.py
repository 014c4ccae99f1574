"""Tool calls read out of a model's text: the `auto` parsers (vLLM's names: hermes,
llama3_json, mistral) and the two shapes a constrained `tool_choice` writes.

Every parser is a pure function of the text so far and whether it is finished. What it
returns only ever grows as the text grows: content is the text before the first call
(held back while it could still turn into a call's marker), and a call appears once its
name is complete, its arguments the raw JSON text of the arguments value so far. So a
stream sends the difference between two parses, and the last parse is the whole reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

_WHITESPACE = " \t\r\n"
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3's template writes "parameters"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it; a prefix of it while unfinished


@dataclass
class Parsed:
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


ToolParser = Callable[..., Parsed]  # (text so far, finished, memo=None) -> Parsed


Memo = dict  # a stream's scanning state, kept between parses of its growing text


def value_end(text: str, start: int, memo: Memo | None = None) -> int | None:
    """Where the JSON value at `start` ends, or None if the text stops first. A bare
    number or literal is only known to end at a delimiter. With a `memo` (one per stream,
    whose text only grows), a scan resumes where the last one stopped, so a stream scans
    each character once."""
    if start >= len(text):
        return None
    opener = text[start]
    if opener not in '{["':
        at = start
        while at < len(text) and text[at] not in ",}] \t\r\n;":
            at += 1
        return at if at < len(text) else None
    state = memo.get(start) if memo is not None else None
    if isinstance(state, int):
        return state
    at, depth, in_string = state or (start + 1, 0 if opener == '"' else 1, opener == '"')
    while at < len(text):
        char = text[at]
        if in_string:
            if char == "\\":
                at += 2
                continue
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        at += 1
        if depth == 0 and not in_string:
            break
    else:
        if memo is not None:
            memo[start] = (at, depth, in_string)
        return None
    if memo is not None:
        memo[start] = at
    return at


def _string_end(text: str, start: int) -> int | None:
    at = start + 1
    while at < len(text):
        if text[at] == "\\":
            at += 2
        elif text[at] == '"':
            return at + 1
        else:
            at += 1
    return None


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def scan_call(
    text: str, start: int, memo: Memo | None = None
) -> tuple[ParsedCall | None, int | None]:
    """The call written as `{"name": ..., "arguments": {...}}` at `start` (None until
    its name is complete) and where the object ends (None while it is unfinished)."""
    if text[start : start + 1] != "{":
        return None, None
    name, arguments, at = None, "", start + 1
    while True:
        at = _skip_space(text, at)
        if at >= len(text):
            break
        if text[at] == "}":
            return _call(name, arguments), at + 1
        if text[at] == ",":
            at += 1
            continue
        key_end = _string_end(text, at) if text[at] == '"' else None
        if key_end is None:
            break
        key = json.loads(text[at:key_end])
        at = _skip_space(text, key_end)
        if text[at : at + 1] != ":":
            break
        value_start = _skip_space(text, at + 1)
        end = value_end(text, value_start, memo)
        if key in ARGUMENT_KEYS:
            arguments = text[value_start : len(text) if end is None else end]
        elif key == "name" and end is not None:
            name = json.loads(text[value_start:end])
        if end is None:
            break
        at = end
    return _call(name, arguments), None


def _call(name: object, arguments: str) -> ParsedCall | None:
    return ParsedCall(name, arguments) if isinstance(name, str) else None


def scan_call_list(
    text: str, at: int, separators: str = ",", memo: Memo | None = None
) -> list[ParsedCall]:
    """Calls written one after another from `at`, separated by `separators`."""
    calls = []
    while True:
        at = _skip_space(text, at)
        call, end = scan_call(text, at, memo)
        if call is not None:
            calls.append(call)
        if end is None:
            return calls
        at = _skip_space(text, end)
        if text[at : at + 1] not in tuple(separators):
            return calls
        at += 1


def _held_back(text: str, marker: str, finished: bool) -> str:
    """The content a stream may send now: all of it once finished; before that, not a
    tail that could begin `marker`, nor trailing whitespace (a call may follow it)."""
    if finished:
        return text
    for length in range(min(len(marker), len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            text = text[:-length]
            break
    return text.rstrip(_WHITESPACE)


def _content_then_calls(marker: str, read_calls: Callable[..., list[ParsedCall]]):
    """A parser for formats that write optional text, then `marker`, then calls."""

    def parse(text: str, finished: bool, memo: Memo | None = None) -> Parsed:
        at = text.find(marker)
        if at < 0:
            return Parsed(_held_back(text, marker, finished))
        return Parsed(text[:at].rstrip(_WHITESPACE), read_calls(text, at + len(marker), memo))

    return parse


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _hermes_calls(text: str, at: int, memo: Memo | None) -> list[ParsedCall]:
    """`<tool_call>{...}</tool_call>`, repeated (`at` is just past the first tag)."""
    calls = []
    while True:
        call, end = scan_call(text, _skip_space(text, at), memo)
        if call is not None:
            calls.append(call)
        if end is None:
            return calls
        at = text.find(HERMES_OPEN, end)
        if at < 0:
            return calls
        at += len(HERMES_OPEN)


MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


def _mistral_calls(text: str, at: int, memo: Memo | None) -> list[ParsedCall]:
    """`[TOOL_CALLS][{...}, ...]` (v3 tokenizers) or `[TOOL_CALLS]name[ARGS]{...}`
    once per call (v11 and later)."""
    at = _skip_space(text, at)
    if text[at : at + 1] == "[":
        return scan_call_list(text, at + 1, memo=memo)
    calls = []
    while True:
        piece_end = text.find(MISTRAL_CALLS, at)
        piece = text if piece_end < 0 else text[:piece_end]  # offsets stay the text's
        arguments_at = piece.find(MISTRAL_ARGS, at)
        if arguments_at < 0:
            return calls
        start = _skip_space(piece, arguments_at + len(MISTRAL_ARGS))
        end = value_end(piece, start, memo)
        arguments = piece[start:] if end is None else piece[start:end]
        calls.append(ParsedCall(piece[at:arguments_at].strip(), arguments.strip()))
        if piece_end < 0:
            return calls
        at = piece_end + len(MISTRAL_CALLS)


LLAMA_PYTHON_TAG = "<|python_tag|>"


def llama3_json(text: str, finished: bool, memo: Memo | None = None) -> Parsed:
    """Llama 3.1-3.3's JSON calls: the whole reply is `{"name": ..., "parameters": ...}`
    (optionally after `<|python_tag|>`, several separated by `;`); any other reply is
    content, and so is one that ends without a single call's name."""
    start = _skip_space(text, 0)
    if text.startswith(LLAMA_PYTHON_TAG, start):
        start = _skip_space(text, start + len(LLAMA_PYTHON_TAG))
    elif LLAMA_PYTHON_TAG.startswith(text[start:]) and not finished:
        return Parsed()  # perhaps the tag, not yet whole
    if text[start : start + 1] != "{":
        return Parsed(text if start < len(text) or finished else "")
    calls = scan_call_list(text, start, ";,", memo)
    if not calls and finished:
        return Parsed(text)
    return Parsed("", calls)


hermes = _content_then_calls(HERMES_OPEN, _hermes_calls)
mistral = _content_then_calls(MISTRAL_CALLS, _mistral_calls)

AUTO_PARSERS: dict[str, ToolParser] = {
    "hermes": hermes,
    "llama3_json": llama3_json,
    "mistral": mistral,
}


def named_function(name: str) -> ToolParser:
    """`tool_choice` naming a function: the grammar writes its arguments and nothing else."""
    return lambda text, finished, memo=None: Parsed("", [ParsedCall(name, text)])


def required_calls(text: str, finished: bool, memo: Memo | None = None) -> Parsed:
    """`tool_choice: required`: the grammar writes `[{"name": ..., "arguments": ...}, ...]`."""
    start = _skip_space(text, 0)
    if text[start : start + 1] != "[":
        return Parsed()
    return Parsed("", scan_call_list(text, start + 1, memo=memo))
