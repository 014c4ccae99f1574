"""`make serve`'s settings (no pins: the built-in model's 4-bit layers through kubellm's
kernel, int8-rounded activations, an fp16 KV cache on CPUs with AVX2; torch's int4 kernel
and attention where kubellm's kernels cannot be built, as `test_fallback_path` runs the
first test): a greedy reply does not depend on what the prefix cache held."""

from __future__ import annotations

import openai
import pytest

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.api.server import build_app
from kubellm.runtime.core.async_engine import AsyncEngine
from tests.runtime.live_server import live_server

from .pins import assert_on_the_default_cpu_path, defaults

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
BLOCK = 16


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    llm = LLM(**defaults(max_model_len=1024, kv_cache_memory_gib=0.25))
    assert_on_the_default_cpu_path(llm)
    return llm


def test_a_greedy_chat_reply_is_the_same_computed_found_in_part_found_whole_and_streamed(
    default_llm,
):
    """The first question caches the chat template's first block; the second question
    then finds that block, its repeat finds its whole prompt, and the streamed repeat
    must still give the same text."""
    default_engine = default_llm.engine
    serving = AsyncEngine(default_engine)
    with live_server(build_app(serving, MODEL)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(text: str, **extra):
            return client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": text}],
                temperature=0,
                max_tokens=48,
                **extra,
            )

        ask("What is the capital of France?")
        hits = default_engine.kv.prefix_hits
        computed = ask("List three colours.").choices[0].message.content
        assert default_engine.kv.prefix_hits > hits  # the template's first block was found
        found_whole = ask("List three colours.").choices[0].message.content
        chunks = ask("List three colours.", stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    serving.shutdown()
    assert computed == found_whole == streamed


def test_tokens_do_not_depend_on_how_many_blocks_the_cache_held(default_llm):
    """For each k, a prompt whose first k blocks another request left in the cache:
    computed with those k blocks found, then found whole, both equal to a run with no
    prefix cache at all."""
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm, kv = default_llm, default_llm.engine.kv
    prompts = [[(97 * k + 31 * j) % 20000 + 300 for j in range(5 * BLOCK + 1)] for k in range(6)]
    found = {}
    for k, prompt in enumerate(prompts):
        llm.generate([prompt[: k * BLOCK] + [7] * 9], greedy)  # leaves k blocks cached
        hits = kv.prefix_hits
        in_part = llm.generate([prompt], greedy)[0].outputs[0].token_ids
        assert kv.prefix_hits - hits == k * BLOCK
        whole = llm.generate([prompt], greedy)[0].outputs[0].token_ids
        found[k] = (in_part, whole)
    uncached = LLM(
        **defaults(max_model_len=1024, kv_cache_memory_gib=0.25, enable_prefix_caching=False)
    )
    cold = [o.outputs[0].token_ids for o in uncached.generate(prompts, greedy)]
    assert all(found[k] == (cold[k], cold[k]) for k in found), found
