"""The locks in requirements/: exact, hashed, current, and what every environment installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("dev", "serve", "runtime-image", "operator-image", "build")


def _pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.MULTILINE))


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", str(root / "requirements" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("lock", LOCKS)
def test_every_requirement_is_exact_and_hashed(lock):
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2].strip())
    assert entries and len(entries) == len(_pins(lock))
    for entry in entries:
        assert re.match(r"[A-Za-z0-9_.\-]+==\S+ \\\n", entry), entry
        assert "--hash=sha256:" in entry, entry


def test_the_locks_are_current_with_pyproject():
    done = _check(ROOT)
    assert done.returncode == 0, done.stderr


def test_an_edited_range_without_a_new_lock_is_caught_with_the_remedy(tmp_path):
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"openai>=1.30",' in pyproject
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"openai>=1.30",', '"openai>=9",'))
    done = _check(tmp_path)
    assert done.returncode == 1
    assert "requirements/dev.txt" in done.stderr and "run `make lock`" in done.stderr
    assert "operator-image.txt" not in done.stderr  # only the locks made from that extra


def test_cpu_environments_take_torchs_cpu_build_and_the_image_pypis():
    assert _pins("dev")["torch"] == _pins("serve")["torch"] == "2.13.0+cpu"
    assert _pins("runtime-image")["torch"] == "2.13.0"
    assert not any(name.startswith("nvidia-") for name in _pins("dev"))
    assert "torch" not in _pins("operator-image")


def test_serve_keeps_the_dev_locks_versions_so_both_share_one_venv():
    dev, serve = _pins("dev"), _pins("serve")
    assert {name: dev.get(name) for name in serve} == serve


def test_every_environment_installs_from_its_lock_with_hashes():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $<" in makefile
    assert "$(VENV)/.dev" in makefile and "$(VENV)/.serve" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    for lock in ("build", "operator-image", "runtime-image"):
        assert f"requirements/{lock}.txt" in dockerfile
    assert dockerfile.count("--require-hashes --no-deps -r") == 3
    assert "make test" in (ROOT / ".ci" / "run").read_text()
