"""Build llama.cpp's own C++ `llama-server` for the serving comparison (a benchmark
dependency only, never a runtime or test one).

The source is the llama.cpp tree vendored in the `llama-cpp-python` source distribution
on PyPI; CMake + Ninja build only the `llama-server` target, curl and OpenSSL off
(about 5 minutes on two cores). The binary is cached under --cache-dir, one per set
of instruction-set flags.

Not `GGML_NATIVE=ON`: that build segfaults at start on this workplace's Intel Xeon
(AMX) machines. The instruction sets are named instead, from /proc/cpuinfo: AVX2,
FMA, F16C and, where present, AVX-512 (F, VBMI, VNNI, BF16); AMX always off.

    python benchmarks/llama_server.py [--cache-dir .bench-cache]   # prints the binary's path
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp


# /proc/cpuinfo flag -> ggml's CMake option
ISA_OPTIONS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def isa_options(flags: set[str]) -> list[str]:
    """CMake options for the instruction sets this CPU has, AMX and native detection off."""
    options = [
        f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in ISA_OPTIONS.items()
    ]
    return [
        *options,
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
        "-DGGML_NATIVE=OFF",
    ]


def build(cache_dir: Path, version: str = VERSION) -> Path:
    from kubellm.kernels.cpu_library import cpu_flags

    options = isa_options(cpu_flags())
    kind = "-".join(f for f in ISA_OPTIONS if f in cpu_flags()) or "generic"
    binary = cache_dir / f"llama.cpp-{version}" / f"build-{kind}" / "bin" / "llama-server"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"llama-cpp-python=={version}",
                "-d",
                str(cache_dir),
            ],
            check=True,
        )
    unpacked = cache_dir / f"llama_cpp_python-{version}"
    if not unpacked.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(cache_dir, filter="data")
    source = unpacked / "vendor" / "llama.cpp"
    build_dir = binary.parent.parent
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            *options,
        ],
        check=True,
    )
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs], check=True
    )
    return binary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache-dir", default=".bench-cache", type=Path)
    print(build(p.parse_args().cache_dir))


if __name__ == "__main__":
    main()
