"""The dense product `x @ weight.T + bias`, in the form each device's BLAS runs fastest.

In fp32 on CPU, torch hands `F.linear` to its GEMM with the weight as the transposed
operand, which on our machines is up to 3.5x slower than the same product written as
`(weight @ x.T).T` (`python benchmarks/dense_linear.py`) for decode-sized batches; from
a few hundred rows the copy that makes the result contiguous again costs more than the
order saves (5-10% slower at 256 rows), so prefills keep `F.linear`. A single row goes to a
matrix-vector product that runs on one thread, so a large weight (the output head)
multiplies two rows instead. bf16 and fp16 products gain nothing from either (and lose
from two rows), and keep `F.linear`. This is the torch platform's product; on GPUs the
CUDA platform gives dense layers its Triton GEMM instead (`Platform.prepare`), whose rows
do not depend on M as cuBLAS's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# From this many weight elements a one-row product on CPU is done as two rows: torch's
# fp32 matrix-vector product is single-threaded (the built-in model's 28M-element head:
# 8.7 ms as one row, 5.8 ms as two on 2 threads), while for small layers it is faster.
TWO_ROW_MIN_ELEMENTS = 1 << 22
TRANSPOSED_MAX_ROWS = 64  # products of more rows keep F.linear's order


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """[M, K] x [N, K] -> [M, N], contiguous."""
    rows = x.shape[0]
    if x.device.type != "cpu" or x.dtype != torch.float32 or rows > TRANSPOSED_MAX_ROWS:
        return F.linear(x, weight, bias)
    if rows == 1 and weight.numel() >= TWO_ROW_MIN_ELEMENTS and torch.get_num_threads() > 1:
        y = torch.mm(weight, x.repeat(2, 1).T)[:, :1].T.contiguous()
    else:
        y = torch.mm(weight, x.T).T.contiguous()
    return y if bias is None else y.add_(bias)
