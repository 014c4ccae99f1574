"""Quantized weights: each format's unpacking against its own definition (GGUF blocks
against `gguf.quants.dequantize`; GPTQ and AWQ against their formulas, on real
checkpoints made by auto-round and an act-order one written from the definition), and
the engine on the quantized path against an fp32 oracle: the same model with the
dequantized weights as a dense fp32 checkpoint, run by our engine and by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from safetensors import safe_open

from kubellm.kernels import cpu_library
from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.executor.platform.cpu_products import (
    QGEMM_MAX_ROWS,
    Int4PackProduct,
    QgemmProduct,
    cpu_product,
)
from kubellm.runtime.model.dense import linear
from kubellm.runtime.model.quant_formats import (
    AWQ_ORDER,
    HFQuantization,
    from_awq,
    from_gguf_blocks,
    from_gptq,
)
from kubellm.runtime.model.quantized import QuantizedWeight, resident_bytes
from kubellm.runtime.model.source import builtin_gguf_path
from tests.runtime.conftest import hf_greedy
from tests.runtime.quantized_checkpoints import act_order_gptq, auto_round, dense_twin

from .pins import defaults, pinned

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
    "Water boils at",
    "The quick brown fox",
    "SELECT * FROM",
    "In 1492, Columbus",
]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_equal_gguf_dequantize(kind):
    kind_type = GGMLQuantizationType[kind]
    weights = np.random.default_rng(0).normal(0, 0.05, (48, 256)).astype(np.float32)
    blocks = quantize(weights, kind_type)
    ours = from_gguf_blocks(blocks, kind, rows=48).dequantize()
    assert torch.equal(ours, torch.from_numpy(dequantize(blocks, kind_type)))


def test_gguf_q4_k_super_blocks_equal_gguf_dequantize():
    """gguf.quants cannot write Q4_K: random blocks with sane fp16 d and dmin."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (16 * 2, 144), dtype=np.uint8)  # 16 rows of 512
    blocks[:, 0:2] = np.full((len(blocks), 1), 0.01, np.float16).view(np.uint8)
    blocks[:, 2:4] = rng.uniform(0, 0.02, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    ours = from_gguf_blocks(blocks.reshape(16, -1), "Q4_K", rows=16).dequantize()
    theirs = dequantize(blocks.reshape(16, -1), GGMLQuantizationType.Q4_K)
    assert torch.equal(ours, torch.from_numpy(theirs))


def test_the_builtin_files_blocks_equal_gguf_dequantize():
    reader = GGUFReader(str(builtin_gguf_path()))
    for name in ("blk.3.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight"):
        tensor = next(t for t in reader.tensors if t.name == name)
        rows = int(tensor.shape[-1])
        ours = from_gguf_blocks(tensor.data, tensor.tensor_type.name, rows).dequantize()
        theirs = dequantize(tensor.data, tensor.tensor_type).reshape(rows, -1)
        assert torch.equal(ours, torch.from_numpy(theirs)), name


# --- GPTQ and AWQ, from their definitions (REFERENCE.md, "Quantized weight layouts") ---


def gptq_definition(parts: dict[str, np.ndarray], zeros_minus_one: bool) -> np.ndarray:
    """W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]; qweight row 8r + j at bits
    4j, qzeros column 8c + j at bits 4j (v1 stores z - 1)."""
    qweight, qzeros = parts["qweight"].view(np.uint32), parts["qzeros"].view(np.uint32)
    k, n = np.arange(qweight.shape[0] * 8)[:, None], np.arange(qweight.shape[1])[None, :]
    q = (qweight[k // 8, n] >> (4 * (k % 8))) & 15
    g = parts["g_idx"][:, None]
    z = ((qzeros[g, n // 8] >> (4 * (n % 8))) & 15) + int(zeros_minus_one)
    w = (q.astype(np.float32) - z) * parts["scales"].astype(np.float32)[g, n]
    return w.T  # [N, K]


def awq_definition(parts: dict[str, np.ndarray]) -> np.ndarray:
    """W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]; column 8c + ORDER[i] at bits 4i."""
    qweight, qzeros = parts["qweight"].view(np.uint32), parts["qzeros"].view(np.uint32)
    nibble = np.argsort(AWQ_ORDER)  # where column j of a word sits
    k, n = np.arange(qweight.shape[0])[:, None], np.arange(qweight.shape[1] * 8)[None, :]
    group = qweight.shape[0] // parts["scales"].shape[0]
    q = (qweight[k, n // 8] >> (4 * nibble[n % 8])) & 15
    z = (qzeros[k // group, n // 8] >> (4 * nibble[n % 8])) & 15
    return ((q.astype(np.float32) - z) * parts["scales"].astype(np.float32)[k // group, n]).T


def _read(directory) -> dict[str, dict[str, torch.Tensor]]:
    """Module -> its quantized tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                module, _, kind = key.rpartition(".")
                if kind in ("qweight", "qzeros", "scales", "g_idx"):
                    modules.setdefault(module, {})[kind] = f.get_tensor(key)
    return modules


def _config(directory) -> HFQuantization:
    import json

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    return HFQuantization.from_config(config, str(directory))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, smollm2):
    """name -> (quantized directory, its dense twin, method)."""
    tokenizer = smollm2.engine.tokenizer
    root = tmp_path_factory.mktemp("quantized")
    made = {
        "gptq-sym": auto_round(tokenizer, root / "gptq-sym", "auto_gptq", sym=True),
        "gptq-asym": auto_round(tokenizer, root / "gptq-asym", "auto_gptq", sym=False),
        "awq": auto_round(tokenizer, root / "awq", "auto_awq", sym=False),
        "gptq-act-order": act_order_gptq(tokenizer, root / "gptq-act-order"),
        "gptq-v2-act-order": act_order_gptq(tokenizer, root / "gptq-v2", v2=True),
    }
    out = {}
    for name, directory in made.items():
        q = _config(directory)
        convert = from_gptq if q.method == "gptq" else from_awq
        dense = {
            module: convert(parts, q).dequantize() for module, parts in _read(directory).items()
        }
        out[name] = (directory, dense_twin(directory, root / f"{name}-dense", dense), q.method)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["gptq-sym", "gptq-asym", "awq", "gptq-act-order", "gptq-v2-act-order"]
)
def test_gptq_and_awq_unpacking_equals_the_definition(checkpoints, name):
    directory, _, method = checkpoints[name]
    q = _config(directory)
    for module, parts in _read(directory).items():
        arrays = {kind: tensor.numpy() for kind, tensor in parts.items()}
        if method == "awq":
            expected = awq_definition(arrays)
            ours = from_awq(parts, q).dequantize()
        else:
            arrays.setdefault("g_idx", np.arange(arrays["qweight"].shape[0] * 8) // q.group_size)
            expected = gptq_definition(arrays, q.zeros_minus_one)
            ours = from_gptq(parts, q).dequantize()
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected))), module


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_group_sizes_and_formats_equal_the_definition(group_size, v2):
    """Groups of 32, 64 and 128 inputs and one group per row (-1), in input order."""
    from tests.runtime.quantized_checkpoints import quantize_gptq

    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    group = 256 if group_size == -1 else group_size
    parts = quantize_gptq("m", weight, torch.arange(256), v2, group)
    parts = {name.removeprefix("m."): tensor for name, tensor in parts.items()}
    q = HFQuantization("gptq", group_size, zeros_minus_one=not v2)
    ours = from_gptq(parts, q)
    assert ours.perm is None and ours.group_size == group  # in order: no permutation
    expected = gptq_definition({k: t.numpy() for k, t in parts.items()}, not v2)
    assert torch.equal(ours.dequantize(), torch.from_numpy(np.ascontiguousarray(expected)))
    assert (ours.dequantize() - weight).norm() / weight.norm() < 0.15


@pytest.mark.slow
def test_auto_rounds_checkpoints_are_close_to_the_weights_they_quantized(checkpoints, smollm2):
    """The semantics, not just the bit layout: dequantized ~ the random model's weights."""
    from tests.runtime.quantized_checkpoints import random_llama

    original = random_llama(smollm2.engine.tokenizer).state_dict()
    for name in ("gptq-sym", "gptq-asym", "awq", "gptq-act-order"):
        _, dense_dir, _ = checkpoints[name]
        with safe_open(str(dense_dir / "model.safetensors"), framework="pt") as f:
            for key in [k for k in f.keys() if "layers" in k and k.endswith("proj.weight")]:  # noqa: SIM118
                error = (f.get_tensor(key) - original[key]).norm() / original[key].norm()
                assert error < 0.12, (name, key, float(error))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gptq-sym", "gptq-asym", "awq", "gptq-act-order"])
def test_quantized_engine_equals_the_dense_oracles(checkpoints, name):
    """fp32 activations: the quantized path (weights kept packed) gives the greedy tokens
    of the dequantized dense checkpoint, in our engine and in transformers."""
    from transformers import AutoModelForCausalLM

    directory, dense_dir, method = checkpoints[name]
    packed = LLM(**pinned(model=str(directory), quantization=method, kv_cache_memory_gib=0.1))
    layers = [m for m in packed.engine.runner.model.modules() if isinstance(m, QuantizedWeight)]
    assert len(layers) == 4 * 2  # qkv, o, gate_up, down in each of the two layers
    dense = LLM(**pinned(model=str(dense_dir), kv_cache_memory_gib=0.1))
    oracle = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    tokenizer = dense.engine.tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ours = [o.outputs[0].token_ids for o in packed.generate(prompts, GREEDY)]
    assert ours == [o.outputs[0].token_ids for o in dense.generate(prompts, GREEDY)]
    assert ours == [hf_greedy(oracle, p, 32) for p in prompts]
    packed.shutdown()
    dense.shutdown()


@pytest.mark.slow
def test_the_builtin_q4_1_kept_packed_gives_the_dense_tokens(smollm2):
    """fp32 activations: the built-in file's blocks kept packed = dequantized at load."""
    from tests.runtime.test_parity import GREEDY_32
    from tests.runtime.test_parity import PROMPTS as PARITY_PROMPTS

    prompts = [smollm2.tokenizer.encode(p) for p in PARITY_PROMPTS]
    dense = [o.outputs[0].token_ids for o in smollm2.generate(prompts, GREEDY_32)]
    with LLM(
        **pinned(quantization="gguf", max_num_batched_tokens=64, kv_cache_memory_gib=0.5)
    ) as packed:
        layers = [m for m in packed.engine.runner.model.modules() if isinstance(m, QuantizedWeight)]
        assert len(layers) == 4 * 30 and {m.layout.bits for m in layers} == {4}
        assert [o.outputs[0].token_ids for o in packed.generate(prompts, GREEDY_32)] == dense


def _layer(rows: int = 64, cols: int = 128, seed: int = 0):
    """A loaded QuantizedWeight and its weight as the format defines it."""
    from kubellm.runtime.model.quant_formats import from_gguf_blocks
    from kubellm.runtime.model.quantized import QuantizedLayout

    weights = np.random.default_rng(seed).normal(0, 0.05, (rows, cols)).astype(np.float32)
    blocks = quantize(weights, GGMLQuantizationType.Q4_1)
    value = from_gguf_blocks(blocks, "Q4_1", rows)
    layer = QuantizedWeight(rows, cols, QuantizedLayout(4, 32))
    layer.put(0, value)
    return layer, value.dequantize()


def test_resident_bytes_count_every_kept_tensor_and_each_storage_once():
    """What the runner logs as its weights' bytes: a quantized layer's packed storage, a
    dense layer's weight and bias, and a tied weight once."""
    quantized, _ = _layer()
    kernel = "qgemm" if cpu_library.unavailable() is None else "int4pack"
    quantized.use(cpu_product(quantized, kernel, torch.float32))
    dense = torch.nn.Linear(128, 64)
    tied = torch.nn.Linear(128, 64, bias=False)
    tied.weight = dense.weight
    model = torch.nn.ModuleList([quantized, dense, tied])
    kept = sum(t.untyped_storage().nbytes() for t in quantized.held_tensors())
    assert kept < 64 * 128 * 4 / 4  # packed: under a quarter of the fp32 weight
    assert resident_bytes(model) == kept + (64 * 128 + 64) * 4


def test_torch_int4_kernel_gives_a_row_the_same_bits_in_any_product():
    """torch's int4 kernel, which the fallback runs at every batch size, multiplies by
    the weight's definition, and a row's result does not depend on how many rows share
    the product (what keeps a token's bits independent of its step on that path)."""
    layer, weight = _layer()
    layer.use(cpu_product(layer, "int4pack", torch.float32))
    assert isinstance(layer.product, Int4PackProduct)
    assert layer.codes.numel() == 0  # one copy of the codes
    x = torch.randn(300, 128).bfloat16()
    whole = layer(x)
    assert torch.allclose(whole.float(), x.float() @ weight.T, rtol=0.02, atol=0.01)
    for rows in (1, 2, 7, 64, 65, 129, 299):
        assert torch.equal(layer(x[:rows]), whole[:rows]), rows
    assert torch.equal(layer(x[150:151]), whole[150:151])


@pytest.mark.skipif(
    cpu_library.unavailable() is not None, reason="needs AVX2, FMA, F16C and a C compiler"
)
@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
def test_kubellm_cpu_kernel_and_the_dense_product_multiply_by_the_same_weight(dense_dtype):
    """With fp32 dense products (no fast bf16) every product goes through kubellm's CPU
    kernel, and a row's result is the same alone, in a small batch or a large one; with
    bf16 ones, products above QGEMM_MAX_ROWS rows take the dense product rebuilt from the
    same codes and fp16 scales, which agrees with the kernel and the definition. The codes
    are kept once, in the checkpoint's layout."""
    layer, weight = _layer()
    codes = layer.codes.clone()
    layer.use(cpu_product(layer, "qgemm", dense_dtype))
    assert isinstance(layer.product, QgemmProduct) and layer.scales.numel() == 0
    assert torch.equal(layer.product.codes, codes) and layer.codes.numel() == 0
    x = torch.randn(QGEMM_MAX_ROWS + 1, 128)
    small = layer(x[:QGEMM_MAX_ROWS])  # the kernel
    large = layer(x)  # the kernel with fp32 dense products, else the dense product
    reference = x @ weight.T
    tolerance = dict(rtol=0.02, atol=0.02 * reference.abs().max().item())
    if dense_dtype == torch.float32:
        assert torch.equal(small, large[:QGEMM_MAX_ROWS])
        assert torch.equal(layer(x[5:6]), large[5:6])  # alone: the same bits
    else:
        torch.testing.assert_close(small, large[:QGEMM_MAX_ROWS], **tolerance)
    torch.testing.assert_close(large, reference, **tolerance)


def test_fp32_products_are_the_definitions_weight_exactly():
    layer, weight = _layer()
    x = torch.randn(5, 128)
    assert layer.product is None
    assert torch.equal(layer(x), linear(x, weight))  # the same product, on the same weight


@pytest.mark.slow
def test_quantized_weights_take_a_quarter_of_bf16(checkpoints):
    """Measured in the runner: the linear layers' bytes, packed vs dense bf16."""

    def linear_bytes(llm: LLM) -> int:
        total = 0
        for module in llm.engine.runner.model.modules():
            if isinstance(module, QuantizedWeight):
                tensors = module.held_tensors()
                total += sum(t.numel() * t.element_size() for t in tensors)
            elif type(module).__name__.endswith("ParallelLinear") and isinstance(
                module.weight, torch.nn.Parameter
            ):
                total += module.weight.numel() * module.weight.element_size()
        return total

    directory, dense_dir, method = checkpoints["gptq-asym"]
    with LLM(**pinned(model=str(directory), quantization=method, dtype="bfloat16")) as packed:
        packed_bytes = linear_bytes(packed)
    with LLM(**pinned(model=str(dense_dir), dtype="bfloat16")) as dense:
        dense_bytes = linear_bytes(dense)
    ratio = packed_bytes / dense_bytes
    assert ratio < 0.33, ratio  # 4 of 16 bits, and a bf16 scale and zero per 32 weights


@pytest.mark.slow
def test_tensor_parallel_shards_quantized_weights(checkpoints):
    """Column shards by rows, row shards by whole groups; act-order cannot be split."""
    directory, _, method = checkpoints["gptq-asym"]
    prompts = [[(7 * i + j) % 3000 + 100 for j in range(9 + 5 * i)] for i in range(4)]
    with LLM(
        **pinned(model=str(directory), quantization=method, kv_cache_memory_gib=0.1)
    ) as single:
        expected = [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY)]
    with LLM(
        **pinned(
            model=str(directory),
            quantization=method,
            tensor_parallel_size=2,
            kv_cache_memory_gib=0.1,
        )
    ) as split:
        assert [o.outputs[0].token_ids for o in split.generate(prompts, GREEDY)] == expected
    act_order, _, _ = checkpoints["gptq-act-order"]
    with pytest.raises(ValueError, match=r"act-order .* cannot be split along its inputs"):
        LLM(**pinned(model=str(act_order), quantization="gptq", tensor_parallel_size=2))


def _with_config(directory, tmp_path, change) -> str:
    """A copy of the checkpoint whose config.json's quantization_config `change` edits."""
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    change(config["quantization_config"])
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda q: q.update(quant_method="fp8"), "quant_method 'fp8' is not read by kubellm"),
        (lambda q: q.update(bits=8), "gptq with 8 bits is not read by kubellm"),
        (
            lambda q: q.update(group_size=48),
            "group_size 48 does not divide the model's hidden_size 64",
        ),
    ],
)
def test_a_checkpoint_kubellm_does_not_read_is_refused_saying_why(
    checkpoints, tmp_path, change, needle
):
    directory, _, _ = checkpoints["gptq-asym"]
    with pytest.raises(ValueError, match=needle):
        LLM(**pinned(model=_with_config(directory, tmp_path, change), quantization="gptq"))


@pytest.mark.slow
def test_missing_tensors_and_wrong_methods_are_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, dense_dir, _ = checkpoints["awq"]
    with pytest.raises(ValueError, match=r"--quantization gptq, but the model .* is awq-quantized"):
        LLM(**pinned(model=str(directory), quantization="gptq"))
    with pytest.raises(ValueError, match=r"is not quantized .* drop --quantization"):
        LLM(**pinned(model=str(dense_dir), quantization="gptq"))
    copy = tmp_path / "missing"
    import shutil

    shutil.copytree(directory, copy)
    file = next(copy.glob("*.safetensors"))
    state = load_file(str(file))
    del state["model.layers.1.mlp.up_proj.qzeros"]
    save_file(state, str(file))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj has .* but no qzeros"):
        LLM(**pinned(model=str(copy), quantization="awq"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_engine_on_a_gpu_matches_the_dense_oracle(checkpoints, dtype):
    """The Triton W4A16 path: fp32 gives the dense fp32 tokens; bf16 mostly does."""
    directory, dense_dir, method = checkpoints["gptq-asym"]
    prompts = [[(7 * i + j) % 3000 + 100 for j in range(9 + 5 * i)] for i in range(4)]
    with LLM(**pinned(model=str(dense_dir), device="cpu", kv_cache_memory_gib=0.1)) as dense:
        expected = [o.outputs[0].token_ids for o in dense.generate(prompts, GREEDY)]
    with LLM(
        **pinned(
            model=str(directory),
            quantization=method,
            device="cuda",
            dtype=dtype,
            gpu_memory_utilization=0.3,
        ),
    ) as packed:
        got = [o.outputs[0].token_ids for o in packed.generate(prompts, GREEDY)]
    same = sum(a == b for x, y in zip(got, expected) for a, b in zip(x, y))
    assert same == 4 * 32 if dtype == "float32" else same >= 0.9 * 4 * 32


@pytest.mark.slow
@pytest.mark.skipif(
    cpu_library.unavailable() is not None, reason="needs AVX2, FMA, F16C and a C compiler"
)
def test_the_default_cpu_path_keeps_the_q8_0_vocabulary_packed(smollm2):
    """The defaults on a CPU without fast bf16: the layers and the tied Q8_0 embedding
    stay packed for kubellm's kernel (at tensor-parallel size 3 too, each rank a third
    of the vocabulary); the embedding's rows are the file's exactly, and teacher-forced
    on the dense fp32 engine's greedy replies, the logits pick its token at most
    positions (int8 activations: 272/292 at one rank and 282/292 at three when this
    was written; a wrong code order, scale or vocabulary shard picks ~none)."""
    prompts = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    replies = smollm2.generate(prompts, GREEDY)
    texts = [p + o.outputs[0].token_ids for p, o in zip(prompts, replies)]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    exact = smollm2.generate(texts, params)
    with LLM(**defaults(max_num_batched_tokens=32, kv_cache_memory_gib=0.5)) as fast:
        model = fast.engine.runner.model
        embedding = model.embed_tokens.weight
        assert isinstance(embedding, QuantizedWeight) and embedding.layout.bits == 8
        assert model.lm_head.weight is embedding
        assert isinstance(embedding.product, QgemmProduct)
        assert not embedding.product.has_offsets  # Q8_0 has none: the kernel skips them
        assert model.layers[0].mlp.down_proj.weight.product.has_offsets  # Q4_1's minimums
        token_embd = next(
            t for t in GGUFReader(builtin_gguf_path()).tensors if t.name == "token_embd.weight"
        )
        rows = torch.tensor([0, 1, 500, 49151])
        file_rows = dequantize(token_embd.data, token_embd.tensor_type)[rows.numpy()]
        assert torch.equal(embedding.dense_rows(rows), torch.from_numpy(file_rows))
        agree, positions = _top1_agreement(fast.generate(texts, params), exact)
    assert agree >= 0.85 * positions, (agree, positions)
    with LLM(
        **defaults(max_num_batched_tokens=32, kv_cache_memory_gib=0.5, tensor_parallel_size=3)
    ) as split:
        shard = split.engine.runner.model.embed_tokens
        assert isinstance(shard.weight, QuantizedWeight) and shard.shard.size == 49152 // 3
        agree, positions = _top1_agreement(split.generate(texts, params), exact)
    assert agree >= 0.85 * positions, (agree, positions)


def _top1_agreement(got: list, want: list) -> tuple[int, int]:
    """(prompt positions whose most likely token is the same in both, positions)."""
    positions = agree = 0
    for have, other in zip(got, want):
        for mine, theirs in zip(have.prompt_logprobs[1:], other.prompt_logprobs[1:]):
            positions += 1
            agree += max(mine.top, key=mine.top.get) == max(theirs.top, key=theirs.top.get)
    return agree, positions
