"""The HTTP API through a live uvicorn on 127.0.0.1, with the official openai SDK."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.api.server import build_app
from kubellm.runtime.async_engine import AsyncEngine

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from kubellm.runtime import EngineConfig, LLMEngine

    engine = AsyncEngine(
        LLMEngine(EngineConfig(model=str(tiny_model_dir("mha-tied")), max_model_len=256))
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(engine, MODEL)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    _APPS[url] = app
    yield url, engine
    uv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_completion_matches_the_offline_engine(client, tiny_model_dir):
    out = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 8
    offline = LLM(model=str(tiny_model_dir("mha-tied")), kv_cache_memory_gib=0.01)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert out.choices[0].text == offline.generate([[5, 6, 7]], params)[0].outputs[0].text


def test_chat_streams_role_first_then_content_then_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert streamed == whole.choices[0].message.content


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "other", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "tools": []}, 400, "not supported"),
        ({"model": MODEL, "prompt": list(range(1, 300))}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, status, needle):
    url, engine = server
    response = httpx.post(url + "/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.post(url + "/v1/completions", content=b"{not json").status_code == 400
    assert not engine.engine.has_unfinished_requests()


def test_a_client_that_hangs_up_frees_its_blocks(server):
    url, engine = server
    body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        for _ in response.iter_lines():
            break
    deadline = time.monotonic() + 20
    while engine.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    kv = engine.engine.kv
    assert engine.num_in_flight == 0 and kv.num_free_blocks == kv.num_blocks


def test_api_key_guards_v1_only(tiny_model_dir):
    from fastapi.testclient import TestClient

    from kubellm.runtime import EngineConfig, LLMEngine

    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_model_dir("mha-tied")))))
    try:
        with TestClient(build_app(engine, MODEL, api_key="s3cret")) as http:
            assert http.get("/v1/models").status_code == 401
            wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 401
            right = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert right.status_code == 200
            assert http.get("/health").status_code == 200
            assert http.get("/version").status_code == 200
    finally:
        engine.shutdown()


def test_metrics_count_tokens_requests_and_latencies(client, server):
    url, _ = server

    def scrape() -> dict[str, float]:
        values = {}
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith("kubellm:"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    client.completions.create(
        model=MODEL,
        prompt=[9, 9, 9, 9],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = scrape()
    label = f'model_name="{MODEL}"'

    def grew(metric: str) -> float:
        key = f"{metric}{{{label}}}"
        return after[key] - before.get(key, 0.0)

    assert grew("kubellm:prompt_tokens_total") == 4
    assert grew("kubellm:generation_tokens_total") == 5
    assert grew("kubellm:time_to_first_token_seconds_count") == 1
    assert grew("kubellm:inter_token_latency_seconds_count") == 4
    assert grew("kubellm:e2e_request_latency_seconds_count") == 1
    success = f'kubellm:request_success_total{{finished_reason="length",{label}}}'
    assert after[success] - before.get(success, 0.0) == 1
    assert after[f"kubellm:num_requests_running{{{label}}}"] == 0
    assert after[f"kubellm:prefix_cache_queries_total{{{label}}}"] >= 4
    assert 0 <= after[f"kubellm:kv_cache_usage_perc{{{label}}}"] <= 1


def test_while_draining_health_and_new_work_get_503(server):
    url, _ = server
    app_state = _app_of(url)
    app_state.draining = True
    try:
        assert httpx.get(url + "/health").status_code == 503
        response = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == 503
        assert httpx.get(url + "/metrics").status_code == 200
    finally:
        app_state.draining = False
    assert httpx.get(url + "/health").status_code == 200


def _app_of(url: str):
    return _APPS[url].state


_APPS: dict = {}


def test_prompt_plus_max_tokens_over_the_context_is_400_with_both_numbers(server):
    url, _ = server
    body = {"model": MODEL, "prompt": list(range(1, 201)), "max_tokens": 100}
    response = httpx.post(url + "/v1/completions", json=body)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "maximum context length is 256 tokens" in message
    assert "200 in the messages, 100 in the completion" in message
