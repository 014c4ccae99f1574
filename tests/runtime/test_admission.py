"""Admission: each bad parameter is refused once, with one message naming it, before
anything is queued; a good request is admitted once and queued as admitted (the engine
checks and compiles nothing again). Counted over real HTTP on the running server."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import httpx
import pytest

from kubellm.runtime import EngineConfig, LLMEngine, SamplingParams
from kubellm.runtime.api.server import build_app
from kubellm.runtime.core.admission import AdmissionError
from kubellm.runtime.core.async_engine import AsyncEngine
from tests.runtime.invariants import assert_server_idle
from tests.runtime.live_server import live_server

from .pins import pinned

MODEL = "tiny"
CONTEXT = 256


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = EngineConfig(**pinned(model=str(tiny_model_dir("mha-tied")), max_model_len=CONTEXT))
    engine = AsyncEngine(LLMEngine(config))
    with live_server(build_app(engine, MODEL)) as url:
        yield SimpleNamespace(url=url, engine=engine)
    engine.shutdown()


@pytest.fixture
def calls(server, monkeypatch) -> Counter:
    """How often admission ran, raised, tokenized and compiled, and the engine queued."""
    counted: Counter = Counter()
    admission, engine = server.engine.admission, server.engine.engine

    def count(owner, name: str):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            counted[name] += 1
            try:
                return original(*args, **kwargs)
            except AdmissionError:
                counted[name + " refused"] += 1
                raise

        monkeypatch.setattr(owner, name, counting)

    for owner, name in (
        (admission, "admit"),
        (admission, "tokenize"),
        (admission.grammars, "compile"),
        (engine, "add_request"),
    ):
        count(owner, name)
    return counted


def _chat(content: str, **body) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}


def _completion(prompt, **body) -> dict:
    return {"model": MODEL, "prompt": prompt, **body}


BAD_REGEX = {"regex": "(unclosed"}
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}

REFUSED = [  # (path, body, param, the message's words)
    ("completions", _completion([]), "prompt", "the prompt must not be empty"),
    ("completions", _completion(["ok", []]), "prompt", "the prompt must not be empty"),
    ("completions", _completion([10**9]), "prompt", "prompt token ids must be integers"),
    (
        "completions",
        _completion(list(range(1, 250)), max_tokens=16),
        "max_tokens",
        f"maximum context length is {CONTEXT} tokens. However, you requested 265 tokens",
    ),
    (
        "chat/completions",
        _chat("word " * 400),
        "prompt",
        f"maximum context length is {CONTEXT} tokens. However, your prompt contains",
    ),
    (
        "completions",
        _completion("x", logit_bias={"99999999": 1}),
        "logit_bias",
        "logit_bias keys must be token ids",
    ),
    (
        "completions",
        _completion("x", structured_outputs=BAD_REGEX),
        "structured_outputs",
        "the regex constraint cannot be compiled",
    ),
    (
        "completions",
        _completion("x", guided_regex="(unclosed"),
        "guided_regex",
        "the regex constraint cannot be compiled",
    ),
    (
        "chat/completions",
        _chat("hi", response_format=BAD_SCHEMA),
        "response_format",
        "the json constraint cannot be compiled",
    ),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), REFUSED)
def test_each_bad_parameter_is_refused_once_before_anything_is_queued(
    server, calls, path, body, param, words
):
    response = httpx.post(f"{server.url}/v1/{path}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert error["message"].count(words) == 1  # one message, not one per layer
    assert calls["admit"] == calls["admit refused"] == 1
    assert calls["compile"] <= 1 and calls["add_request"] == 0
    assert_server_idle(server.engine)


def test_a_good_request_is_admitted_once_and_queued_as_admitted(server, calls):
    body = _completion(["12", [5, 6, 7]], max_tokens=2, structured_outputs={"regex": r"\d+"})
    response = httpx.post(f"{server.url}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2
    assert calls["admit"] == 1 and not calls["admit refused"]
    assert calls["tokenize"] == 1  # the text prompt; the ids are taken as they are
    assert calls["compile"] == 1  # in admission only: the engine compiles nothing again
    assert calls["add_request"] == 2  # one per prompt


def test_the_offline_api_refuses_through_the_same_step(server):
    """`LLM.generate` and the engine take the same admission: one error, the parameter
    named, nothing queued."""
    engine = server.engine.engine
    with pytest.raises(AdmissionError, match="logit_bias keys") as refused:
        engine.admission.admit([[1, 2]], SamplingParams(logit_bias={10**9: 1.0}))
    assert refused.value.param == "logit_bias"
    (admitted,) = engine.admission.admit(["hello"], SamplingParams(max_tokens=10**6))
    assert admitted.token_ids and admitted.text == "hello"  # offline: cut at the context
