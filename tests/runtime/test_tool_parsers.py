"""The tool-call parsers on recorded model outputs of each format: the whole reply, and
the same reply streamed in two pieces cut at every character and one character at a
time, reassembled as an OpenAI client does, must agree."""

from __future__ import annotations

import json

import pytest

from kubellm.runtime.api.responses import ToolCallStream
from kubellm.runtime.api.tool_parsers import (
    AUTO_PARSERS,
    named_function,
    required_calls,
    value_end,
)

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"timezone": "Europe/Paris"}
TRICKY = {"query": 'say "}" and {braces}, <tool_call> or \\ too', "n": [1, 2.5, None, True]}

# (parser, recorded reply, expected content, expected calls as (name, arguments object))
RECORDED = [
    # Qwen2.5's calls (hermes), with and without text first, one and two calls
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>',
        "",
        [("get_weather", WEATHER)],
    ),
    (
        "hermes",
        'Let me look that up.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
        '"arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
        "Let me look that up.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "hermes",
        "<tool_call>\n" + json.dumps({"name": "search", "arguments": TRICKY}) + "\n</tool_call>",
        "",
        [("search", TRICKY)],
    ),
    (
        "hermes",
        'Voilà ☀️\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
        '"note": "東京 \\u00e9"}}\n</tool_call>',
        "Voilà ☀️",
        [("get_weather", {"city": "Zürich", "note": "東京 é"})],
    ),
    (
        "hermes",
        "It is sunny in Paris, 3 < 4 and <b>warm</b>.\n",
        "It is sunny in Paris, 3 < 4 and <b>warm</b>.\n",
        [],
    ),
    # Llama 3.1-3.3 JSON calls
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        "",
        [("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
        '"unit": "celsius"}}; {"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
        "",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("llama3_json", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("llama3_json", "{not a call}", "{not a call}", []),
    # Mistral: v3 tokenizers' JSON list, and v11's name[ARGS]arguments
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
        '"celsius"}}, {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]',
        "",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "mistral",
        'Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}',
        "Checking.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("mistral", "Bonjour! [Note] TOOL is not CALLS.", "Bonjour! [Note] TOOL is not CALLS.", []),
]


def _whole(parser, text: str) -> tuple[str, list[tuple[str, object]]]:
    parsed = parser(text, True)
    return parsed.content, [(call.name, json.loads(call.arguments)) for call in parsed.calls]


def _streamed(parser, pieces: list[str]) -> tuple[str, list[tuple[str, object]]]:
    """What a client reassembles from the deltas (OpenAI's accumulation rules)."""
    stream = ToolCallStream(parser)
    content, calls = "", []
    for number, piece in enumerate(pieces):
        delta = stream.delta(piece, finished=number == len(pieces) - 1)
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(calls):
                assert call["id"].startswith("call_") and call["type"] == "function"
                calls.append([call["function"]["name"], call["function"]["arguments"]])
            else:
                assert set(call) == {"index", "function"}  # id and name go once
                calls[call["index"]][1] += call["function"]["arguments"]
    return content, [(name, json.loads(arguments)) for name, arguments in calls]


@pytest.mark.parametrize("name, reply, content, calls", RECORDED)
def test_recorded_replies_whole_and_cut_at_every_character(name, reply, content, calls):
    parser = AUTO_PARSERS[name]
    assert _whole(parser, reply) == (content, calls)
    for cut in range(len(reply) + 1):
        assert _streamed(parser, [reply[:cut], reply[cut:]]) == (content, calls), cut
    assert _streamed(parser, list(reply)) == (content, calls)


@pytest.mark.parametrize("name, reply, content, calls", RECORDED)
def test_a_stream_never_takes_back_what_it_sent(name, reply, content, calls):
    """Every partial parse is a prefix of the whole one: the content sent so far, the
    calls' names and their arguments so far."""
    parser = AUTO_PARSERS[name]
    whole = parser(reply, True)
    for cut in range(len(reply) + 1):
        partial = parser(reply[:cut], False)
        assert whole.content.startswith(partial.content), cut
        assert len(partial.calls) <= len(whole.calls), cut
        for seen, final in zip(partial.calls, whole.calls):
            assert seen.name == final.name and final.arguments.startswith(seen.arguments), cut


def test_constrained_shapes_named_and_required():
    arguments = json.dumps(WEATHER)
    assert _whole(named_function("get_weather"), arguments) == ("", [("get_weather", WEATHER)])
    written = json.dumps(
        [{"name": "get_weather", "arguments": WEATHER}, {"name": "get_time", "arguments": TIME}]
    )
    expected = ("", [("get_weather", WEATHER), ("get_time", TIME)])
    assert _whole(required_calls, written) == expected
    assert _streamed(required_calls, list(written)) == expected


def test_a_call_cut_short_keeps_what_was_written():
    """max_tokens ending a call midway: the name and the arguments' text so far."""
    parsed = AUTO_PARSERS["hermes"]('<tool_call>\n{"name": "get_weather", "arguments": {"ci', True)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"ci')]


@pytest.mark.parametrize(
    "text, end",
    [
        ('"a\\"b" x', 6),
        ('{"k": [1, {"x": "}"}]} tail', 22),
        ("123,", 3),
        ("12", None),
        ('{"open": ', None),
        ("[1, 2]", 6),
        ("true}", 4),
    ],
)
def test_value_end(text, end):
    assert value_end(text, 0) == end


@pytest.mark.parametrize("name, reply, content, calls", RECORDED)
def test_a_parse_resumed_from_its_memo_equals_one_from_scratch(name, reply, content, calls):
    """A stream's parser keeps its scanning state (the memo) between deltas, so each
    character is scanned once; every prefix must still parse as it does afresh."""
    parser, memo = AUTO_PARSERS[name], {}
    for cut in range(len(reply) + 1):
        assert parser(reply[:cut], False, memo) == parser(reply[:cut], False), cut
    assert parser(reply, True, memo) == parser(reply, True)
