"""The repo's bones: package mapping, import boundaries, the `kubellm` dispatcher."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_operator_folder_does_not_shadow_the_standard_library():
    path = _run("import operator; print(operator.__file__)")
    assert Path(path).parent == Path(sysconfig.get_paths()["stdlib"])
    assert _run("import operator; print(operator.itemgetter(1)([5, 6]))") == "6"


def test_three_folders_are_installed_as_kubellm_subpackages():
    out = _run(
        "import kubellm.runtime, kubellm.kernels, kubellm.operator as o;"
        "print(kubellm.runtime.__file__); print(kubellm.kernels.__file__); print(o.__file__)"
    )
    runtime, kernels, op = (Path(p) for p in out.splitlines())
    assert runtime == ROOT / "runtime" / "__init__.py"
    assert kernels == ROOT / "kernels" / "__init__.py"
    assert op == ROOT / "operator" / "__init__.py"


def test_kubellm_command_imports_no_torch_until_a_runtime_command_runs():
    out = _run(
        "import sys; from kubellm import cli; cli.main(['version']);"
        "print('torch' in sys.modules, 'kubellm.runtime' in sys.modules)"
    )
    assert out.splitlines()[-1] == "False False"


def test_kernels_and_operator_import_nothing_of_ours():
    for folder, forbidden in (
        ("kernels", ("kubellm.runtime", "kubellm.operator")),
        ("operator", ("kubellm.runtime", "kubellm.kernels", "torch")),
    ):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            for name in forbidden:
                assert f"import {name}" not in text and f"from {name}" not in text, source
