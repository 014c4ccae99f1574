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
    """`lscpu`'s model name with its family and model numbers, which tell apart CPUs that
    share a name (AMD EPYC: Zen 3 is family 25, Zen 5 family 26)."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    field = lambda name: fields.get(name, "?").strip()  # noqa: E731
    return f"{field('Model name')} (family {field('CPU family')}, model {field('Model')})"
