"""Where the CPU's quantized kernels stop paying: one linear layer's product at batch
sizes M, by kernel, on this CPU. The layers are the built-in model's (576 -> 1536, the
MLP's down 1536 -> 576, and the output head's shape) and one of Llama-3.1-8B's.

    python benchmarks/quantized_gemm.py

Columns: fp32 and bf16 dense (as kubellm's dense layers run them:
`kubellm.runtime.model.dense.linear`); kubellm's CPU kernel (`kernels/cpu_qgemm.c`, fp32
activations rounded to int8 per 32 inputs: what runs up to QGEMM_MAX_ROWS rows where
the CPU has AVX2); torch's int4 kernel with bf16 activations (the fallback, at every
M); and the dense product above QGEMM_MAX_ROWS (the weight rebuilt from the kernel's
storage, then one fp32 or bf16 product). Median microseconds of 20 runs after
3 warm-ups.
"""

from __future__ import annotations

import torch
from timing import cpu_model, median_seconds

from kubellm.kernels.cpu_qgemm import cpu_qgemm
from kubellm.runtime.executor.platform.cpu_products import (
    Int4PackProduct,
    QgemmProduct,
    cpu_product,
)
from kubellm.runtime.model.dense import linear
from kubellm.runtime.model.quantized import GroupQuantized, QuantizedLayout, QuantizedWeight

SHAPES = [(576, 1536), (1536, 576), (576, 49152), (4096, 14336)]  # (K in, N out)
BATCHES = [1, 4, 8, 16, 32, 64, 128, 256, 1024]


def microseconds(run) -> float:
    return median_seconds(run, warmups=3) * 1e6


def int4_layer(inputs: int, outputs: int, kernel: str) -> QuantizedWeight:
    codes = torch.randint(0, 256, (outputs, inputs // 2), dtype=torch.uint8)
    scales = torch.rand(outputs, inputs // 32) * 0.01
    layer = QuantizedWeight(outputs, inputs, QuantizedLayout(4, 32))
    layer.put(0, GroupQuantized(codes, scales, -8 * scales, 4, 32))
    layer.use(cpu_product(layer, kernel, torch.float32))
    assert isinstance(layer.product, Int4PackProduct if kernel == "int4pack" else QgemmProduct)
    return layer


def main() -> None:
    torch.set_num_threads(2)
    model = cpu_model()
    print(f"CPU: {model}; torch {torch.__version__}; 2 threads; microseconds (median)\n")
    print(
        "| K x N | M | fp32 dense | bf16 dense | kubellm kernel | torch int4 kernel "
        "| int4 -> fp32 dense | int4 -> bf16 dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for inputs, outputs in SHAPES:
        ours, torchs = (int4_layer(inputs, outputs, k) for k in ("qgemm", "int4pack"))
        dense = torch.randn(outputs, inputs)
        for rows in BATCHES if inputs < 4096 else BATCHES[:5]:
            cells = " | ".join(f"{t:,.0f}" for t in timings(ours, torchs, dense, rows))
            print(f"| {inputs}x{outputs} | {rows} | {cells} |", flush=True)


def timings(
    ours: QuantizedWeight, torchs: QuantizedWeight, dense: torch.Tensor, rows: int
) -> list[float]:
    """fp32 dense, bf16 dense, the two kernels, rebuilt -> fp32 and -> bf16 products."""
    x = torch.randn(rows, dense.shape[1])
    xb, dense_bf16 = x.bfloat16(), dense.bfloat16()
    packed, scales_and_zeros = torchs.product.packed, torchs.product.scales_and_zeros
    bits, group = ours.layout.bits, ours.layout.group_size

    def rebuilt(dtype: torch.dtype):
        return lambda: linear(x.to(dtype), ours.product.dense(dtype))

    return [
        microseconds(lambda: linear(x, dense)),
        microseconds(lambda: linear(xb, dense_bf16)),
        microseconds(lambda: cpu_qgemm(x, *ours.product.operands(), bits, group)),
        microseconds(
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, scales_and_zeros)
        ),
        microseconds(rebuilt(torch.float32)),
        microseconds(rebuilt(torch.bfloat16)),
    ]


if __name__ == "__main__":
    main()
