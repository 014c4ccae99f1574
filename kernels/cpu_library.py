"""kubellm's C kernels for x86 CPUs (`cpu_qgemm.c`, `cpu_ops.c`, `cpu_layer.c`): one
library, built with the machine's C compiler on first use and loaded with ctypes.

They need AVX2, FMA and F16C (`CPU_FLAGS`), and a C compiler (`$CC`, else `cc`) with
OpenMP where the library is not built yet: it is cached under `$XDG_CACHE_HOME/kubellm`
(else `~/.cache/kubellm`), one file per source and flags, so a change to either builds
anew (the runtime image builds every level when it is made, and keeps no compiler). A
CPU with VNNI gets a build that uses it (`LEVELS`): the same results, fewer instructions.
It links against libgomp by name, which is the copy torch has already loaded: both
share one OpenMP thread pool. `unavailable()` says why it cannot be used here, if it
cannot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("cpu_qgemm.c", "cpu_ops.c", "cpu_layer.c")
)
HEADER = Path(__file__).with_name("cpu_kernels.h")
CPU_FLAGS = frozenset({"avx2", "fma", "f16c"})
COMPILE_FLAGS = (
    "-O3",
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-ffp-contract=off",
    "-fopenmp",
    "-shared",
    "-fPIC",
)
# Instruction-set levels beyond the base, best first: (name, the CPU flags it needs, the
# compiler flags it adds). VNNI makes the quantized product's 8-bit dot products one
# instruction each, and AVX-512 takes codes four blocks per pass (cpu_qgemm.c);
# AVX-VNNI is VNNI's 256-bit form without AVX-512 (the AVX2 build's bits).
LEVELS = (
    (
        "avx512-vnni",
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
    ),
    ("avx-vnni", frozenset({"avx_vnni"}), ("-mavxvnni",)),
    ("avx2", frozenset(), ()),
)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubellm"


def levels() -> list[str]:
    """The names of `LEVELS` this CPU has, best first (the base last)."""
    flags = cpu_flags()
    return [name for name, needs, _ in LEVELS if needs <= flags]


def level() -> str:
    """The best of `LEVELS` this CPU has."""
    return levels()[0]


def build(level_name: str | None = None) -> Path:
    """The library for a level (default: this CPU's), compiled now unless already cached.
    Raises OSError or subprocess.CalledProcessError (with the compiler's message) when it
    cannot be."""
    flags = level_flags(level_name or level())
    texts = (path.read_text() for path in (*SOURCES, HEADER))
    text = "\0".join([*texts, *flags])
    path = cache_dir() / f"kubellm_cpu-{hashlib.sha256(text.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        compile_library(SOURCES, partial, flags)
        partial.replace(path)  # atomic: ranks building at once each put a whole file
    return path


def level_flags(level_name: str) -> tuple[str, ...]:
    """The compiler flags of a level: the base's and its own."""
    (extra,) = [flags for name, _, flags in LEVELS if name == level_name]
    return (*COMPILE_FLAGS, *extra)


def compile_library(sources: Sequence[Path], out: Path, flags: Sequence[str]) -> None:
    """`sources` (the C files; the header beside them) compiled with `flags` into the
    library `out`."""
    compiler = os.environ.get("CC", "cc")
    subprocess.run(
        [compiler, *flags, *map(str, sources), "-o", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )


@functools.cache
def library() -> ctypes.CDLL:
    return ctypes.CDLL(str(build()))


@functools.cache
def unavailable() -> str | None:
    """Why the library cannot be used on this machine (None: it can). Asked once."""
    missing = sorted(CPU_FLAGS - cpu_flags())
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    try:
        library()
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        return f"its library could not be built ({str(detail).strip()[:300]})"
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
