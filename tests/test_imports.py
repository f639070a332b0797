"""Import direction: graph <- backends <- engine <- tools, read from the source with ``ast``.

graph/ imports nothing of ours but graph; backends/ only graph and backends; engine/ only graph,
backends and engine, and never a concrete backend module (it goes through the registry); tools/
may import everything. Only backends/ may import CuPy. Importing ``graph`` pulls in no heavy
optional library.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"graph", "backends", "engine", "tools", "tests"}
ALLOWED = {
    "graph": {"graph"},
    "backends": {"graph", "backends"},
    "engine": {"graph", "backends", "engine"},
    "tools": {"graph", "backends", "engine", "tools"},
}
CONCRETE_BACKENDS = {"backends.numpy_backend", "backends.cupy_backend"}
HEAVY = ["cupy", "torch", "transformers", "gguf"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    here = _module_name(path)
    return imports_in(path.read_text(encoding="utf-8"), here, path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in ``source``, at any depth (functions included).

    ``from pkg import name`` counts as importing ``pkg`` and ``pkg.name`` (it may be a module);
    relative imports are resolved against the package of ``module``.
    """
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
    return out


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_the_packages_exist() -> None:
    for pkg in ("graph", "backends", "engine"):
        assert _files(pkg), f"no Python files under {pkg}/"


@pytest.mark.parametrize("pkg", list(ALLOWED))
def test_import_direction(pkg: str) -> None:
    bad = []
    for path in _files(pkg):
        for line, mod in imported_modules(path):
            top = mod.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {mod}"
            if top in OURS and top not in ALLOWED[pkg]:
                bad.append(where)
            if pkg == "engine" and any(
                mod == c or mod.startswith(c + ".") for c in CONCRETE_BACKENDS
            ):
                bad.append(where + " (a concrete backend: use backends.get_backend)")
            if top == "cupy" and pkg != "backends":
                bad.append(where + " (only backends/ may import CuPy)")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_nested_and_from_imports() -> None:
    src = (
        "import os\nfrom . import sibling\nfrom ..backends import numpy_backend\n"
        "def f():\n    import cupy as cp\n    from backends import cupy_backend\n"
    )
    mods = {m for _, m in imports_in(src, "engine.probe")}
    assert {
        "os",
        "engine.sibling",
        "backends.numpy_backend",
        "cupy",
        "backends.cupy_backend",
    } <= mods
    assert {m for _, m in imports_in("from . import ir", "graph", is_package=True)} >= {"graph.ir"}


@pytest.mark.parametrize("module", ["graph", "engine", "backends"])
def test_importing_pulls_in_no_heavy_optional_library(module: str) -> None:
    code = (
        f"import sys, json; import {module}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [], f"import {module} loaded {out.stdout}"
