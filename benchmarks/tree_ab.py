"""The default decode step at an earlier commit against the working tree's, alternated:
each round runs, in a fresh process per tree, that tree's own `benchmarks/decode_step.py`
measurement (the built-in model on its defaults, 1 / 16 / 64 requests) against that
tree's package, so a refactor of the runtime can be compared with what it replaced.

    python benchmarks/tree_ab.py --base 2e04909 --rounds 8

Median ms over the rounds of each round's median step and forward pass (20 runs each).
The base must have `benchmarks/decode_step.py` with `engine`, `decode_plan` and `costs`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import cpu_model

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "kernels", "operator", "router")  # kubellm's sub-packages by folder

MEASURE = """
import random, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:0] = [sys.argv[1], sys.argv[2] + "/benchmarks"]
import torch, decode_step
torch.set_num_threads(2)
llm = decode_step.engine(True)
with torch.inference_mode():
    for batch in decode_step.BATCHES:
        plan = decode_step.decode_plan(llm, batch, random.Random(batch))
        step, forward, _, ops = decode_step.costs(llm.engine.runner, plan)
        print("RESULT", batch, step, forward, ops, flush=True)
"""


def package_view(tree: Path, into: Path) -> Path:
    """A directory whose `kubellm` package is `tree`'s (its folders linked in), ahead of
    the editable install on sys.path."""
    package = into / "kubellm"
    package.mkdir(parents=True)
    for source in (tree / "kubellm").glob("*.py"):
        (package / source.name).write_text(source.read_text())
    for name in PACKAGES:
        (package / name).symlink_to(tree / name)
    return into


def measure(view: Path, tree: Path) -> dict[int, tuple[float, float, int]]:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(view), str(tree)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            batch, step, forward, ops = line.split()[1:]
            results[int(batch)] = (float(step), float(forward), int(ops))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        subprocess.run(
            ["git", "worktree", "add", "-q", "--detach", str(base), args.base], cwd=REPO, check=True
        )
        try:
            trees = {
                args.base: (package_view(base, Path(scratch) / "base-view"), base),
                "working tree": (package_view(REPO, Path(scratch) / "tree-view"), REPO),
            }
            rounds = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, (view, tree) in trees.items():
                    rounds[name].append(measure(view, tree))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=True
            )
    print(f"CPU: {cpu_model()}; {args.rounds} rounds, alternated; median ms\n")
    print("| requests | tree | step | forward | aten ops per step |")
    print("|---|---|---|---|---|")
    for batch in sorted(rounds["working tree"][0]):
        for name, runs in rounds.items():
            step = statistics.median(r[batch][0] for r in runs)
            forward = statistics.median(r[batch][1] for r in runs)
            print(f"| {batch} | {name} | {step:.1f} | {forward:.1f} | {runs[0][batch][2]:,} |")


if __name__ == "__main__":
    main()
