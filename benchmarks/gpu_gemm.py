"""What invariance costs on a GPU: each of Llama-3.1-8B's products (and the built-in
model's head) at batch sizes M, cuBLAS (`F.linear`, which picks its kernel by M) against
kubellm's Triton GEMM (`kernels/gemm.py`, a row's bits independent of M), dense bf16 and
4-bit (groups of 128, the W4A16 path against cuBLAS on the dense weight); and how many
rows of a 64-row product change bits when computed alone, for each.

    python benchmarks/gpu_gemm.py          # needs a CUDA GPU

Median microseconds of CUDA-event timings (50 runs after 5 warm-ups); TFLOP/s of ours;
the ratio ours / cuBLAS (under 1: ours faster).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from kubellm.kernels.gemm import dense_gemm, quantized_gemm

# (name, K in, N out)
SHAPES = [
    ("8B qkv", 4096, 6144),
    ("8B o", 4096, 4096),
    ("8B gate_up", 4096, 28672),
    ("8B down", 14336, 4096),
    ("8B head", 4096, 128256),
    ("built-in head", 576, 49152),
]
BATCHES = [1, 8, 32, 64, 256, 1024, 4096]
GROUP = 128


def microseconds(run, repeats: int = 50, warmups: int = 5) -> float:
    for _ in range(warmups):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def rows_that_change_alone(product, x: torch.Tensor) -> int:
    """Of x's rows, how many get other bits as a product of one row than among all."""
    together = product(x)
    return sum(not torch.equal(product(x[i : i + 1]), together[i : i + 1]) for i in range(len(x)))


def products(inputs: int, outputs: int) -> dict:
    """cuBLAS, ours dense and ours W4A16 over random weights of this shape: x -> x @ W.T."""
    weight = torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16) * 0.02
    codes = torch.randint(0, 256, (outputs, inputs // 2), dtype=torch.uint8, device="cuda")
    scales = torch.rand(outputs, inputs // GROUP, device="cuda") * 0.01 + 0.001
    return {
        "cuBLAS": lambda x: F.linear(x, weight),
        "dense": lambda x: dense_gemm(x, weight),
        "W4A16": lambda x: quantized_gemm(x, codes, scales, -8 * scales, 4, GROUP),
    }


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_gemm.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| product | M | cuBLAS us | ours dense us | ratio | ours W4A16 us | ratio | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, inputs, outputs in SHAPES:
        product = products(inputs, outputs)
        for rows in BATCHES:
            x = torch.randn(rows, inputs, device="cuda", dtype=torch.bfloat16)
            cublas, ours, w4 = (microseconds(lambda f=f, x=x: f(x)) for f in product.values())
            tflops = 2 * rows * inputs * outputs / ours / 1e6
            print(
                f"| {name} | {rows} | {cublas:.1f} | {ours:.1f} | {ours / cublas:.2f} "
                f"| {w4:.1f} | {w4 / cublas:.2f} | {tflops:.1f} |",
                flush=True,
            )
    print("\n| product | rows of 64 whose bits change alone: cuBLAS | ours dense | ours W4A16 |")
    print("|---|---|---|---|")
    for name, inputs, outputs in SHAPES:
        x = torch.randn(64, inputs, device="cuda", dtype=torch.bfloat16)
        counts = [rows_that_change_alone(f, x) for f in products(inputs, outputs).values()]
        print(f"| {name} | " + " | ".join(map(str, counts)) + " |", flush=True)


if __name__ == "__main__":
    main()
