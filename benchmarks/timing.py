"""What the CPU micro-benchmarks share: a median timer and the CPU's name for their header."""

from __future__ import annotations

import statistics
import subprocess
import time


def median_seconds(run, repeats: int = 20, warmups: int = 1) -> float:
    """The median wall time of `repeats` calls of `run` after `warmups` calls."""
    for _ in range(warmups):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cpu_model() -> str:
    """`lscpu`'s model name ("?" when it has none)."""
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                 if line.startswith("Model name")), "?")  # fmt: skip
