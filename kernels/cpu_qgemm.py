"""kubellm's CPU kernel for group-quantized weights: `cpu_qgemm.c`, built with the
machine's C compiler on first use and loaded with ctypes.

It needs AVX2, FMA and F16C (`CPU_FLAGS`), and a C compiler (`$CC`, else `cc`) with
OpenMP where it is not built yet: the library is cached under `$XDG_CACHE_HOME/kubellm`
(else `~/.cache/kubellm`), one file per source and flags, so a change to either builds
anew (the runtime image builds it when it is made, and keeps no compiler). It
links against libgomp by name, which is the copy torch has already loaded: both share
one OpenMP thread pool. The pure-torch reference is `cpu_qgemm_reference`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_qgemm.c")
CPU_FLAGS = frozenset({"avx2", "fma", "f16c"})
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
BLOCK = 32  # inputs per activation scale; K and the group size must be multiples of it


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubellm"


def build() -> Path:
    """The compiled library (compiled now unless already cached). Raises OSError or
    subprocess.CalledProcessError (with the compiler's message) when it cannot be."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *COMPILE_FLAGS]).encode())
    path = cache_dir() / f"cpu_qgemm-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        compiler = os.environ.get("CC", "cc")
        subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(partial)],
                       capture_output=True, text=True, check=True)  # fmt: skip
        partial.replace(path)  # atomic: ranks building at once each put a whole file
    return path


@functools.cache
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    lib.kubellm_qgemm.argtypes = [pointer, i64, i64, pointer, ctypes.c_int, pointer, pointer,
                                  i64, i64, pointer, ctypes.c_int]  # fmt: skip
    lib.kubellm_qgemm.restype = ctypes.c_int
    return lib


def cpu_qgemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
              offsets: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:  # fmt: skip
    """x [M, K] (fp32) @ W.T -> fp32 [M, N], W [N, K] = q * s + o per group: codes uint8
    [N, K/2] (4-bit, the even k in the low nibble) or int8 [N, K]; scales and offsets
    fp16 [N, K / group_size]. Each row of x is rounded to int8 per 32 inputs."""
    x = x.float().contiguous()
    rows, inputs = x.shape
    outputs = codes.shape[0]
    out = torch.empty(rows, outputs)
    status = library().kubellm_qgemm(
        x.data_ptr(), rows, inputs, codes.data_ptr(), bits, scales.data_ptr(),
        offsets.data_ptr(), outputs, group_size, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError(f"cpu_qgemm: no memory for the int8 copy of x {list(x.shape)}")
    return out
