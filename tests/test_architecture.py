"""The layout is the architecture: each folder is one layer, and imports only go down.

Every import of every module counts, the ones inside functions too (that is where cycles hide):

    core (building blocks)  <  kernels  <  lm  <  retrievers  <  compressors, cache_store  <  apps  <  cli

`core/api.py` (and the package `__init__` that re-exports it) is the public facade: it may reach every library
layer, nothing reaches it from below. There is no import cycle between modules at all.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"ctxc": 0, "ctxc.kernels": 1, "ctxc.lm": 2, "ctxc.retrievers": 3, "ctxc.compressors": 4,
          "ctxc.cache_store": 4, "ctxc.apps": 5, "ctxc.cli": 6}
FACADE = {"ctxc.api", "ctxc"}


def _modules() -> dict[str, Path]:
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for pkg, folder in dirs.items():
        for f in sorted((ROOT / folder).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _package(mod: str, modules: dict) -> str:
    return mod if mod in LAYERS and modules[mod].stem == "__init__" else mod.rsplit(".", 1)[0]


def _imports(mod: str, path: Path, modules: dict) -> set[str]:
    """ctxc modules `mod` imports anywhere in its body (relative imports resolved)."""
    pkg = _package(mod, modules)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import module` imports the module; `from pkg import name` imports pkg
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            names = subs if len(subs) == len(node.names) else [base] + subs
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != mod:
                out.add(n)
    return out


def _layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_imports_only_go_down():
    modules = _modules()
    wrong = []
    for mod, path in modules.items():
        if mod in FACADE:
            continue
        for dep in _imports(mod, path, modules):
            if dep in FACADE and _layer(mod) < LAYERS["ctxc.apps"]:
                wrong.append(f"{mod} -> {dep} (the public facade, from inside the library)")
            elif dep not in FACADE and _layer(dep) > _layer(mod):
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) - {"ctxc"} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_library_never_writes_the_environment():
    """Settings travel as a Settings object; only the process owners (the CLI's main, batch workers, the local Ray
    instance) set process-wide variables, through `ctxc.lm.hw.tune_process` and the Ray launcher."""
    allowed = {"ctxc.lm.hw": "tune_process", "ctxc.apps.batch": "_LocalRay"}
    modules = _modules()
    found = []
    for mod, path in modules.items():
        src = path.read_text()
        for needle in ("os.environ[", "os.environ.setdefault", "os.environ.update", "os.putenv"):
            if needle in src and (mod not in allowed or allowed[mod] not in src):
                found.append(f"{mod}: {needle}")
    assert not found, found


def test_source_tree_method_table_is_pyproject_s():
    """Running from a source tree, the registry reads its own copy of the entry-point table: it must not drift."""
    from ctxc.compressors.registry import _SOURCE_TREE

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["ctxc.compressors"]
    assert _SOURCE_TREE == declared
