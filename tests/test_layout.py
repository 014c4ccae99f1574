"""The repo's bones: package mapping, import boundaries, the `kubellm` dispatcher."""

from __future__ import annotations

import ast
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


RUNTIME = ROOT / "runtime"
# The executor (runner, workers, distributed, graphs, placement, the step plan) and the
# model below it take step plans only: no request, scheduler or sampler type.
EXECUTOR = ["executor", "model"]
ENGINE_MODULES = {"request", "sequence", "scheduler", "sampler", "sampling_params", "engine"}
ENGINE_MODULES |= {"async_engine", "kv_cache", "structured_output", "admission"}


def _module_name(path: Path) -> str:
    parts = ["kubellm", "runtime", *path.relative_to(RUNTIME).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The runtime modules `path` imports, anywhere in it (type-checking imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubellm.runtime"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kubellm.runtime")}
    return {m for m in found if m in modules and m != _module_name(path)}


def _runtime_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in RUNTIME.rglob("*.py")}
    return {name: _runtime_imports(path, set(paths)) for name, path in paths.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def _engine_modules_reached(graph: dict[str, set[str]], module: str) -> set[str]:
    return {m for m in _reachable(graph, module) if m.rsplit(".", 1)[-1] in ENGINE_MODULES}


def test_below_the_executor_nothing_imports_an_engine_type():
    """Directly or through another module (as the runner once did through its memory
    profile, which built requests to fake a schedule)."""
    graph = _runtime_graph()
    for entry in EXECUTOR:
        for path in sorted((RUNTIME / entry).rglob("*.py")):
            engine = _engine_modules_reached(graph, _module_name(path))
            assert not engine, f"{path.relative_to(ROOT)} imports {sorted(engine)}"


def test_the_engine_type_check_sees_an_import_through_another_module():
    graph = {
        "kubellm.runtime.executor.model_runner": {"kubellm.runtime.model.llama"},
        "kubellm.runtime.model.llama": {"kubellm.runtime.core.sequence"},
        "kubellm.runtime.core.sequence": set(),
    }
    reached = _engine_modules_reached(graph, "kubellm.runtime.executor.model_runner")
    assert reached == {"kubellm.runtime.core.sequence"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_import_circle_inside_the_runtime():
    assert _cycle(_runtime_graph()) is None, " -> ".join(_cycle(_runtime_graph()))


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]


def _kernel_imports(path: Path) -> list[str]:
    """The `kubellm.kernels` modules `path` imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n for n in names if n == "kubellm.kernels" or n.startswith("kubellm.kernels.")]
    return found


def test_the_model_imports_no_kernel():
    """`model/` describes the model only; the platform (`executor/platform`) swaps in
    what runs it."""
    for path in sorted((RUNTIME / "model").rglob("*.py")):
        assert not _kernel_imports(path), f"{path.relative_to(ROOT)} imports a kernel"


def test_the_kernel_import_check_sees_each_form(tmp_path):
    source = tmp_path / "layer.py"
    source.write_text(
        "import torch\n"
        "from kubellm.kernels import cpu_ops\n"
        "def f():\n"
        "    from kubellm.kernels.gemm import dense_gemm\n"
        "    import kubellm.kernels.cpu_layer\n"
        "from kubellm.runtime.model.rope import rotate\n"
    )
    assert len(_kernel_imports(source)) == 3


ENTRY_POINTS = {"serve.py", "generate_cli.py", "engine_flags.py"}  # where flags are parsed


def _environment_reads(path: Path) -> list[str]:
    """KUBELLM_* names `path` looks up in the environment (os.environ[...], .get,
    os.getenv, or a lookup whose key is built from a "KUBELLM_" prefix)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get", "getenv", "pop", "setdefault") and node.args:
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
            key = node.slice
        if key is not None and "KUBELLM_" in ast.unparse(key):
            found.append(ast.unparse(node))
    return found


def test_below_the_entry_points_no_module_reads_a_kubellm_variable():
    for folder in ("runtime", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ENTRY_POINTS and path.parent == RUNTIME:
                continue
            assert not _environment_reads(path), f"{path.relative_to(ROOT)} reads the environment"


def test_the_environment_check_sees_each_way_of_reading(tmp_path):
    source = tmp_path / "reads.py"
    source.write_text(
        "import os\n"
        "a = os.environ.get('KUBELLM_DTYPE', 'auto')\n"
        "b = os.getenv('KUBELLM_DEVICE')\n"
        "c = os.environ['KUBELLM_QUANTIZATION']\n"
        "d = environ.get('KUBELLM_' + flag)\n"
        "e = os.environ.get('HF_HOME')\n"
    )
    assert len(_environment_reads(source)) == 4
