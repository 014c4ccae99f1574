"""schemathesis against the OpenAPI document the server publishes: whatever a client sends
that the document allows (and much that it does not), no 5xx, no hang, no leaked block."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from kubellm.runtime import EngineConfig, LLMEngine
from kubellm.runtime.api.server import build_app
from kubellm.runtime.core.async_engine import AsyncEngine
from tests.runtime.invariants import assert_server_idle
from tests.runtime.live_server import live_server

from .pins import pinned

MODEL = "tiny"
# The document is the app's own; it does not depend on a loaded engine.
schema = schemathesis.openapi.from_dict(build_app(None, MODEL).openapi())


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir):
    # A short context bounds the work one generated request can ask for (n up to 128).
    config = EngineConfig(**pinned(model=str(tiny_model_dir("gqa4-untied")), max_model_len=48))
    engine = AsyncEngine(LLMEngine(config))
    with live_server(build_app(engine, MODEL)) as url:
        yield url, engine
    engine.shutdown()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: a failure here is reproducible
)
def test_no_server_errors(case, fuzzed):
    url, _ = fuzzed
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL  # otherwise nearly every example stops at the 404
    response = case.call(base_url=url, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and response.headers["content-type"] == "application/json":
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(url + "/health").status_code == 200


def test_after_the_fuzzing_every_block_is_free(fuzzed):
    assert_server_idle(fuzzed[1])
