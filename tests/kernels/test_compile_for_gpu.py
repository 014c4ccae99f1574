"""Every kernel configuration the Triton backend launches compiles for Hopper (sm_90)
and fits its shared memory, checked without a GPU (see compile_for_gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.kernels.compile_for_gpu import (
    GEMM_SPLITS,
    GEMM_WEIGHTS,
    RANK_KV_HEADS,
    SHAPES,
    jobs,
)

HOPPER_SHARED_PER_BLOCK = 227 * 1024


def test_every_launch_configuration_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-P", str(Path(__file__).with_name("compile_for_gpu.py")), "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    gemm = len(GEMM_WEIGHTS) * len(GEMM_SPLITS) + 1  # and the split's sum
    assert len(results) == len(jobs()) == 3 * (len(RANK_KV_HEADS) + 3 * len(SHAPES) + gemm)
    for result in results:
        assert result["cubin_bytes"] > 0, result
        assert result["shared_bytes"] <= HOPPER_SHARED_PER_BLOCK, result
    # One tile shape per model, in both decode kernels: a token's dots are the same shape
    # whichever kernel runs it.
    rows = {
        (
            r["kernel"],
            r["dtype"],
            r["constants"]["NUM_KV_HEADS"],
            r["constants"]["GROUP"],
            r["constants"]["HEAD_DIM"],
        ): r["constants"]["BLOCK_M"]
        for r in results
        if r["kernel"] in ("attention", "decode_split")
    }
    for (_, *shape), block_m in rows.items():
        assert rows[("decode_split", *shape)] == block_m
