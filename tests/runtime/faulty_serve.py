"""`kubellm serve` with a fault injected, to test the failure path of a real process:

    KUBELLM_TEST_FAIL_FORWARD_AT=N python -P tests/runtime/faulty_serve.py ARGS

makes the model's Nth forward pass raise (what a CUDA error or a bug in a layer does).
"""

from __future__ import annotations

import itertools
import os
import sys

from kubellm.runtime import serve
from kubellm.runtime.model.llama import LlamaForCausalLM


def fail_forward_at(call: int) -> None:
    forward, calls = LlamaForCausalLM.forward, itertools.count(1)

    def faulty(self, *args, **kwargs):
        if next(calls) == call:
            raise RuntimeError(f"injected fault in forward pass {call}")
        return forward(self, *args, **kwargs)

    LlamaForCausalLM.forward = faulty


if __name__ == "__main__":
    fail_forward_at(int(os.environ["KUBELLM_TEST_FAIL_FORWARD_AT"]))
    sys.exit(serve.main(sys.argv[1:]))
