"""Which platform, device, dtype and attention backend a model runs with, chosen once
from the engine's settings and the machine (every tensor-parallel rank chooses the same),
each choice logged with its reason."""

from __future__ import annotations

import logging

import torch

from kubellm.kernels import cpu_library
from kubellm.kernels.cpu_library import cpu_flags
from kubellm.runtime.config import EngineConfig
from kubellm.runtime.executor.platform.base import Platform
from kubellm.runtime.executor.platform.cuda import CudaPlatform
from kubellm.runtime.executor.platform.x86 import X86Platform

logger = logging.getLogger(__name__)

# CPU features whose bf16 matrix multiplies beat fp32 (as vLLM's CPU backend decides)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def choose_platform(config: EngineConfig, stays_quantized: bool = False) -> Platform:
    """`stays_quantized`: the model's weights are kept in a quantized form. Raise
    ValueError when the tensor-parallel size asks for more GPUs than are visible, or the
    attention backend asked for is not the platform's."""
    device = resolve_device(config.device)
    if device.type == "cuda" and config.ranks_per_node > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {config.tensor_parallel_size} x pipeline_parallel_size "
            f"{config.pipeline_parallel_size} over nnodes {config.nnodes} needs "
            f"{config.ranks_per_node} GPUs on each node, but {torch.cuda.device_count()} are "
            f"visible: lower them, add nodes or give the pod more GPUs"
        )
    dtype = resolve_dtype(config.dtype, device, stays_quantized)
    fast_bf16 = has_fast_bf16(device)
    if device.type == "cuda":
        backend = "triton" if config.attention_backend == "auto" else config.attention_backend
        _refuse_cpu_backend(backend, "the device is a GPU")
        return CudaPlatform(device, dtype, backend, dtype, fast_bf16=fast_bf16)
    kernel = None
    if device.type == "cpu":
        reason = cpu_library.unavailable()
        if reason is None:
            return _x86(config, device, dtype, fast_bf16)
        if uses_quantized_kernels(config.dtype, dtype, device):
            kernel = "int4pack"
        if dtype == torch.float32:
            logger.warning("a layer's small ops: torch's, not kubellm's C kernels: %s", reason)
    backend = "torch" if config.attention_backend == "auto" else config.attention_backend
    _refuse_cpu_backend(backend, "kubellm's C kernels cannot be used here (see the log)")
    return Platform(device, dtype, backend, dtype, kernel, fast_bf16)


def _x86(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, fast_bf16: bool
) -> X86Platform:
    fp32 = dtype == torch.float32
    backend = config.attention_backend
    if not fp32:
        _refuse_cpu_backend(backend, f"the dtype is {str(dtype).removeprefix('torch.')}")
    if backend == "auto":
        backend = "cpu" if fp32 else "torch"
    kernel = "qgemm" if uses_quantized_kernels(config.dtype, dtype, device) else None
    kv_dtype = dtype
    if backend == "cpu" and kernel is not None:  # fp32 that auto chose: half the bytes read
        kv_dtype = torch.float16
        logger.info(
            "KV cache: float16 (the cpu attention backend with dtype auto; "
            "--dtype float32 keeps it float32)"
        )
    return X86Platform(device, dtype, backend, kv_dtype, kernel, fast_bf16)


def _refuse_cpu_backend(backend: str, why: str) -> None:
    if backend == "cpu":
        raise ValueError(
            "attention_backend cpu runs float32 on a CPU where kubellm's C kernels can be "
            f"used (AVX2, FMA, F16C and a C compiler), but {why}: choose auto or torch"
        )


def uses_quantized_kernels(asked: str, dtype: torch.dtype, device: torch.device) -> bool:
    """On CPU, a quantized kernel (its inputs rounded: `cpu_products`) does
    quantized layers' small products with bf16 activations, and with fp32 ones that
    `auto` chose; fp32 asked for by name keeps every product exact."""
    if device.type != "cpu":
        return False
    return dtype == torch.bfloat16 or asked == "auto"


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when there is a GPU, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, stays_quantized: bool = False) -> torch.dtype:
    """auto: bfloat16 on GPUs that have it and on CPUs with AVX-512-BF16 or AMX, except weights
    that stay quantized on a CPU where kubellm's C kernels can be used; else float32
    (quantized layers then still multiply through a quantized CPU kernel, see
    `uses_quantized_kernels`). The choice and its reason are logged."""
    if name != "auto":
        return getattr(torch, name)  # one of DTYPES: EngineConfig checked it
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        why = "the GPU has bf16" if fast else "the GPU has no bf16"
    else:
        found = sorted(cpu_flags() & BF16_CPU_FLAGS)
        fast = bool(found)
        why = (
            f"the CPU has {', '.join(found)}"
            if fast
            else "the CPU has neither AVX-512-BF16 nor AMX"
        )
        if fast and stays_quantized and cpu_library.unavailable() is None:
            fast = False  # measured on an AMD Zen 5 and an Intel Xeon with AMX: BENCHMARKS.md
            why = (
                f"quantized weights on a CPU with {', '.join(found)}: kubellm's int8 C "
                "kernels with fp32 activations decode faster than bf16"
            )
    chosen = torch.bfloat16 if fast else torch.float32
    if fast and device.type == "cpu":
        why += (
            "; torch's bf16 products on CPU can give a request other bits beside others "
            "than alone, --dtype float32 does not (BENCHMARKS.md)"
        )
    logger.info("dtype auto: %s (%s)", str(chosen).removeprefix("torch."), why)
    return chosen


def has_fast_bf16(device: torch.device) -> bool:
    """bf16 matrix products at least as fast as fp32 (GPUs; CPUs with AVX-512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & BF16_CPU_FLAGS)
