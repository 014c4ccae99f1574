"""Where and in what precision the model runs: device, dtype and attention backend,
resolved once from the engine's settings (every tensor-parallel rank resolves the same)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kubellm.kernels import cpu_library
from kubellm.kernels.cpu_library import cpu_flags
from kubellm.runtime.config import EngineConfig

logger = logging.getLogger(__name__)

# CPU features whose bf16 matrix multiplies beat fp32 (as vLLM's CPU backend decides)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class Placement:
    device: torch.device  # rank 0's; rank r of a CUDA group runs on GPU r
    dtype: torch.dtype
    attention_backend: str
    dense_dtype: torch.dtype  # of a quantized layer's dense products (fp32 for slow bf16)
    quantized_kernels: bool  # quantized layers' small products by a CPU kernel
    fused_cpu_ops: bool  # a layer's norms, rope and SiLU by kubellm's C kernels
    kv_dtype: torch.dtype  # of the KV cache

    def device_of(self, rank: int, world_size: int) -> torch.device:
        if world_size == 1 or self.device.type != "cuda":
            return self.device
        return torch.device("cuda", rank)


def resolve_placement(config: EngineConfig, stays_quantized: bool = False) -> Placement:
    """`stays_quantized`: the model's weights are kept in a quantized form. Raise
    ValueError when the tensor-parallel size asks for more GPUs than are visible."""
    device = resolve_device(config.device)
    tp = config.tensor_parallel_size
    if device.type == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {tp} needs {tp} GPUs, but {torch.cuda.device_count()} "
            f"are visible: lower tensor_parallel_size or give the pod more GPUs"
        )
    dtype = resolve_dtype(config.dtype, device, stays_quantized)
    dense = dtype if dtype != torch.bfloat16 or has_fast_bf16(device) else torch.float32
    fused = uses_fused_cpu_ops(dtype, device)
    backend = resolve_attention_backend(config.attention_backend, device, fused)
    quantized = uses_quantized_kernels(config.dtype, dtype, device)
    kv_dtype = dtype
    if backend == "cpu" and quantized:  # fp32 that auto chose: half the bytes attention reads
        kv_dtype = torch.float16
        logger.info(
            "KV cache: float16 (the cpu attention backend with dtype auto; "
            "--dtype float32 keeps it float32)"
        )
    return Placement(device, dtype, backend, dense, quantized, fused, kv_dtype)


def uses_fused_cpu_ops(dtype: torch.dtype, device: torch.device) -> bool:
    """fp32 on CPU: a layer's small ops by kubellm's C kernels (`layer_ops`), where
    its library can be used (else torch's, with the reason logged)."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    reason = cpu_library.unavailable()
    if reason is not None:
        logger.warning("a layer's small ops: torch's, not kubellm's C kernels: %s", reason)
    return reason is None


def uses_quantized_kernels(asked: str, dtype: torch.dtype, device: torch.device) -> bool:
    """On CPU, a quantized kernel (its inputs rounded: `quantized.cpu_kernel`) does
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


def resolve_attention_backend(name: str, device: torch.device, fused_cpu_ops: bool) -> str:
    if name == "cpu" and not fused_cpu_ops:
        raise ValueError(
            "attention_backend cpu runs float32 on a CPU where kubellm's C kernels can be "
            "used (AVX2, FMA, F16C and a C compiler, see the log): choose auto or torch"
        )
    if name != "auto":
        return name
    if device.type == "cuda":
        return "triton"
    return "cpu" if fused_cpu_ops else "torch"


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
    logger.info("dtype auto: %s (%s)", str(chosen).removeprefix("torch."), why)
    return chosen


def has_fast_bf16(device: torch.device) -> bool:
    """bf16 matrix products at least as fast as fp32 (GPUs; CPUs with AVX-512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & BF16_CPU_FLAGS)
