"""`make serve`'s defaults where kubellm's C kernels cannot be built (no C compiler, as in
a slim image, or a CPU without AVX2): torch's int4 kernel at every batch size and the
torch attention backend a call per token, in bf16 on a CPU with AVX-512-BF16 or AMX,
else fp32. The default path's invariance tests run again in a child pytest whose C
compiler is `false` and whose kernel cache is empty, so the library cannot be built
there: a greedy reply computed, found in part, found whole and streamed; a batch's
tokens against each request alone, through preemption and 7-token prefill chunks; the
engine's random workloads (arrivals, aborts, preemption, prefix hits, n > 1, seeded
sampling) with their invariants checked after every step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ON_THE_FALLBACK = [
    "tests/runtime/test_default_path.py::"
    "test_a_greedy_chat_reply_is_the_same_computed_found_in_part_found_whole_and_streamed",
    "tests/runtime/test_batch_invariance.py::"
    "test_tokens_match_the_request_run_alone[defaults-forced-preemption]",
    "tests/runtime/test_batch_invariance.py::"
    "test_tokens_match_the_request_run_alone[defaults-prefill-chunk-7]",
    "tests/runtime/test_engine.py::test_random_workloads_on_the_real_engine[defaults]",
]


def test_the_default_invariants_hold_without_kubellms_c_kernels(tmp_path):
    env = {**os.environ, "CC": "false", "XDG_CACHE_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ON_THE_FALLBACK]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert re.match(rf"{len(ON_THE_FALLBACK)} passed in ", summary), summary
    assert not list(tmp_path.glob("kubellm/*.so"))  # the library was not built there
