"""Why `kubellm.runtime.model.dense.linear` writes CPU fp32 products as it does: one
product of the built-in model's layer shapes at batch sizes M, as `F.linear(x, w)`,
as `(w @ x.T).T`, and (one row) as two rows, by dtype, on this CPU.

    python benchmarks/dense_linear.py

Median microseconds of 20 runs after 3 warm-ups, 2 threads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timing import cpu_model, median_seconds

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # (N out, K in)
BATCHES = [1, 2, 4, 16, 64, 256]


def microseconds(run) -> float:
    return median_seconds(run, warmups=3) * 1e6


def main() -> None:
    torch.set_num_threads(2)
    model = cpu_model()
    print(f"CPU: {model}; torch {torch.__version__}; 2 threads; microseconds (median)\n")
    print("| dtype | N x K | M | F.linear | (w @ x.T).T | as two rows |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for outputs, inputs in SHAPES:
            w = torch.randn(outputs, inputs, dtype=dtype)
            for rows in BATCHES if outputs < 10000 else BATCHES[:4]:
                cells = " | ".join(timings(w, torch.randn(rows, inputs, dtype=dtype)))
                name = str(dtype).removeprefix("torch.")
                print(f"| {name} | {outputs}x{inputs} | {rows} | {cells} |", flush=True)


def timings(w: torch.Tensor, x: torch.Tensor) -> list[str]:
    """F.linear, (w @ x.T).T, and for one row, two rows."""
    times = [microseconds(lambda: F.linear(x, w)), microseconds(lambda: (w @ x.T).T)]
    cells = [f"{t:,.0f}" for t in times]
    return [*cells, f"{microseconds(lambda: w @ x.repeat(2, 1).T):,.0f}" if len(x) == 1 else ""]


if __name__ == "__main__":
    main()
