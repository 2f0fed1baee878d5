"""The package's layout holds: the device runtime and distribution never import each other or the daemon."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edge_runtime"
FORBIDDEN = {"runtime": ("edge_runtime.distribution", "edge_runtime.serve"),
             "distribution": ("edge_runtime.runtime", "edge_runtime.serve"),
             "gguf": ("edge_runtime.runtime", "edge_runtime.distribution", "edge_runtime.serve")}
SHARED = ["errors", "settings.py", "names.py", "files.py", "profiles.py", "hub.py"]
MAX_MODULE_LINES = 450


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included), as absolute names."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import"  # absolute imports keep this check honest
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("half", sorted(FORBIDDEN))
def test_a_half_of_the_package_never_imports_the_others(half: str) -> None:
    modules = sorted((PACKAGE / half).glob("*.py"))
    assert modules, f"edge_runtime/{half}/ is missing"
    found = {str(m.relative_to(PACKAGE)): violations(m, FORBIDDEN[half]) for m in modules}
    assert {k: v for k, v in found.items() if v} == {}


def test_shared_modules_import_no_half() -> None:
    halves = ("edge_runtime.runtime", "edge_runtime.distribution", "edge_runtime.serve")
    modules = [m for name in SHARED
               for m in ([PACKAGE / name] if name.endswith(".py") else sorted((PACKAGE / name).glob("*.py")))]
    assert len(modules) > len(SHARED)
    found = {str(m.relative_to(PACKAGE)): violations(m, halves) for m in modules}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from edge_runtime.serve.app import create_app\n"
                      "    import edge_runtime.runtime.engine\n")
    assert violations(module, FORBIDDEN["distribution"]) == ["edge_runtime.runtime.engine", "edge_runtime.serve.app",
                                                             "edge_runtime.serve.app.create_app"]


def test_no_module_grows_past_one_concept() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > MAX_MODULE_LINES} == {}
