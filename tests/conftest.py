"""Session-wide settings, and the `cuda` marker (skipped without a GPU)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The servers tests start (`kubellm serve` reads KUBELLM_*, as its flags' defaults) run
# on CPU also on a machine with a GPU, in fp32 whatever `--dtype auto` would choose on
# this CPU (bf16 where it has AMX), with quantized weights dequantized at load unless a
# test names the method: the oracles' settings. Engines built in the test process take
# the same pins as settings (tests/runtime/pins.py): the library reads no environment.
os.environ.setdefault("KUBELLM_DEVICE", "cpu")
os.environ.setdefault("KUBELLM_DTYPE", "float32")
os.environ.setdefault("KUBELLM_QUANTIZATION", "none")
if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on CPU; it must be set before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _free_gpu_memory(request):
    """An engine takes most of the GPU for its KV pool: give it back after each cuda test."""
    yield
    if "cuda" in request.keywords and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
