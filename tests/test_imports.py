"""Package structure (issue 15): no import cycles between ctsdk's modules/subpackages and no
private names imported across subpackages. Read from the source with ``ast`` (module-level and
function-level imports alike), so a lazy import inside a function counts too."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

from conftest import REPO

#: import name -> source folder (pyproject's package-dir)
ROOTS = {"sdk": "sdk", "sdk.export": "export", "sdk.kernels": "kernels", "sdk.calibration": "calibration"}


def _modules() -> Dict[str, Tuple[Path, bool]]:
    mods: Dict[str, Tuple[Path, bool]] = {}
    for pkg, folder in ROOTS.items():
        for f in (REPO / folder).rglob("*.py"):
            parts = list(f.relative_to(REPO / folder).with_suffix("").parts)
            init = parts[-1] == "__init__"
            if init:
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = (f, init)
    return mods


def _unit(module: str) -> str:
    """The unit a cycle is counted between: ``sdk.<first component>`` (a subpackage or module)."""
    return ".".join(module.split(".")[:2])


def _imports(mods: Dict[str, Tuple[Path, bool]]) -> List[Tuple[str, str, str]]:
    """(importing module, imported module, imported name or "") for every intra-package import."""
    out = []
    for name, (f, init) in mods.items():
        base = name if init else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    parts = parts[:len(parts) - (node.level - 1)]
                    mod = ".".join(parts + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    if sub in mods:
                        out.append((name, sub, ""))
                    elif mod in mods:
                        out.append((name, mod, alias.name))
            elif isinstance(node, ast.Import):
                out += [(name, a.name, "") for a in node.names if a.name in mods]
    return out


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    g = defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert _cycles(g) == [["a", "b", "c"]]
    assert _cycles(defaultdict(set, {"a": {"b"}, "b": set()})) == []


def test_no_import_cycles_between_subpackages():
    mods = _modules()
    assert "sdk.triage" in mods and "sdk.export.onnx" in mods and "sdk.runtime.registry" in mods
    graph: Dict[str, Set[str]] = defaultdict(set)
    edges: Dict[Tuple[str, str], List[str]] = defaultdict(list)
    for src, dst, _ in _imports(mods):
        if _unit(src) != _unit(dst):
            graph[_unit(src)].add(_unit(dst))
            edges[(_unit(src), _unit(dst))].append(f"{src} -> {dst}")
    cycles = _cycles(graph)
    detail = [e for c in cycles for a in c for b in c if (a, b) in edges for e in edges[(a, b)]]
    assert not cycles, f"import cycles {cycles}: {detail}"


def test_no_private_names_imported_across_subpackages():
    bad = [f"{src} imports {dst}.{obj}" for src, dst, obj in _imports(_modules())
           if obj.startswith("_") and not obj.startswith("__") and _unit(src) != _unit(dst)]
    assert not bad, bad
