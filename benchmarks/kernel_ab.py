"""kubellm's C kernels at an earlier commit against the working tree's, alternated in one
process: the quantized product (`kubellm_qgemm`, x's int8 rounding included) on the
built-in model's layer shapes, and decode attention (`kubellm_decode_attention`) over
fp16 and fp32 caches. Both libraries are built from their sources with the flags of an
instruction-set level (`cpu_library.LEVELS`; default this CPU's); each case checks
whether the two give the same bits.

    python benchmarks/kernel_ab.py --base HEAD~1
    python benchmarks/kernel_ab.py --base HEAD --base-level avx2   # VNNI's build against AVX2's

Median microseconds of 7 rounds (each round: as many calls as fit in 50 ms, per build).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from timing import cpu_model

from kubellm.kernels import cpu_library

REPO = Path(__file__).resolve().parents[1]
THREADS = 2


def build(sources: dict[str, str], into: Path, level: str) -> ctypes.CDLL:
    """The library built from {file name: text} in `into` for an instruction-set level."""
    into.mkdir()
    for name, text in sources.items():
        (into / name).write_text(text)
    out = into / "kernels.so"
    sources_in = [into / path.name for path in cpu_library.SOURCES]
    cpu_library.compile_library(sources_in, out, cpu_library.level_flags(level))
    return ctypes.CDLL(str(out))


def sources_at(revision: str | None) -> dict[str, str]:
    paths = [*cpu_library.SOURCES, cpu_library.HEADER]
    if revision is None:
        return {path.name: path.read_text() for path in paths}

    def show(path):
        command = ["git", "show", f"{revision}:{path.relative_to(REPO)}"]
        return subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout

    return {path.name: show(path) for path in paths}


def pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def qgemm_case(M: int, K: int, N: int, bits: int = 4, group: int = 32):
    x = torch.randn(M, K)
    codes = torch.randint(0, 256, (N, K * bits // 8), dtype=torch.uint8)
    scales = (torch.rand(N, K // group) * 0.01).half()
    offsets = (torch.randn(N, K // group) * 0.01).half()
    y = torch.empty(M, N)
    i64 = ctypes.c_int64

    def run(lib: ctypes.CDLL) -> torch.Tensor:
        lib.kubellm_qgemm(
            pointer(x),
            i64(M),
            i64(K),
            pointer(codes),
            ctypes.c_int(bits),
            pointer(scales),
            pointer(offsets),
            i64(N),
            i64(group),
            pointer(y),
            ctypes.c_int(THREADS),
        )
        return y.clone()

    return run


def attention_case(
    requests: int,
    longest: int,
    half: bool,
    heads: int = 9,
    kv_heads: int = 3,
    dim: int = 64,
    block_size: int = 16,
):
    """Contexts of longest / 2 to longest positions in scattered blocks."""
    per_request = -(-longest // block_size)
    blocks = requests * per_request
    cache = torch.randn(2, blocks, block_size, kv_heads, dim)
    cache = cache.half() if half else cache
    query = torch.randn(requests, heads * dim)
    out = torch.empty(requests, heads, dim)
    tables = torch.randperm(blocks).view(requests, per_request).contiguous()
    lens = torch.randint(longest // 2, longest + 1, (requests,))
    rows = torch.arange(requests)
    i64 = ctypes.c_int64

    def run(lib: ctypes.CDLL) -> torch.Tensor:
        lib.kubellm_decode_attention(
            pointer(query),
            i64(heads * dim),
            i64(heads),
            pointer(cache),
            i64(blocks),
            i64(block_size),
            i64(kv_heads),
            i64(dim),
            ctypes.c_int(int(half)),
            pointer(rows),
            pointer(lens),
            pointer(tables),
            i64(per_request),
            i64(requests),
            ctypes.c_float(dim**-0.5),
            pointer(out),
            ctypes.c_int(THREADS),
        )
        return out.clone()

    return run


def cases() -> dict[str, object]:
    torch.manual_seed(0)
    found = {}
    for shape, (K, N, bits) in {
        "576x960 (QKV)": (576, 960, 4),
        "1536x576 (down)": (1536, 576, 4),
        "576x960 8-bit": (576, 960, 8),
    }.items():
        for M in (1, 16, 64, 256):
            found[f"qgemm {shape}, M = {M}"] = qgemm_case(M, K, N, bits)
    for half in (True, False):
        for requests in (1, 16, 64):
            name = f"decode attention {'fp16' if half else 'fp32'}, {requests} requests"
            found[name] = attention_case(requests, 400, half)
    return found


def microseconds(run, lib: ctypes.CDLL) -> float:
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < 0.05:
        run(lib)
        calls += 1
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare against")
    levels = [name for name, _, _ in cpu_library.LEVELS]
    parser.add_argument("--base-level", choices=levels, default=cpu_library.level())
    parser.add_argument(
        "--level", choices=levels, default=cpu_library.level(), help="the working tree's build"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base = build(sources_at(args.base), Path(scratch) / "base", args.base_level)
        current = build(sources_at(None), Path(scratch) / "current", args.level)
        print(
            f"{cpu_model()}, {THREADS} threads; {args.base} ({args.base_level}) against "
            f"the working tree ({args.level})\n"
        )
        print("| case | base us | current us | base / current | same bits |")
        print("|---|---|---|---|---|")
        for name, run in cases().items():
            same = torch.equal(run(base), run(current))
            rounds = [(microseconds(run, base), microseconds(run, current)) for _ in range(7)]
            before = statistics.median(r[0] for r in rounds)
            after = statistics.median(r[1] for r in rounds)
            print(
                f"| {name} | {before:,.1f} | {after:,.1f} | {before / after:.2f} | "
                f"{'yes' if same else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
