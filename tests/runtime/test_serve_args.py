"""`kubellm serve` and `kubellm generate` flags and their KUBELLM_* environment variables,
read there and nowhere below."""

from __future__ import annotations

import pytest
import torch

from kubellm.kernels import cpu_library
from kubellm.runtime.executor.platform.choice import resolve_device
from kubellm.runtime.serve import parse_args


def test_environment_sets_flags_and_flags_win():
    env = {
        "KUBELLM_MAX_NUM_SEQS": "8",
        "KUBELLM_ENABLE_PREFIX_CACHING": "false",
        "KUBELLM_API_KEY": "k",
        "KUBELLM_PORT": "9000",
        "KUBELLM_DEVICE": "cpu",
    }
    args = parse_args(["--port", "9100"], env)
    assert args.max_num_seqs == 8 and args.enable_prefix_caching is False
    assert args.api_key == "k" and args.port == 9100 and args.device == "cpu"


def test_the_library_reads_no_environment(monkeypatch, quantized_tiny_dir):
    """Settings enter through the entry points' flags only: below them, the variables of
    `kubellm serve` steer nothing (a program's own engine gets what it asks for)."""
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.executor.platform import choose_platform
    from kubellm.runtime.model.source import resolve

    clean = choose_platform(EngineConfig(device="cpu"))
    packed = resolve(str(quantized_tiny_dir))
    env = {"KUBELLM_DEVICE": "cuda", "KUBELLM_DTYPE": "float16", "KUBELLM_QUANTIZATION": "none"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert choose_platform(EngineConfig(device="cpu")) == clean
    assert resolve(str(quantized_tiny_dir)).keep_packed == packed.keep_packed is True


def test_a_flag_wins_over_its_variable_all_the_way_to_the_platform(monkeypatch):
    """`KUBELLM_DTYPE=float32 kubellm serve --dtype bfloat16` runs bfloat16, and
    `--dtype auto` runs what auto chooses, whatever the variable says."""
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine_flags import engine_config
    from kubellm.runtime.executor.platform import choose_platform

    monkeypatch.setenv("KUBELLM_DTYPE", "float32")
    environ = {"KUBELLM_DTYPE": "float32", "KUBELLM_DEVICE": "cpu"}
    named = engine_config(parse_args(["--dtype", "bfloat16"], environ))
    assert choose_platform(named).dtype == torch.bfloat16
    auto = choose_platform(engine_config(parse_args(["--dtype", "auto"], environ)))
    assert auto.dtype == choose_platform(EngineConfig(device="cpu", dtype="auto")).dtype
    assert engine_config(parse_args([], environ)).dtype == "float32"  # the variable, unflagged


def test_kubellm_generate_takes_the_engine_flags_and_their_variables():
    from kubellm.runtime.generate_cli import parse_args as generate_args

    environ = {"KUBELLM_DTYPE": "float32", "KUBELLM_MAX_NUM_SEQS": "4"}
    args = generate_args(["--dtype", "bfloat16", "Hello"], environ)
    assert (args.dtype, args.max_num_seqs, args.prompts) == ("bfloat16", 4, ["Hello"])


def test_defaults_without_environment():
    args = parse_args([], {})
    assert args.port == 8000 and args.model == "smollm2-135m-instruct" and args.api_key is None


def test_dtype_auto_is_bf16_only_on_cpus_with_fast_bf16(monkeypatch):
    from kubellm.runtime.executor.platform import choice

    cpu = torch.device("cpu")
    for flags, expected in (
        ({"avx2", "fma"}, torch.float32),
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"amx_tile", "amx_bf16"}, torch.bfloat16),
    ):
        monkeypatch.setattr(choice, "cpu_flags", lambda flags=flags: flags)
        assert choice.resolve_dtype("auto", cpu) == expected
        if cpu_library.unavailable() is not None:
            assert choice.resolve_dtype("auto", cpu, stays_quantized=True) == expected
        else:  # quantized weights: the C kernels with fp32 activations
            assert choice.resolve_dtype("auto", cpu, stays_quantized=True) == torch.float32
    assert choice.resolve_dtype("float32", cpu) == torch.float32  # a named dtype wins


def test_tool_call_parser_flags_and_variables_and_vllms_switch_is_accepted():
    args = parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], {})
    assert args.tool_call_parser == "hermes"
    assert parse_args([], {}).tool_call_parser is None  # inferred at load
    env = {"KUBELLM_ENABLE_AUTO_TOOL_CHOICE": "true", "KUBELLM_TOOL_CALL_PARSER": "llama3_json"}
    assert parse_args([], env).tool_call_parser == "llama3_json"
    assert parse_args(["--tool-call-parser", "mistral"], env).tool_call_parser == "mistral"


def test_quantized_kernels_unless_fp32_is_asked_for_by_name():
    from kubellm.runtime.executor.platform.choice import uses_quantized_kernels

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_quantized_kernels("auto", torch.float32, cpu)  # auto chose fp32: kernel, fast
    assert uses_quantized_kernels("bfloat16", torch.bfloat16, cpu)
    assert not uses_quantized_kernels("float32", torch.float32, cpu)  # exact, as asked
    assert not uses_quantized_kernels("auto", torch.bfloat16, cuda)


@pytest.mark.skipif(cpu_library.unavailable() is not None, reason="needs kubellm's CPU library")
def test_the_x86_platform_has_the_cpu_backend_and_c_ops_for_fp32_only():
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.executor.platform import choose_platform
    from kubellm.runtime.executor.platform.x86 import CpuOps

    fp32 = choose_platform(EngineConfig(device="cpu", dtype="float32"))
    assert fp32.name == "x86" and fp32.attention_backend == "cpu"
    assert isinstance(fp32.layer_ops(), CpuOps) and fp32.quantized_kernel is None  # exact
    bf16 = choose_platform(EngineConfig(device="cpu", dtype="bfloat16"))
    assert not isinstance(bf16.layer_ops(), CpuOps) and bf16.attention_backend == "torch"
    assert bf16.quantized_kernel == "qgemm"
    named = EngineConfig(device="cpu", dtype="float32", attention_backend="torch")
    asked = choose_platform(named)
    assert isinstance(asked.layer_ops(), CpuOps)
    assert asked.attention_backend == "torch"  # a named backend wins
    with pytest.raises(ValueError, match="attention_backend cpu runs float32 on a CPU"):
        choose_platform(EngineConfig(device="cpu", dtype="bfloat16", attention_backend="cpu"))


@pytest.mark.skipif(cpu_library.unavailable() is not None, reason="needs kubellm's CPU library")
def test_the_kv_cache_is_fp16_on_the_default_cpu_path_only():
    """fp32 that auto chose on the cpu backend: an fp16 KV cache; fp32 asked for by name,
    or torch's backend, keep it in the model's dtype."""
    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.executor.platform import choose_platform

    auto = choose_platform(EngineConfig(device="cpu"), stays_quantized=True)
    if auto.dtype == torch.float32:  # a CPU without AMX
        assert auto.attention_backend == "cpu" and auto.kv_dtype == torch.float16
    else:
        assert auto.kv_dtype == auto.dtype
    named = choose_platform(EngineConfig(device="cpu", dtype="float32"))
    assert named.attention_backend == "cpu" and named.kv_dtype == torch.float32
    torch_backend = EngineConfig(device="cpu", attention_backend="torch")
    assert choose_platform(torch_backend, stays_quantized=True).kv_dtype == auto.dtype
