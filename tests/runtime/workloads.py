"""Random engine workloads: arrivals, aborts, shared prefixes, n > 1, prompt logprobs and
seeded sampling, run step by step with the KV bookkeeping checked after every step."""

from __future__ import annotations

from hypothesis import strategies as st

from kubellm.runtime import LLMEngine, SamplingParams
from kubellm.runtime.core.outputs import RequestOutput
from kubellm.runtime.core.structured_output import GrammarSpec

from .invariants import check_all_free, check_kv_consistent

CHOICES = ["alpha beta", "gamma", "delta epsilon zeta"]
CONSTRAINED = GrammarSpec.choice(CHOICES)

workload = st.lists(
    st.tuples(
        st.integers(1, 70),  # prompt length
        st.integers(1, 10),  # max_tokens
        st.integers(0, 5),  # arrival step
        st.one_of(st.none(), st.integers(0, 12)),  # abort step
        st.booleans(),  # shares a prefix
        st.integers(1, 3),  # n
        st.booleans(),  # scores its prompt (prompt_logprobs)
        st.booleans(),  # constrained to one of CHOICES (structured output)
    ),
    min_size=1,
    max_size=10,
)


def run_workload(engine: LLMEngine, requests: list[tuple], tag: str = "r") -> list[RequestOutput]:
    """Run `requests` (drawn from `workload`) to the end; every request finishes, the KV
    cache stays consistent and ends all free. Returns each request's output."""
    shared = list(range(500, 540))
    for step in range(1000):
        for i, (length, max_tokens, arrival, abort_at, share, n, scored, constrained) in enumerate(
            requests
        ):
            if arrival == step:
                prompt = (shared if share else [])[:length] + [600 + i] * max(0, length - 40)
                scoring = 0 if scored else None
                grammar = CONSTRAINED if constrained else None
                params = SamplingParams(
                    n=n,
                    temperature=0.7,
                    seed=i,
                    max_tokens=max_tokens,
                    logprobs=1,
                    prompt_logprobs=scoring,
                    structured_output=grammar,
                )
                engine.add_request(f"{tag}{i}", *engine.admission.admit([prompt or [1]], params))
            if abort_at == step and arrival <= step:
                engine.abort_request(f"{tag}{i}")
        engine.step()
        check_kv_consistent(engine.kv, engine.scheduler)
        if step > 5 and not engine.has_unfinished_requests():
            break
    results = []
    for i, (_, max_tokens, _, _, _, n, scored, constrained) in enumerate(requests):
        result = engine.take_output(f"{tag}{i}")
        outputs = result.outputs
        assert len(outputs) == n
        if scored and outputs[0].finish_reason != "abort":  # every prompt token scored
            assert all(e is not None for e in result.prompt_logprobs[1:])
        for output in outputs:
            assert output.finish_reason in ("stop", "length", "abort")
            assert len(output.token_ids) <= max_tokens
            if constrained:  # one of the choices, or a prefix of one where it was cut
                whole = output.finish_reason == "stop"
                assert any(
                    output.text == c if whole else c.startswith(output.text) for c in CHOICES
                ), output.text
        results.append(result)
    check_all_free(engine.kv)
    return results
