"""Structured output through the `openai` SDK on the built-in model: JSON schemas, JSON
objects, regexes and choices constrain what it writes (xgrammar), streamed as whole."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from kubellm.runtime.api.server import build_app
from kubellm.runtime.core.async_engine import AsyncEngine
from tests.runtime.invariants import assert_server_idle
from tests.runtime.live_server import live_server

MODEL = "smol"
SCHEMAS = {
    "city": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "country": {"type": "string", "enum": ["France", "Spain", "Italy"]},
            "population": {"type": "integer", "minimum": 0, "maximum": 50_000_000},
        },
        "required": ["city", "country", "population"],
        "additionalProperties": False,
    },
    "nested-array": {
        "type": "object",
        "properties": {
            "team": {"type": "string", "maxLength": 16},
            "members": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 12},
                        "senior": {"type": "boolean"},
                    },
                    "required": ["name", "senior"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["team", "members"],
        "additionalProperties": False,
    },
}
QUESTION = [{"role": "user", "content": "Describe the capital of France as JSON."}]


@pytest.fixture(scope="module")
def server(smollm2):
    engine = AsyncEngine(smollm2.engine)  # the session's engine, stepped by this thread
    with live_server(build_app(engine, MODEL)) as url:
        yield url, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _json_schema(name: str) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate_greedy_and_sampled(client, server, name):
    for temperature, seed in ((0.0, None), (1.0, 0), (1.0, 1), (1.0, 2)):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            response_format=_json_schema(name),
            temperature=temperature,
            seed=seed,
            max_tokens=200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    assert_server_idle(server[1])


@pytest.mark.slow
def test_a_streamed_constrained_reply_is_the_whole_reply(client):
    request = dict(
        model=MODEL,
        messages=QUESTION,
        response_format=_json_schema("city"),
        temperature=0,
        max_tokens=200,
    )
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = client.chat.completions.create(**request, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


@pytest.mark.slow
def test_json_object_regex_and_choice(client):
    question = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=question,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=120,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    phone = client.completions.create(
        model=MODEL,
        prompt="Call me at",
        max_tokens=12,
        temperature=1.0,
        seed=3,
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
    )
    assert phone.choices[0].text[3] == "-" and len(phone.choices[0].text) == 8
    answers = client.completions.create(
        model=MODEL,
        prompt="Is Paris in France?",
        max_tokens=5,
        n=4,
        temperature=1.0,
        seed=1,
        extra_body={"guided_choice": ["yes", "no"]},  # vLLM's older name
    )
    assert {c.text for c in answers.choices} <= {"yes", "no"}
    assert all(c.finish_reason == "stop" for c in answers.choices)


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format",
            "cannot be compiled",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "response_format"),
        (
            {"structured_outputs": {"regex": "(unclosed"}},
            "structured_outputs",
            "cannot be compiled",
        ),
        ({"guided_choice": ["a"], "guided_regex": "a"}, None, "not several"),
    ],
)
def test_a_constraint_that_cannot_work_is_a_400_naming_its_field(server, body, param, needle):
    url, engine = server
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    response = httpx.post(url + "/v1/chat/completions", json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["param"] == param
    assert_server_idle(engine)


@pytest.mark.slow
def test_langchain_with_structured_output_returns_a_valid_model(server):
    """A real agent-framework client: langchain-openai's ChatOpenAI against the server."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        city: str = Field(max_length=24)
        country: str = Field(max_length=24)

    llm = ChatOpenAI(
        base_url=server[0] + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=60
    )
    answer = llm.with_structured_output(Capital).invoke("What is the capital of France?")
    assert isinstance(answer, Capital) and answer.city
