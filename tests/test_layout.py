"""The package's layout holds: the halves keep their walls, the import graph has no cycles, and packages load lazily
(``edge-rt --help`` and ``edge-rt plan`` run where llama.cpp cannot be imported)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edge_runtime"
FORBIDDEN = {"runtime": ("edge_runtime.distribution", "edge_runtime.serve", "edge_runtime.cli"),
             "distribution": ("edge_runtime.runtime", "edge_runtime.serve", "edge_runtime.cli"),
             "gguf": ("edge_runtime.runtime", "edge_runtime.distribution", "edge_runtime.serve", "edge_runtime.cli",
                      "converters"),
             "serve": ("edge_runtime.cli", "converters")}
# converters/ sits below the runtime (or beside it): it may use the shared modules, never a half of edge_runtime.
CONVERTERS_FORBIDDEN = ("edge_runtime.runtime", "edge_runtime.distribution", "edge_runtime.serve", "edge_runtime.cli")
SHARED = ["errors", "settings.py", "names.py", "files.py", "profiles.py", "hub.py", "units.py", "lazy.py", "cores.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level and TYPE_CHECKING imports included), as absolute
    names: ``from a.b import c`` yields ``a.b`` and ``a.b.c``, and a package's lazy name (``from edge_runtime import
    Runtime``) also the module that defines it."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import"  # absolute imports keep this check honest
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules | {LAZY_NAMES[m] for m in modules if m in LAZY_NAMES}


def lazy_names(init: Path) -> dict[str, str]:
    """A lazy package's exported names and the modules behind them, as its ``if TYPE_CHECKING:`` block imports them
    (``package.Name`` → ``module``)."""
    package = ".".join(init.relative_to(ROOT).parent.parts)
    names = {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for item in node.body:
                assert isinstance(item, ast.ImportFrom) and item.module is not None, init
                names.update({f"{package}.{alias.name}": item.module for alias in item.names})
    return names


LAZY_NAMES = {name: module for top in ("edge_runtime", "converters") for init in (ROOT / top).rglob("__init__.py")
              for name, module in lazy_names(init).items()}


def violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))


def module_files() -> dict[str, Path]:
    """Every module of edge_runtime and converters by dotted name (a package by its ``__init__``)."""
    files = {}
    for top in ("edge_runtime", "converters"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the project modules it loads when imported or called: each name resolved to the module it is (an
    imported name that is not a module means its module), plus every package ``__init__`` on the way."""
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_modules(path):
            parts = imported.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                prefix = ".".join(parts[:depth])
                if prefix in files:
                    targets.add(prefix)
        targets.discard(name)
        graph[name] = {t for t in targets if not name.startswith(t + ".")}  # a module's own packages load first
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


@pytest.mark.parametrize("half", sorted(FORBIDDEN))
def test_a_half_of_the_package_never_imports_the_others(half: str) -> None:
    modules = sorted((PACKAGE / half).rglob("*.py"))
    assert modules, f"edge_runtime/{half}/ is missing"
    found = {str(m.relative_to(PACKAGE)): violations(m, FORBIDDEN[half]) for m in modules}
    assert {k: v for k, v in found.items() if v} == {}


def test_converters_sit_below_the_runtime() -> None:
    modules = sorted((ROOT / "converters").rglob("*.py"))
    found = {str(m.relative_to(ROOT)): violations(m, CONVERTERS_FORBIDDEN) for m in modules}
    assert {k: v for k, v in found.items() if v} == {}


def test_shared_modules_import_no_half() -> None:
    halves = ("edge_runtime.runtime", "edge_runtime.distribution", "edge_runtime.serve", "edge_runtime.cli",
              "converters")
    modules = [m for name in SHARED
               for m in ([PACKAGE / name] if name.endswith(".py") else sorted((PACKAGE / name).rglob("*.py")))]
    assert len(modules) > len(SHARED)
    found = {str(m.relative_to(PACKAGE)): violations(m, halves) for m in modules}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from edge_runtime.serve.app import create_app\n"
                      "    import edge_runtime.runtime.engine\n")
    assert violations(module, FORBIDDEN["distribution"]) == ["edge_runtime.runtime.engine", "edge_runtime.serve.app",
                                                             "edge_runtime.serve.app.create_app"]


def test_the_check_sees_a_half_reached_through_a_lazy_package_name(tmp_path: Path) -> None:
    module = tmp_path / "sneaky.py"
    module.write_text("from edge_runtime import Runtime, resolve_model\n")
    assert violations(module, FORBIDDEN["distribution"]) == ["edge_runtime.runtime.core", "edge_runtime.runtime.models"]


