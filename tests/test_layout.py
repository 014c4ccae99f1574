"""The repo's bones: package mapping, import boundaries, the `kubellm` dispatcher."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

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


def _ours(name: str) -> bool:
    """Whether `import name` would find one of this checkout's top-level folders."""
    spec = importlib.util.find_spec(name)
    locations = [spec.origin, *(spec.submodule_search_locations or [])] if spec else []
    return any(loc and Path(loc).resolve().is_relative_to(ROOT / name) for loc in locations)


@pytest.mark.parametrize("name", ["kernels", "operator", "runtime", "router"])
def test_no_top_level_folder_of_ours_shadows_a_package_in_the_test_process(name):
    """The suite runs as `make test` starts it: the root must not be on sys.path, or
    transformers' `import kernels` (Hugging Face's package) finds our kernels/ folder."""
    assert not _ours(name), f"`import {name}` finds {ROOT / name}: the root is on sys.path"


def test_transformers_hub_kernels_integration_imports_hugging_faces_kernels():
    importlib.import_module("transformers.integrations.hub_kernels")
    assert not _ours("kernels")
    assert Path(importlib.import_module("operator").__file__).parent == Path(
        sysconfig.get_paths()["stdlib"]
    )


def test_python_dash_m_kubellm_from_the_checkout_root_keeps_the_root_off_sys_path():
    """A user's `python -m kubellm ...` in a checkout, with nothing set in the environment."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = "import importlib.util as u; print(u.find_spec('kernels').origin)"
    probe = subprocess.run(  # the hazard itself: without -P the root answers `import kernels`
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert Path(probe.stdout.strip()) == ROOT / "kernels" / "__init__.py"
    done = subprocess.run(
        [sys.executable, "-m", "kubellm", "serve", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "--tensor-parallel-size" in done.stdout, done.stderr


def test_three_folders_are_installed_as_kubellm_subpackages():
    out = _run(
        "import kubellm.runtime, kubellm.kernels, kubellm.operator as o;"
        "print(kubellm.runtime.__file__); print(kubellm.kernels.__file__); print(o.__file__)"
    )
    runtime, kernels, op = (Path(p) for p in out.splitlines())
    assert runtime == ROOT / "runtime" / "__init__.py"
    assert kernels == ROOT / "kernels" / "__init__.py"
    assert op == ROOT / "operator" / "__init__.py"


def test_kubellm_route_imports_no_torch_and_nothing_of_the_runtime():
    out = _run(
        "import sys; from kubellm.router import main, server;"
        "print('torch' in sys.modules, 'kubellm.runtime' in sys.modules,"
        " 'kubellm.operator' in sys.modules)"
    )
    assert out.splitlines()[-1] == "False False False"


def test_kubellm_command_imports_no_torch_until_a_runtime_command_runs():
    out = _run(
        "import sys; from kubellm import cli; cli.main(['version']);"
        "print('torch' in sys.modules, 'kubellm.runtime' in sys.modules)"
    )
    assert out.splitlines()[-1] == "False False"


def test_kernels_operator_and_router_import_nothing_of_ours_but_what_they_may():
    for folder, forbidden in (
        ("kernels", ("kubellm.runtime", "kubellm.operator")),
        ("operator", ("kubellm.runtime", "kubellm.kernels", "torch")),
        ("router", ("kubellm.runtime", "kubellm.kernels", "torch")),
    ):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            for name in forbidden:
                assert f"import {name}" not in text and f"from {name}" not in text, source


def test_the_router_uses_only_the_operators_kubernetes_client():
    """`--discover` borrows `kubellm.operator.kube` (imported when discovery starts);
    nothing else of the operator."""
    for source in (ROOT / "router").rglob("*.py"):
        for line in source.read_text().splitlines():
            if "kubellm.operator" in line and ("import" in line):
                assert line.strip().startswith("from kubellm.operator.kube import"), source


def test_ruff_format_is_the_house_style_with_no_exceptions():
    """`make lint` checks `ruff format`; a formatter directive to skip a statement or
    turn formatting off would let a file keep a style of its own."""
    for source in ROOT.rglob("*.py"):
        if ".venv" in source.parts or not source.is_relative_to(ROOT):
            continue
        text = source.read_text()
        assert "fmt: " + "skip" not in text and "fmt: " + "off" not in text, source
