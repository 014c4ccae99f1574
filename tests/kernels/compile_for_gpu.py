"""Compile every kernel configuration the Triton backend launches for a GPU architecture,
with no GPU: Triton lowers to PTX and the `ptxas` shipped in its wheel assembles it.

The interpreter, which runs the kernels on CPU, checks what they compute but never
compiles them; this checks the other half (dot shapes and dtypes, layouts, shared
memory). Run without TRITON_INTERPRET, which replaces `triton.jit` with the interpreter:

    python -P tests/kernels/compile_for_gpu.py [--arch 90]

Prints one JSON object per compiled kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor

# (query heads, KV heads, head dim) of one rank: SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B,
# Qwen2-7B, MHA; under tensor parallelism Llama-3.1-8B at TP 2 and Llama-3.1-70B (64 heads,
# 8 KV heads) at TP 4 and TP 8 (one KV head per rank).
SHAPES = [
    (9, 3, 64),
    (32, 8, 64),
    (32, 8, 128),
    (28, 4, 128),
    (16, 16, 128),
    (16, 4, 128),
    (16, 2, 128),
    (8, 1, 128),
]
RANK_KV_HEADS = (8, 2, 1)  # the cache write's head counts: one GPU, TP 4 and TP 8 of 70B
DTYPES = {"bf16": True, "fp16": True, "fp32": False}  # dtype -> NATIVE_DOT on a GPU
BLOCK_SIZE = 16
# The GEMM: dense weights; 4-bit in the group sizes of GPTQ/AWQ checkpoints and GGUF's
# (32); GGUF's 8-bit Q8_0 (groups of 32); K whole and split (and the split's sum).
# M, N and K are runtime arguments, so these cover every layer of
# Llama-3.1-8B (K 4096 and 14336) and of 70B per rank at TP 4 and 8 (K 8192, 7168,
# 3584, 2048, 1024): each K is a multiple of every BLOCK_K (test_gemm checks it).
QUANTIZED_GROUPS = (("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32))
GEMM_WEIGHTS = (("dense", None), *QUANTIZED_GROUPS)
GEMM_SPLITS = (False, True)  # K whole (any M) and split into segments (decode)


_WEIGHT_POINTER = {"int4": "*u8", "int8": "*i8"}  # a dense weight: the activations' dtype


def _pointers(dtype: str, names: str) -> dict[str, str]:
    return {name: f"*{dtype}" for name in names.split()}


def _ints(names: str) -> dict[str, str]:
    return {name: "i32" for name in names.split()}


def jobs() -> list[tuple[str, str, dict]]:
    """(kernel, dtype, constants) for every launch configuration of the shapes above."""
    from kubellm.kernels.gemm import SUM_BLOCK, gemm_constants
    from kubellm.kernels.paged_attention import (
        SEGMENT_BLOCKS,
        attention_constants,
        merge_constants,
    )

    out: list[tuple[str, str, dict]] = []
    for dtype, native in DTYPES.items():
        for kv_heads in RANK_KV_HEADS:
            out.append(("write_kv", dtype, dict(NUM_KV_HEADS=kv_heads, HEAD_DIM=128, BLOCK_D=128)))
        for heads, kv_heads, dim in SHAPES:
            constants = attention_constants(heads, kv_heads, dim, BLOCK_SIZE, native)
            out.append(("attention", dtype, constants))
            merge = merge_constants(heads, kv_heads, dim)
            split = dict(
                merge, BLOCK_SIZE=BLOCK_SIZE, SEGMENT_BLOCKS=SEGMENT_BLOCKS, NATIVE_DOT=native
            )
            out.append(("decode_split", dtype, split))
            out.append(("decode_merge", dtype, merge))
        for (form, group), split in itertools.product(GEMM_WEIGHTS, GEMM_SPLITS):
            out.append(("gemm", dtype, gemm_constants(form, group, native, split)))
        out.append(("gemm_sum", dtype, dict(BLOCK=SUM_BLOCK)))
    return out


def compile_one(job: tuple[str, str, dict], arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kubellm.kernels import gemm
    from kubellm.kernels import paged_attention as kernels

    name, dtype, constants = job
    kernel, types = {
        "write_kv": (
            kernels._write_kv_kernel,
            {
                **_pointers(dtype, "key value k_cache v_cache"),
                "slots": "*i64",
                **_ints("stride_kt stride_kh stride_vt stride_vh"),
            },
        ),
        "attention": (
            kernels._paged_attention_kernel,
            {
                **_pointers(dtype, "query out k_cache v_cache"),
                "block_tables": "*i64",
                "query_start_loc": "*i32",
                "seq_lens": "*i32",
                "scale": "fp32",
                **_ints("stride_qt stride_qh stride_ot stride_oh stride_bt"),
            },
        ),
        "decode_split": (
            kernels._decode_split_kernel,
            {
                **_pointers(dtype, "query k_cache v_cache"),
                "block_tables": "*i64",
                "seq_lens": "*i32",
                "scale": "fp32",
                **_pointers("fp32", "part_acc part_m part_l"),
                **_ints("num_segments stride_qt stride_qh stride_bt"),
            },
        ),
        "decode_merge": (
            kernels._decode_merge_kernel,
            {
                **_pointers(dtype, "out"),
                **_pointers("fp32", "part_acc part_m part_l"),
                **_ints("num_segments stride_ot stride_oh"),
            },
        ),
        "gemm": (
            gemm._gemm_kernel,
            {
                "x": f"*{dtype}",
                "weight": _WEIGHT_POINTER.get(constants.get("WEIGHT"), f"*{dtype}"),
                **_pointers("fp32", "scales offsets"),
                "out": "*fp32" if constants.get("SPLIT") else f"*{dtype}",
                **_ints("M N K stride_xm stride_wn stride_sn"),
            },
        ),
        "gemm_sum": (
            gemm._sum_kernel,
            {"partial": "*fp32", "out": f"*{dtype}", **_ints("size SPLITS")},
        ),
    }[name]
    signature = {arg: "constexpr" if arg in constants else types[arg] for arg in kernel.arg_names}
    compiled = triton.compile(
        ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32)
    )
    return {
        "kernel": name,
        "dtype": dtype,
        "constants": constants,
        "arch": arch,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared_bytes": compiled.metadata.shared,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    all_jobs = jobs()
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for result in pool.map(compile_one, all_jobs, itertools.repeat(args.arch)):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