@pytest.mark.parametrize("init", sorted(str(p.relative_to(ROOT)) for top in ("edge_runtime", "converters")
                                        for p in (ROOT / top).rglob("__init__.py") if "_LAZY" in p.read_text()))
def test_a_lazy_package_exports_what_its_type_checking_block_imports(init: str) -> None:
    path = ROOT / init
    package = ".".join(path.parent.relative_to(ROOT).parts)
    tree = ast.parse(path.read_text())
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in ("_LAZY", "__all__")}
    lazy = {name: module if module.startswith(("edge_runtime.", "converters.")) else f"{package}.{module}"
            for name, module in values["_LAZY"].items()}
    assert {f"{package}.{name}": module for name, module in lazy.items()} == lazy_names(path)
    assert set(values["__all__"]) - {"__version__"} == set(lazy)


def test_the_import_graph_has_no_cycles() -> None:
    files = module_files()
    graph = import_graph(files)
    assert len(graph) > 60 and graph["edge_runtime.serve.app"] >= {"edge_runtime.serve.state"}
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle_through_a_package_init() -> None:
    # a.x imports b.y; b/__init__ imports a.z (which a's __init__ imports): the cycle runs through the inits.
    graph = {"a": {"a.z"}, "a.x": {"b", "b.y"}, "b": {"a", "a.z"}, "b.y": set(), "a.z": set()}
    assert cycles(graph) == []
    graph["a.z"] = {"a.x"}
    assert cycles(graph) == [["a", "a.x", "a.z", "b"]]


def _modules_loaded(code: str, *, block: tuple[str, ...] = ()) -> tuple[int, set[str], str]:
    """Run ``code`` in a fresh interpreter (with ``block`` unimportable) and return its exit code, the modules it
    loaded and its output."""
    script = ("import importlib.abc, json, sys\n"
              "class Block(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path, target=None):\n"
              f"        if name.split('.')[0] in {list(block)!r}:\n"
              "            raise ImportError(f'{name} is blocked for this test')\n"
              "sys.meta_path.insert(0, Block())\n"
              "try:\n"
              + "".join(f"    {line}\n" for line in code.splitlines()) +
              "except SystemExit as exit:\n"
              "    code = exit.code or 0\n"
              "else:\n"
              "    code = 0\n"
              "print('\\nMODULES=' + json.dumps(sorted(sys.modules)))\n"
              "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    output, _, modules = result.stdout.rpartition("\nMODULES=")
    return result.returncode, set(json.loads(modules or "[]")), output + result.stderr


def _top_level(modules: set[str], *names: str) -> set[str]:
    return {m for m in modules if m.split(".")[0] in names}


def test_edge_rt_help_and_plan_run_without_llama_cpp() -> None:
    for argv in (["--help"], ["plan", "--profile", "raspberry-pi-5"], ["plan", "--json"]):
        code, modules, output = _modules_loaded(
            f"from edge_runtime.cli import main\nmain({argv!r}, prog_name='edge-rt')", block=("llama_cpp", "torch"))
        assert code == 0, output
        assert _top_level(modules, "llama_cpp", "torch", "converters", "safetensors") == set(), argv
    assert "memory plan for profile raspberry-pi-5" in _modules_loaded(
        "from edge_runtime.cli import main\nmain(['plan', '--profile', 'raspberry-pi-5'], prog_name='edge-rt')",
        block=("llama_cpp",))[2]


def test_importing_the_cli_loads_no_converter_module() -> None:
    code, modules, output = _modules_loaded("import edge_runtime.cli")
    assert code == 0, output
    assert _top_level(modules, "converters", "safetensors", "llama_cpp", "torch", "aiohttp") == set()


@pytest.mark.parametrize("leaf, others", [
    ("edge_runtime.runtime.plan", ("edge_runtime.distribution", "edge_runtime.serve", "llama_cpp", "converters")),
    ("edge_runtime.distribution.manifest", ("edge_runtime.runtime", "edge_runtime.serve", "llama_cpp")),
    ("edge_runtime.gguf.info", ("edge_runtime.runtime", "edge_runtime.distribution", "llama_cpp")),
    ("converters.peft_adapter", ("edge_runtime.runtime", "edge_runtime.distribution", "llama_cpp")),
    ("edge_runtime.serve.openai_api", ("edge_runtime.distribution", "llama_cpp", "aiohttp")),
])
def test_a_leaf_loads_only_what_it_needs(leaf: str, others: tuple[str, ...]) -> None:
    code, modules, output = _modules_loaded(f"import {leaf}")
    assert code == 0, output
    assert leaf in modules
    assert sorted(m for m in modules if any(m == o or m.startswith(o + ".") for o in others)) == []
