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


def _runtime_imports(path: Path) -> set[str]:
    """Modules of ours ``path`` imports when it runs, at any depth (a function's lazy import
    counts: it runs when the function does); imports under ``if TYPE_CHECKING:`` are
    annotations only and never run."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in OURS}


def test_no_import_cycles() -> None:
    """No module of ours imports, through any chain of runtime imports, itself: the layers
    and the modules within each layer form a DAG (graph.ir and graph.drawing, the scheduler
    and annotate, cupy_backend and the cuda_* compilers once formed cycles)."""
    files = [p for pkg in ALLOWED for p in _files(pkg)]
    modules = {_module_name(p): p for p in files}
    edges = {
        m: {d for d in _runtime_imports(p) if d in modules and d != m} for m, p in modules.items()
    }
    # a package's __init__ importing its own submodules is how a package exposes them
    for m in edges:
        edges[m] = {
            d for d in edges[m] if not (d.startswith(m + ".") and modules[m].name == "__init__.py")
        }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


ENGINE_LAYERS = {  # what each part of engine/ may import of engine/
    "engine.passes": {"engine.options", "engine.passes"},
    "engine.views": {"engine.options", "engine.passes", "engine.views"},
    "engine.runtime": {
        "engine.options",
        "engine.cache",
        "engine.passes",
        "engine.views",
        "engine.runtime",
    },
}


@pytest.mark.parametrize("part", list(ENGINE_LAYERS))
def test_engine_layers_import_downward(part: str) -> None:
    """The planning passes never reach the runtime or the model layer, the runtime never the
    model layer: plans are made without anything that runs them."""
    bad = []
    for path in _files(part.replace(".", "/")):
        for mod in sorted(_runtime_imports(path)):
            if mod.startswith("engine.") and not any(
                mod == a or mod.startswith(a + ".") for a in ENGINE_LAYERS[part]
            ):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)
