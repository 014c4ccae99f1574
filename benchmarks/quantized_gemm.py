"""Where torch's CPU int4 kernel stops paying: one linear layer's product at batch
sizes M, by kernel, on this CPU. The layers are the built-in model's (576 -> 1536, the
MLP's down 1536 -> 576, and the output head's shape) and one of Llama-3.1-8B's.

    python benchmarks/quantized_gemm.py

Columns: fp32 and bf16 dense (as kubellm's dense layers run them:
`kubellm.runtime.model.dense.linear`); `QuantizedWeight` with bf16 activations
through torch's int4 kernel (what runs up to INT4PACK_MAX_ROWS rows) and through its
dense product (the weight rebuilt from the kernel's layout, then one fp32 or bf16
product: what runs above). Median microseconds of 20 runs after 3 warm-ups.
"""

from __future__ import annotations

import torch
from timing import cpu_model, median_seconds

from kubellm.runtime.model.dense import linear
from kubellm.runtime.model.quantized import GroupQuantized, QuantizedLayout, QuantizedWeight

SHAPES = [(576, 1536), (1536, 576), (576, 49152), (4096, 14336)]  # (K in, N out)
BATCHES = [1, 4, 8, 16, 32, 64, 256]


def microseconds(run) -> float:
    return median_seconds(run, warmups=3) * 1e6


def int4_layer(inputs: int, outputs: int) -> QuantizedWeight:
    codes = torch.randint(0, 256, (outputs, inputs // 2), dtype=torch.uint8)
    scales = torch.rand(outputs, inputs // 32) * 0.01
    layer = QuantizedWeight(outputs, inputs, QuantizedLayout(4, 32))
    layer.put(0, GroupQuantized(codes, scales, -8 * scales, 4, 32))
    layer.prepare(True, torch.float32)
    assert layer.int4pack is not None
    return layer


def main() -> None:
    torch.set_num_threads(2)
    model = cpu_model()
    print(f"CPU: {model}; torch {torch.__version__}; 2 threads; microseconds (median)\n")
    print(
        "| K x N | M | fp32 dense | bf16 dense | int4 kernel | int4 -> fp32 dense "
        "| int4 -> bf16 dense |"
    )
    print("|---|---|---|---|---|---|---|")
    for inputs, outputs in SHAPES:
        layer = int4_layer(inputs, outputs)
        dense = torch.randn(outputs, inputs)
        for rows in BATCHES if inputs < 4096 else BATCHES[:5]:
            cells = " | ".join(f"{t:,.0f}" for t in timings(layer, dense, rows))
            print(f"| {inputs}x{outputs} | {rows} | {cells} |", flush=True)


def timings(layer: QuantizedWeight, dense: torch.Tensor, rows: int) -> list[float]:
    """fp32 dense, bf16 dense, int4 kernel, rebuilt -> fp32 and -> bf16 products."""
    x = torch.randn(rows, dense.shape[1])
    xb, dense_bf16 = x.bfloat16(), dense.bfloat16()
    packed, scales_and_zeros, _ = layer.int4pack

    def rebuilt(dtype: torch.dtype):
        return lambda: linear(x.to(dtype), layer._dense_in_stored_order().to(dtype))

    return [
        microseconds(lambda: linear(x, dense)),
        microseconds(lambda: linear(xb, dense_bf16)),
        microseconds(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, packed, 32, scales_and_zeros)),
        microseconds(rebuilt(torch.float32)),
        microseconds(rebuilt(torch.bfloat16)),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
