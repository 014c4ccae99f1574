"""The engine end to end on a tiny model: stops, n, aborts, bad input, random workloads."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.runtime import LLM, EngineConfig, LLMEngine, SamplingParams
from kubellm.runtime.model.source import ModelNotFoundError

from .invariants import ENGINE_SETTINGS, check_all_free, check_kv_consistent
from .pins import pinned
from .workloads import run_workload, workload

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> LLM:
    return LLM(
        **pinned(model=str(tiny_model_dir("mha-tied")), max_model_len=256, kv_cache_memory_gib=0.01)
    )


def test_stop_token_ids_end_the_sequence(tiny):
    prompt = [300, 301, 302]
    free_run = tiny.generate([prompt], GREEDY)[0].outputs[0].token_ids
    stop_at = free_run[4]
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at])
    out = tiny.generate([prompt], params)[0].outputs[0]
    first = free_run.index(stop_at)
    assert out.token_ids == free_run[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_max_tokens_and_min_tokens(tiny):
    out = tiny.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert len(out.token_ids) <= 3
    eos = tiny.tokenizer.eos_token_id
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=20, stop_token_ids=[eos])
    out = tiny.generate([[5, 6, 7]], params)[0].outputs[0]
    assert len(out.token_ids) == 20 and eos not in out.token_ids


def test_generation_stops_at_max_model_len(tiny):
    prompt = list(range(100, 350))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    out = tiny.generate([prompt], params)[0].outputs[0]
    assert len(out.token_ids) == 256 - 250 and out.finish_reason == "length"


def test_stop_strings_end_the_text_without_leaking(tiny):
    prompt = [400, 401]
    free_text = tiny.generate([prompt], GREEDY)[0].outputs[0].text
    stop = free_text.strip()[3:7]
    assert stop and stop in free_text
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    out = tiny.generate([prompt], params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free_text[: free_text.index(stop)]


def test_logprobs_are_returned_per_token(tiny):
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = tiny.generate([[9, 10, 11]], params)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token_id, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token_id and len(lp.top) == 3
        assert lp.logprob == max(lp.top.values())  # greedy picks the most likely


def test_seeded_sampling_repeats(tiny):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=42, ignore_eos=True)
    first = tiny.generate([[20, 21]], params)[0].outputs[0].token_ids
    again = tiny.generate([[20, 21], [30, 31], [40]], params)[0].outputs[0].token_ids
    assert first == again


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        ([], "empty"),
        ([1, 2, 10**9], "token ids"),
        ([1, -5], "token ids"),
        (list(range(1, 300)), "maximum context length is 256 tokens.*299 input tokens"),
    ],
)
def test_bad_prompts_raise_and_the_engine_keeps_serving(tiny, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate([[1, 2, 3], prompt], GREEDY)
    assert not tiny.engine.has_unfinished_requests()
    check_all_free(tiny.engine.kv)
    assert len(tiny.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids) == 12


def test_a_logit_bias_outside_the_vocabulary_is_refused_before_anything_runs(tiny):
    vocab = tiny.engine.model_config.vocab_size
    params = SamplingParams(max_tokens=3, logit_bias={vocab: 5.0})
    with pytest.raises(ValueError, match=rf"logit_bias keys must be token ids in \[0, {vocab}\)"):
        tiny.generate([[1, 2, 3], [4, 5]], [GREEDY, params])
    assert not tiny.engine.has_unfinished_requests()
    check_all_free(tiny.engine.kv)


def test_abort_frees_blocks_mid_generation(tiny):
    engine = tiny.engine
    engine.add_request("keep", *engine.admission.admit([[1, 2, 3]], GREEDY))
    engine.add_request(
        "drop",
        *engine.admission.admit(
            [list(range(1, 60))], SamplingParams(max_tokens=200, ignore_eos=True)
        ),
    )
    for _ in range(3):
        engine.step()
    engine.abort_request("drop")
    check_kv_consistent(engine.kv, engine.scheduler)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.take_output("drop").outputs[0].finish_reason == "abort"
    assert engine.take_output("keep").outputs[0].finish_reason == "length"
    check_all_free(engine.kv)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLMEngine(EngineConfig(**pinned(model="/nonexistent/model.gguf")))
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        LLMEngine(EngineConfig(**pinned(model="/tmp")))
    with pytest.raises(ModelNotFoundError, match="not the built-in"):
        LLMEngine(EngineConfig(**pinned(model="no-such-model")))


def test_unreachable_hub_names_the_model_and_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        LLMEngine(EngineConfig(**pinned(model="meta-llama/Llama-3.1-8B-Instruct")))
    message = str(info.value)
    assert "\n" not in message
    assert "meta-llama/Llama-3.1-8B-Instruct" in message and "HF_HOME" in message


def test_max_model_len_larger_than_the_pool_fails_with_both_numbers(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_model_len 512 .*\(8 blocks x 16 = 128 tokens\)"):
        LLM(**pinned(model=str(tiny_model_dir("mha-tied")), num_kv_blocks=8))


def test_n_sequences_compute_their_prompt_once_and_draw_as_without_sharing(tiny_model_dir):
    prompt = [(7 * i) % 300 + 1 for i in range(100)]  # 6 full blocks of 16, then 4 tokens
    params = SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    outputs = {}
    for caching in (True, False):
        llm = LLM(
            **pinned(
                model=str(tiny_model_dir("mha-tied")),
                max_model_len=256,
                num_kv_blocks=64,
                enable_prefix_caching=caching,
            ),
        )
        out = llm.generate([prompt], params)[0]
        outputs[caching] = [o.token_ids for o in out.outputs]
        computed = llm.engine.scheduler.num_computed_tokens - 4 * 5  # less the decodes
        # shared: the leader's 100, then each sibling's last 4 (its 96 come from the cache)
        assert computed == (100 + 3 * 4 if caching else 4 * 100)
        assert out.num_cached_tokens == 0  # the group reports its first sequence's hits
        check_all_free(llm.engine.kv)
    assert outputs[True] == outputs[False]
    assert len({tuple(tokens) for tokens in outputs[True]}) > 1


def test_an_aborted_leader_releases_its_waiting_siblings(tiny_model_dir):
    llm = LLM(
        **pinned(
            model=str(tiny_model_dir("mha-tied")),
            max_model_len=256,
            num_kv_blocks=64,
            max_num_batched_tokens=32,
        ),
    )
    engine, prompt = llm.engine, list(range(1, 101))  # a prefill of four steps
    engine.add_request(
        "g", *engine.admission.admit([prompt], SamplingParams(n=3, max_tokens=2, ignore_eos=True))
    )
    engine.step()
    assert [r.sequence_id for r in engine.scheduler.waiting] == ["g#1", "g#2"]
    leader = engine.scheduler.running[0]
    engine.scheduler.abort(leader)
    for _ in range(20):
        engine.step()
    assert not engine.has_unfinished_requests()  # nobody waits for the aborted leader
    out = engine.take_output("g")
    assert [o.finish_reason for o in out.outputs] == ["abort", "length", "length"]
    check_all_free(engine.kv)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=workload,
    num_kv_blocks=st.integers(8, 30),
    budget=st.integers(1, 64),
    prefix_caching=st.booleans(),
)
@pytest.mark.parametrize("engine_settings", ENGINE_SETTINGS)
def test_random_workloads_on_the_real_engine(
    model_for, engine_settings, requests, num_kv_blocks, budget, prefix_caching
):
    directory, settings = model_for(engine_settings, "mha-tied")
    engine = LLMEngine(
        EngineConfig(
            **settings,
            model=directory,
            max_model_len=128,
            num_kv_blocks=num_kv_blocks,
            max_num_batched_tokens=budget,
            max_num_seqs=6,
            enable_prefix_caching=prefix_caching,
        )
    )
    run_workload(engine, requests)


def test_vllms_offline_call_runs_unchanged(tiny_model_dir, tmp_path):
    from kubellm.runtime import LLM as VLLMStyleLLM  # as `from vllm import LLM` would

    llm = VLLMStyleLLM(
        model=str(tiny_model_dir("mha-tied")),
        trust_remote_code=True,
        dtype="auto",
        download_dir=str(tmp_path),
        tokenizer_mode="auto",
        quantization=None,
        enforce_eager=False,
        enable_prefix_caching=True,
        block_size=16,
        max_model_len=256,
        kv_cache_memory_gib=0.01,
    )
    params = SamplingParams(temperature=0.0, max_tokens=6, skip_special_tokens=True)
    as_ids = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    tokens_prompt = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0]
    assert tokens_prompt.outputs[0].token_ids == as_ids
    text_prompt = llm.generate({"prompt": "Hello"}, params)[0]
    assert text_prompt.outputs[0].text == llm.generate("Hello", params)[0].outputs[0].text
    with pytest.raises(ValueError, match="'prompt' \\(text\\) or 'prompt_token_ids'"):
        llm.generate([{"prompt_ids": [1]}], params)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"quantization": "fp8"}, "quantization must be one of none, gptq, awq, gguf"),
        ({"tokenizer_mode": "slow"}, "tokenizer_mode must be one of auto"),
        ({"swap_space": 4}, "swap_space 4 is not supported"),
        ({"dtype": "float64"}, "dtype must be one of auto, float32, float16, bfloat16"),
    ],
)
def test_vllm_settings_kubellm_does_not_have_are_refused_saying_why(setting, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**pinned(**setting))
