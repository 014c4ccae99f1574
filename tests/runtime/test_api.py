"""The HTTP API through a live uvicorn on 127.0.0.1, with the official openai SDK and httpx."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from kubellm.runtime import LLM, EngineConfig, LLMEngine, SamplingParams
from kubellm.runtime.api.server import attach_engine, build_app
from kubellm.runtime.core.async_engine import AsyncEngine
from tests.runtime.invariants import assert_server_idle
from tests.runtime.live_server import live_server

from .pins import pinned

MODEL = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = AsyncEngine(
        LLMEngine(EngineConfig(**pinned(model=str(tiny_model_dir("mha-tied")), max_model_len=256)))
    )
    app = build_app(engine, MODEL)
    with live_server(app) as url:
        yield SimpleNamespace(url=url, engine=engine, app=app)
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_model_dir) -> LLM:
    return LLM(**pinned(model=str(tiny_model_dir("mha-tied")), kv_cache_memory_gib=0.05))


def _offline_text(offline: LLM, prompt, max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return offline.generate([prompt], params)[0].outputs[0].text


def _scrape(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("kubellm:"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# ---- results ---------------------------------------------------------------------------


def test_completion_matches_the_offline_engine(client, offline):
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=8, **GREEDY)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 8
    assert out.choices[0].text == _offline_text(offline, [5, 6, 7], 8)


def test_a_list_of_prompts_gets_n_choices_each_in_order(client, offline):
    prompts = ["hello there", "the cat sat"]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, **GREEDY)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert texts[0] == texts[1] == _offline_text(offline, prompts[0], 6)
    assert texts[2] == texts[3] == _offline_text(offline, prompts[1], 6)
    prompt_tokens = sum(len(offline.engine.admission.tokenize(p)) for p in prompts)
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == 24


def test_chat_streams_role_first_then_content_then_usage(client):
    messages = [{"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **GREEDY)
    assert streamed == whole.choices[0].message.content


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], **GREEDY
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == 256  # the whole context, not OpenAI's legacy 16


def test_the_same_seed_gives_the_same_text_and_the_n_choices_differ(client):
    def sample() -> list[str]:
        out = client.completions.create(
            model=MODEL,
            prompt="once upon",
            n=2,
            max_tokens=12,
            temperature=1.0,
            seed=7,
            extra_body={"ignore_eos": True},
        )
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample()
    assert sample() == first and first[0] != first[1]


def test_a_stop_string_ends_the_text_before_it(client):
    free = client.completions.create(model=MODEL, prompt=[11, 12], max_tokens=20, **GREEDY)
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = client.completions.create(
        model=MODEL, prompt=[11, 12], max_tokens=20, stop=[stop], **GREEDY
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_completion_logprobs_report_the_chosen_token_and_the_top_n(client):
    out = client.completions.create(
        model=MODEL, prompt=[3, 4, 5], max_tokens=6, logprobs=3, **GREEDY
    )
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy takes the most likely


def test_chat_logprobs_streamed_equal_whole(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "hey"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(whole) == 5
    for entry in whole:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]


def test_64_concurrent_streaming_clients_get_their_own_outputs(server, offline):
    prompts = [[1 + i % 7, 20 + i, 300 + 3 * i] for i in range(64)]
    lengths = [4 + i % 13 for i in range(64)]

    async def one(http: openai.AsyncOpenAI, prompt: list[int], max_tokens: int) -> str:
        stream = await http.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, **GREEDY
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_of_them() -> list[str]:
        http = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        async with http:
            return await asyncio.gather(*(one(http, p, n) for p, n in zip(prompts, lengths)))

    texts = asyncio.run(all_of_them())
    expected = offline.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    )
    assert texts == [e.outputs[0].text for e in expected]
    assert_server_idle(server.engine)


def test_logit_bias_bans_and_forces_tokens(client, offline):
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = offline.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids[0]
    banned_params = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logit_bias={first: -100}
    )
    expected = offline.generate([[5, 6, 7]], banned_params)[0].outputs[0]
    assert expected.token_ids[0] != first
    banned = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=4, logit_bias={str(first): -100}, **GREEDY
    )
    assert banned.choices[0].text == expected.text
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logit_bias={"42": 100},
        **GREEDY,
    )
    assert chat.choices[0].message.content == offline.tokenizer.decode([42] * 3)


def test_echo_returns_the_prompt_and_its_logprobs_as_lm_eval_asks(client, offline):
    prompt = [5, 6, 7, 8, 9, 10]
    # lm-evaluation-harness's loglikelihood request: echo, logprobs=1, max_tokens=1
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, logprobs=1, echo=True, **GREEDY
    )
    params = SamplingParams(
        temperature=0, max_tokens=1, ignore_eos=True, logprobs=1, prompt_logprobs=1
    )
    expected = offline.generate([prompt], params)[0]
    prompt_text = offline.tokenizer.decode(prompt)
    choice = out.choices[0]
    assert choice.text == prompt_text + expected.outputs[0].text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(prompt) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    scored = [e.logprob for e in expected.prompt_logprobs[1:]] + [
        expected.outputs[0].logprobs[0].logprob
    ]
    assert logprobs.token_logprobs[1:] == pytest.approx(scored, abs=1e-5)
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])


def test_echo_streams_the_prompt_first_for_every_choice(client, offline):
    prompts = ["One two", [11, 12, 13]]
    stream = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=3, n=2, echo=True, stream=True, **GREEDY
    )
    texts = ["" for _ in range(4)]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=3, n=2, echo=True, **GREEDY
    )
    assert texts == [c.text for c in whole.choices]
    echoed = ["One two", offline.tokenizer.decode([11, 12, 13])]
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    completions = [o.outputs[0].text for o in offline.generate(prompts, greedy)]
    assert texts == [echoed[i // 2] + completions[i // 2] for i in range(4)]


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_tokenize_uses_the_model_tokenizer(server):
    response = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"})
    body = response.json()
    assert body["tokens"] == server.engine.admission.tokenize("hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert httpx.post(server.url + "/tokenize", json={"prompt": 5}).status_code == 400


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("completions", {"model": "other", "prompt": "x"}, 404, "does not exist"),
        ("completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
        ("completions", {"model": MODEL, "prompt": "x", "n": 1000}, 400, "n"),
        ("completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
        ("completions", {"model": MODEL, "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
        (
            "completions",
            {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}},
            400,
            "logit_bias",
        ),
        (
            "completions",
            {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}},
            400,
            "logit_bias",
        ),
        ("completions", {"model": MODEL, "prompt": "x", "tools": []}, 400, "not supported"),
        ("completions", {"model": MODEL, "prompt": list(range(1, 300))}, 400, "context length"),
        ("completions", {"model": MODEL, "prompt": ["ok", []]}, 400, "empty"),
        ("completions", {"model": MODEL, "prompt": [10**9]}, 400, "token ids"),
        ("completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
        ("completions", {"model": MODEL}, 400, "prompt"),
        ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        (
            "chat/completions",
            {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
            400,
            "role",
        ),
        (
            "chat/completions",
            {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
            400,
            "tool_call_id",
        ),
        (
            "chat/completions",
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            },
            400,
            "content part type 'image_url' is not supported",
        ),
        (
            "chat/completions",
            {"model": MODEL, "messages": [{"role": "assistant", "content": None}]},
            400,
            "content is required",
        ),
        (
            "chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "functions": [{"name": "f"}],
            },
            400,
            "not supported",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_errors_and_change_nothing(
    server, client, offline, path, body, status, needle
):
    response = httpx.post(f"{server.url}/v1/{path}", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and "Traceback" not in response.text
    assert_server_idle(server.engine)
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=8, **GREEDY)
    assert out.choices[0].text == _offline_text(offline, [5, 6, 7], 8)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"null"])
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_a_body_that_is_not_a_json_object_is_400(server, content, content_type):
    response = httpx.post(
        server.url + "/v1/completions", content=content, headers={"content-type": content_type}
    )
    assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]


def test_prompt_plus_max_tokens_over_the_context_is_400_with_both_numbers(server):
    body = {"model": MODEL, "prompt": list(range(1, 201)), "max_tokens": 100}
    response = httpx.post(server.url + "/v1/completions", json=body)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "maximum context length is 256 tokens" in message
    assert "200 in the messages, 100 in the completion" in message


# ---- clients that leave --------------------------------------------------------------


def test_a_streaming_client_that_hangs_up_frees_its_blocks(server):
    body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        for _ in response.iter_lines():
            break
    assert_server_idle(server.engine)
    metrics = _scrape(server.url)
    assert metrics[f'kubellm:num_requests_running{{model_name="{MODEL}"}}'] == 0
    assert metrics[f'kubellm:kv_cache_usage_perc{{model_name="{MODEL}"}}'] == 0


def test_a_waiting_client_that_hangs_up_aborts_its_request(server):
    aborted = f'kubellm:request_success_total{{finished_reason="abort",model_name="{MODEL}"}}'
    before = _scrape(server.url).get(aborted, 0.0)
    body = {"model": MODEL, "prompt": [1, 2], "max_tokens": 250, "ignore_eos": True, "n": 8}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    assert_server_idle(server.engine)
    assert _scrape(server.url)[aborted] - before == 8


# ---- auth, health, drain, metrics, logs ------------------------------------------------


def test_api_key_guards_v1_only(server):
    app = build_app(server.engine, MODEL, api_key="s3cret")
    with live_server(app) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 401
        right = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        for path in ("/health", "/version", "/metrics"):
            assert httpx.get(url + path).status_code == 200


def test_health_is_503_until_the_engine_is_attached(server):
    app = build_app(None, MODEL)
    with live_server(app) as url:
        loading = httpx.get(url + "/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert refused.status_code == 503 and "loading" in refused.json()["error"]["message"]
        assert httpx.get(url + "/metrics").status_code == 200
        attach_engine(app, server.engine)
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 200


def test_while_draining_health_and_new_work_get_503(server):
    server.app.state.draining = True
    try:
        assert httpx.get(server.url + "/health").status_code == 503
        body = {"model": MODEL, "prompt": "x"}
        response = httpx.post(server.url + "/v1/completions", json=body)
        assert response.status_code == 503 and response.json()["error"]["code"] == 503
        assert httpx.get(server.url + "/metrics").status_code == 200
    finally:
        server.app.state.draining = False
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_count_tokens_requests_and_latencies(client, server):
    before = _scrape(server.url)
    client.completions.create(model=MODEL, prompt=[9, 9, 9, 9], max_tokens=5, **GREEDY)
    after = _scrape(server.url)
    label = f'model_name="{MODEL}"'

    def grew(metric: str) -> float:
        key = f"{metric}{{{label}}}"
        return after[key] - before.get(key, 0.0)

    assert grew("kubellm:prompt_tokens_total") == 4
    assert grew("kubellm:generation_tokens_total") == 5
    assert grew("kubellm:time_to_first_token_seconds_count") == 1
    assert grew("kubellm:request_queue_time_seconds_count") == 1
    assert grew("kubellm:inter_token_latency_seconds_count") == 4
    assert grew("kubellm:e2e_request_latency_seconds_count") == 1
    success = f'kubellm:request_success_total{{finished_reason="length",{label}}}'
    assert after[success] - before.get(success, 0.0) == 1
    assert after[f"kubellm:num_requests_running{{{label}}}"] == 0
    assert after[f"kubellm:prefix_cache_queries_total{{{label}}}"] >= 4
    assert 0 <= after[f"kubellm:kv_cache_usage_perc{{{label}}}"] <= 1
    kv = server.engine.engine.kv  # what an InferencePool's endpoint picker reads
    info = f'kubellm:cache_config_info{{block_size="16",{label},num_gpu_blocks="{kv.num_blocks}"}}'
    assert after[info] == 1


def test_the_access_log_has_id_status_tokens_and_latency(client, server, caplog):
    with caplog.at_level(logging.INFO, logger="kubellm.access"):
        out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, **GREEDY)
        httpx.post(server.url + "/v1/completions", json={"model": "other", "prompt": "x"})
        deadline = time.monotonic() + 5
        while len(_access_lines(caplog)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    served, refused = _access_lines(caplog)[:2]
    assert served.startswith(f"{out.id} POST /v1/completions 200 prompt_tokens=3 ")
    assert "completion_tokens=4" in served and "client=127.0.0.1" in served
    assert " POST /v1/completions 404 " in refused


def _access_lines(caplog) -> list[str]:
    """Only our access log (other tests may have turned other loggers up)."""
    return [r.getMessage() for r in caplog.records if r.name == "kubellm.access"]


def test_a_request_whose_text_cannot_be_decoded_fails_alone(client, server, offline, monkeypatch):
    """A fault injected into one request's detokenizer: that request gets a 500 (a stream,
    an error event), a concurrent one gets its usual text, and the server serves on."""
    from kubellm.runtime.core.detokenizer import IncrementalDetokenizer

    add = IncrementalDetokenizer.add

    def faulty_add(self, token_id, check_stop=True):
        if "boom" in self._stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected fault")
        return add(self, token_id, check_stop)

    monkeypatch.setattr(IncrementalDetokenizer, "add", faulty_add)
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def both():
        async def failing():
            with pytest.raises(openai.InternalServerError) as error:
                await aclient.completions.create(
                    model=MODEL, prompt="x", max_tokens=20, stop=["boom"], **GREEDY
                )
            return error.value

        async def failing_stream():
            stream = await aclient.completions.create(
                model=MODEL, prompt="y", max_tokens=20, stop=["boom"], stream=True, **GREEDY
            )
            with pytest.raises(openai.APIError) as error:
                async for _ in stream:
                    pass
            return error.value

        healthy = aclient.completions.create(model=MODEL, prompt="z", max_tokens=20, **GREEDY)
        return await asyncio.gather(failing(), failing_stream(), healthy)

    plain_error, stream_error, healthy = asyncio.run(both())
    assert plain_error.status_code == 500 and "this request failed" in plain_error.message
    assert "UnicodeDecodeError" in plain_error.message
    assert "this request failed" in str(stream_error)
    assert healthy.choices[0].text == _offline_text(offline, "z", 20)
    assert httpx.get(server.url + "/health").status_code == 200
    assert_server_idle(server.engine)


def test_agent_framework_messages_reach_the_template(client, server):
    """Text parts, the developer role, an assistant turn that only called a tool, and the
    tool's result: what agent frameworks send. Parts read as their joined text and
    `developer` as `system` (this template does not know it)."""

    def reply(messages):
        return (
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
            .choices[0]
            .message.content
        )

    plain = reply(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    )
    parts = reply(
        [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            },
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ]
    )
    assert parts == plain
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "colour", "arguments": '{"kind": "warm"}'},
    }
    after_tool = reply(
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "red"},
        ]
    )
    assert isinstance(after_tool, str)  # the conversation goes on
    assert_server_idle(server.engine)
