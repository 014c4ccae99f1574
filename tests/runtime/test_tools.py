"""Tool calling through the `openai` SDK (and langchain-openai) on the built-in model:
`required` and named choices write valid calls (by grammar), `none` writes text, the
`auto` parsers read calls the model was made to write in their formats, a tool's result
continues the conversation, and requests that cannot work are 400s that change nothing."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from kubellm.runtime.api.chat_prompt import render_chat, tool_call_format
from kubellm.runtime.api.protocol import ChatMessage, Tool
from kubellm.runtime.api.server import build_app
from kubellm.runtime.api.tool_parsers import AUTO_PARSERS
from kubellm.runtime.core.async_engine import AsyncEngine
from tests.runtime.invariants import assert_server_idle
from tests.runtime.live_server import live_server

MODEL = "smol"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 30}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a timezone",
            "parameters": CLOCK,
        },
    },
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
GREEDY = {"temperature": 0.0, "max_tokens": 120}


@pytest.fixture(scope="module")
def servers(smollm2):
    """One engine behind one app per `--tool-call-parser` (and one without: no flags)."""
    engine = AsyncEngine(smollm2.engine)
    with (
        live_server(build_app(engine, MODEL)) as plain,
        live_server(build_app(engine, MODEL, tool_call_parser="hermes")) as hermes,
        live_server(build_app(engine, MODEL, tool_call_parser="llama3_json")) as llama3_json,
        live_server(build_app(engine, MODEL, tool_call_parser="mistral")) as mistral,
    ):
        urls = {None: plain, "hermes": hermes, "llama3_json": llama3_json, "mistral": mistral}
        yield urls, engine
    engine.shutdown()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(servers):
    return _client(servers[0][None])


def _calls(message) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, each call's arguments valid for its tool."""
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def _streamed(chunks) -> tuple[str, list[tuple[str, dict]], str]:
    """Content, calls and finish reason reassembled from a stream as OpenAI's clients do."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.index == len(calls):
                calls.append([call.function.name, call.function.arguments or ""])
            else:
                assert call.id is None and call.function.name is None
                calls[call.index][1] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content, [(name, json.loads(arguments)) for name, arguments in calls], finish


@pytest.mark.slow
def test_a_named_function_is_called_with_valid_arguments_streamed_as_whole(client):
    request = dict(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=NAMED, **GREEDY)
    reply = client.chat.completions.create(**request).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    calls = _calls(reply.message)
    assert [name for name, _ in calls] == ["get_weather"]
    streamed = _streamed(client.chat.completions.create(**request, stream=True))
    assert streamed == ("", calls, "tool_calls")


@pytest.mark.slow
def test_required_gives_valid_calls_greedy_and_sampled(client, servers):
    for temperature, seed in ((0.0, None), (1.0, 0), (1.0, 1)):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice="required",
            temperature=temperature,
            seed=seed,
            max_tokens=200,
            n=2,
        )
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls"
            assert _calls(choice.message)
    single = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        **GREEDY,
    )
    assert len(_calls(single.choices[0].message)) == 1
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        stream=True,
        parallel_tool_calls=False,
        **GREEDY,
    )
    assert _streamed(streamed) == ("", _calls(single.choices[0].message), "tool_calls")
    assert_server_idle(servers[1])


@pytest.mark.slow
def test_none_writes_text_and_a_tool_result_continues_the_conversation(client):
    text = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=16
    ).choices[0]
    assert text.message.tool_calls is None and text.message.content
    assert text.finish_reason in ("stop", "length")
    called = (
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=NAMED, **GREEDY
        )
        .choices[0]
        .message
    )
    after = client.chat.completions.create(
        model=MODEL,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=24,
        temperature=0.0,
        messages=[
            *QUESTION,
            called.model_dump(exclude_none=True),
            {
                "role": "tool",
                "tool_call_id": called.tool_calls[0].id,
                "content": json.dumps({"temperature": 18, "sky": "clear"}),
            },
        ],
    ).choices[0]
    assert after.message.content and after.message.tool_calls is None


# What each parser's format looks like, as a regex the model is held to (the model knows
# none of them: the grammar makes it write the format, the parser must read it).
FORCED = {
    "hermes": r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": '
    r'"[A-Z][a-z]{2,8}", "unit": "(celsius|fahrenheit)"\}\}\n</tool_call>',
    "llama3_json": r'\{"name": "get_weather", "parameters": \{"city": "[A-Z][a-z]{2,8}", '
    r'"unit": "(celsius|fahrenheit)"\}\}',
    "mistral": r'\[TOOL_CALLS\]\[\{"name": "get_weather", "arguments": \{"city": '
    r'"[A-Z][a-z]{2,8}", "unit": "(celsius|fahrenheit)"\}\}\]',
}


@pytest.mark.slow
@pytest.mark.parametrize("parser", sorted(FORCED))
def test_each_auto_parser_reads_the_calls_written_in_its_format(servers, parser):
    client = _client(servers[0][parser])
    forced = {"structured_outputs": {"regex": FORCED[parser]}}
    request = dict(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="auto", extra_body=forced, **GREEDY
    )
    reply = client.chat.completions.create(**request).choices[0]
    assert reply.finish_reason == "tool_calls"
    calls = _calls(reply.message)
    assert [name for name, _ in calls] == ["get_weather"]
    expected_content = "Checking." if parser == "hermes" else None
    assert reply.message.content == expected_content
    streamed = _streamed(client.chat.completions.create(**request, stream=True))
    assert streamed == (expected_content or "", calls, "tool_calls")


@pytest.mark.slow
def test_auto_without_a_call_is_text(servers):
    reply = (
        _client(servers[0]["hermes"])
        .chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            tools=TOOLS,
            max_tokens=12,
            temperature=0.0,
        )
        .choices[0]
    )
    assert reply.message.tool_calls is None and reply.message.content
    assert reply.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_langchain_bind_tools_returns_a_valid_tool_call(servers):
    """A real agent-framework client: langchain-openai's ChatOpenAI.bind_tools."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Current weather in a city."""

        city: str = Field(max_length=20)

    llm = ChatOpenAI(
        base_url=servers[0][None] + "/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=60,
    )
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke(
        "What is the weather in Paris?"
    )
    [call] = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    assert GetWeather.model_validate(call["args"]).city


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
            "tool_choice",
            "'fly', not among the tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "'function'"),
        ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"}, "tools", "distinct"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "x", "parameters": {"type": "objekt"}},
                    }
                ],
                "tool_choice": "required",
            },
            "tool_choice",
            "cannot be compiled",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            None,
            "not several",
        ),
        ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice", "tool_choice"),
    ],
)
def test_tools_that_cannot_work_are_a_400_naming_the_field(servers, body, param, needle):
    urls, engine = servers
    request = {"model": MODEL, "messages": QUESTION, **body}
    response = httpx.post(urls[None] + "/v1/chat/completions", json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["param"] == param, error
    assert_server_idle(engine)


def _tools() -> list[Tool]:
    return [Tool.model_validate(tool) for tool in TOOLS]


def test_a_template_without_tools_gets_the_fallback_prompt(smollm2):
    """The built-in model's template knows no tools: signatures go into the system
    message, a past call and its result are written as Hermes text."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        ChatMessage.model_validate(m)
        for m in [
            {"role": "system", "content": "Be brief."},
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ]
    ]
    prompt = render_chat(smollm2.engine.tokenizer, messages, _tools())
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(TOOLS[1]) in system and "<tool_call></tool_call> XML tags" in system
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' in prompt
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>" in prompt
    assert AUTO_PARSERS["hermes"](prompt.split("<|im_start|>assistant\n")[1], True).calls


def test_a_template_with_tools_gets_them_itself(smollm2):
    tokenizer = smollm2.engine.tokenizer
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }};{% endfor %}"
    )
    original, tokenizer.chat_template = tokenizer.chat_template, template
    try:
        prompt = render_chat(tokenizer, [ChatMessage.model_validate(QUESTION[0])], _tools())
    finally:
        tokenizer.chat_template = original
    assert prompt == "[get_weather][get_time]user: What is the weather in Paris?;"


# Chat templates written here after each family's documented format: how each renders
# the tools and the calls of an assistant turn.
QWEN25 = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}</tools>\nFor each function call, return a json object within "
    "<tool_call></tool_call> XML tags<|im_end|>\n{% endif %}{% for m in messages %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "\n<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
LLAMA31 = (
    "<|begin_of_text|>{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Environment: ipython\n{% for t in tools %}{{ t | tojson }}{% endfor %}<|eot_id|>"
    "{% endif %}{% for m in messages %}{% if m.tool_calls %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n<|python_tag|>{{ m.tool_calls[0].function | tojson }}<|eom_id|>"
    "{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
    "\n\n{{ m.content }}<|eot_id|>{% endif %}{% endfor %}"
)
MISTRAL = (
    "{% for m in messages %}{% if m.role == 'user' %}{% if tools %}[AVAILABLE_TOOLS]"
    "{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}</s>{% elif m.role == "
    "'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% else %}{{ m.content }}</s>"
    "{% endif %}{% endfor %}"
)
UNKNOWN = "{% for t in tools %}<fn>{{ t | tojson }}</fn>{% endfor %}{{ messages[-1].content }}"
PLAIN = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize(
    ("template", "parser", "reason"),
    [
        (QWEN25, "hermes", "writes <tool_call>"),
        (LLAMA31, "llama3_json", "writes <|python_tag|>, ipython"),
        (MISTRAL, "mistral", "writes [TOOL_CALLS]"),
        (PLAIN, "hermes", "fallback prompt"),
        (None, "hermes", "fallback prompt"),
        (UNKNOWN, None, "renders tools but writes none of"),
        (QWEN25 + MISTRAL, None, "several formats: <tool_call>, [TOOL_CALLS]"),
    ],
)
def test_the_auto_parser_is_inferred_from_the_chat_template(template, parser, reason):
    name, why = tool_call_format(template)
    assert name == parser and reason in why, why


def test_the_parser_and_its_reason_are_logged_and_an_unknown_format_is_a_400(smollm2, caplog):
    """No flag, a template that renders tools in a format kubellm cannot name: "auto" is a
    400 saying which flag to set; required, named and none keep working."""
    tokenizer = smollm2.engine.tokenizer
    engine = AsyncEngine(smollm2.engine)
    original, tokenizer.chat_template = tokenizer.chat_template, UNKNOWN
    try:
        with caplog.at_level("INFO", logger="kubellm.runtime.api.server"):
            unknown = build_app(engine, MODEL)
            build_app(engine, MODEL, tool_call_parser="mistral")
    finally:
        tokenizer.chat_template = original
    assert "no parser (the chat template renders tools but writes none" in caplog.text
    assert 'tool_choice "auto": the mistral parser (--tool-call-parser)' in caplog.text
    with live_server(unknown) as url:
        request = {"model": MODEL, "messages": QUESTION, "tools": TOOLS, "max_tokens": 8}
        refused = httpx.post(url + "/v1/chat/completions", json=request)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"
        assert "--tool-call-parser NAME (hermes, llama3_json, mistral)" in refused.text
        for choice in ("none", "required", NAMED):
            answer = httpx.post(
                url + "/v1/chat/completions",
                json={**request, "tool_choice": choice, "max_tokens": 40},
            )
            assert answer.status_code == 200, (choice, answer.text)
    assert_server_idle(engine)


@pytest.mark.slow
def test_with_no_flags_auto_gives_a_valid_call_or_text_streamed_as_whole(servers):
    """The built-in model's template knows no tools, so the fallback's format (hermes) is
    read. One request held to a call in that format by a regex (the model decides, the
    parser reads), one left to the model."""
    client = _client(servers[0][None])
    forced = {"structured_outputs": {"regex": FORCED["hermes"]}}
    for extra in ({"extra_body": forced}, {}):
        request = dict(model=MODEL, messages=QUESTION, tools=TOOLS, **GREEDY, **extra)
        reply = client.chat.completions.create(**request).choices[0]
        calls = _calls(reply.message) if reply.message.tool_calls else []
        if extra:
            assert [name for name, _ in calls] == ["get_weather"]
        assert reply.finish_reason in (("tool_calls",) if calls else ("stop", "length"))
        streamed = _streamed(client.chat.completions.create(**request, stream=True))
        assert streamed == (reply.message.content or "", calls, reply.finish_reason)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_a_langchain_agent_loop_runs_to_its_answer_with_auto(servers, streaming):
    """model -> tool call -> our Python tool -> tool message -> model -> answer, with
    langchain-openai and `bind_tools` (tool_choice left to OpenAI's default, auto). A
    135M model seldom chooses to call a tool, so the first step names the tool (langchain's
    tool_choice); every later step is auto, the server reading the model's own replies."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        ran.append(city)
        return json.dumps({"city": city, "temperature_c": 18, "sky": "clear"})

    llm = ChatOpenAI(
        base_url=servers[0][None] + "/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=60,
        streaming=streaming,
    )
    messages = [HumanMessage("What is the weather in Paris?")]
    step = llm.bind_tools([get_weather], tool_choice="get_weather")
    for _ in range(4):
        reply = step.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            assert call["name"] == "get_weather"
            messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
        step = llm.bind_tools([get_weather])  # auto from here on
    assert ran and messages[-1].content and not messages[-1].tool_calls
    assert isinstance(messages[2], ToolMessage) and "18" in messages[2].content
