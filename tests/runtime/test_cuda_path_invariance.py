"""The CUDA platform's path, its Triton kernels run on CPU by Triton's interpreter: a
greedy request's tokens do not depend on what shares its steps, on prefix hits, on
7-token prefill chunks nor on preemption.

The model is a GPTQ checkpoint (its 4-bit layers and its dense head both through the
Triton GEMM) with Triton's paged attention: every product and attention call a GPU runs.
In fp32, where any change of a row's summation order shows in the logprobs compared
(torch's product for the head, as cuBLAS would be on a GPU, fails here in fp32; in fp16
it passes on CPU). Only the platform's choice is replaced (`choose_platform` picks this
platform for a GPU); the engine and every kernel are the real ones. Its vocabulary is 256
ids, so the head is four column tiles for the interpreter, not 768. On a GPU,
`test_batch_invariance`'s cuda test checks the device's own defaults."""

from __future__ import annotations

import pytest
import torch

from kubellm.kernels.gemm import dense_gemm
from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.core import engine
from kubellm.runtime.executor.platform.cuda import CudaPlatform, TritonQuantizedProduct
from tests.runtime.quantized_checkpoints import act_order_gptq

VOCABULARY = 256
# with logprobs: a logit's bits, not only the greedy choice, must not move
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
PROMPTS = [
    [*range(40, 60), 7, 8, 9],
    [11, 12, 13, 14, 15],
    [*range(40, 60), 70, 71, 72, 73, 74, 75, 76, 77, 78],  # shares the first's first block
    [200 - i for i in range(30)],
    [5, 6],
    [*range(100, 121)],
]
VARIANTS = {
    "together": {},
    "prefill-chunk-7": {"max_num_batched_tokens": 7},
    "forced-preemption": {"num_kv_blocks": 8},
}


@pytest.fixture(scope="module")
def small_vocabulary_gptq(tmp_path_factory, smollm2) -> str:
    directory = tmp_path_factory.mktemp("tiny-gptq-256")
    return str(act_order_gptq(smollm2.tokenizer, directory, False, False, VOCABULARY))


def _llm(model: str, **settings) -> LLM:
    """An engine on the CUDA platform, on CPU (eager: graphs need a GPU)."""
    platform = CudaPlatform(torch.device("cpu"), torch.float32, "triton", torch.float32)
    base = dict(device="cpu", dtype="float32", block_size=16, max_model_len=128)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "choose_platform", lambda config, quantized=False: platform)
        llm = LLM(model=model, enforce_eager=True, **{**base, **settings})
    model = llm.engine.runner.model
    assert model.lm_head.dense_product is dense_gemm
    assert isinstance(model.layers[0].mlp.down_proj.weight.product, TritonQuantizedProduct)
    return llm


@pytest.fixture(scope="module")
def alone(small_vocabulary_gptq) -> list[tuple]:
    llm = _llm(small_vocabulary_gptq, enable_prefix_caching=False, num_kv_blocks=16)
    return [_tokens_and_logprobs(llm.generate([p], GREEDY)[0]) for p in PROMPTS]


def _tokens_and_logprobs(output) -> tuple:
    return output.outputs[0].token_ids, output.outputs[0].logprobs


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokens_on_the_cuda_path_match_the_request_run_alone(variant, small_vocabulary_gptq, alone):
    llm = _llm(small_vocabulary_gptq, **{"num_kv_blocks": 32, **VARIANTS[variant]})
    llm.generate(PROMPTS[:1], GREEDY)  # its blocks are found by the first and third below
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [_tokens_and_logprobs(o) for o in outputs] == alone
    assert llm.engine.kv.prefix_hits > 0
    if variant == "forced-preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
