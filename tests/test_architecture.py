"""The layout the architecture promises, checked on the source (AST), not on trust.

- no import circle between the package's modules (imports inside functions count too: a lazy
  import that closes a circle is still a circle);
- no private name (``_x``) imported from another module: what several modules need is public;
- no ``a.py`` beside ``a_fx.py`` (a family or pass written twice, once per IR);
- one module per adapter family under ``zflora_compile/families/``, each with its pattern and check
  (``detect``), and every kind of site record planned, emitted and disabled by one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import zflora_compile
from zflora_compile import families
from zflora_compile.graph.records import AdapterSite, GroupedSite, LinearSite, RuntimeSite, WidenedSite

PACKAGE = Path(zflora_compile.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import of a package module in ``name``'s source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("zflora_compile")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("zflora_compile"):
                names = [a.name for a in node.names]
                submodules = [n for n in names if f"{base}.{n}" in MODULES]
                found += [(f"{base}.{n}", []) for n in submodules]
                found.append((base, [n for n in names if n not in submodules]))
    return [(module, names) for module, names in found if module in MODULES]


def test_no_import_circle():
    graph = {name: {module for module, _ in _imports(name) if module != name} for name in MODULES}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_is_imported_from_another_module():
    offences = [
        f"{name} imports {module}.{n}"
        for name in MODULES
        for module, names in _imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__") and module != name
    ]
    assert not offences, offences


def test_no_module_is_written_twice_once_per_ir():
    stems = {p.with_suffix("") for p in PACKAGE.rglob("*.py")}
    twins = [str(s) for s in stems if s.with_name(s.name + "_fx") in stems or s.with_name(s.name + "_onnx") in stems]
    assert not twins, twins


def test_one_module_per_family_and_one_planner_per_site_kind():
    family_files = sorted(p.stem for p in (PACKAGE / "families").glob("*.py") if p.stem != "__init__")
    registered = sorted(f.__name__.rpartition(".")[2] for f in families.FAMILIES)
    shared = sorted(m.__name__.rpartition(".")[2] for m in set(families.PLANNERS.values()) - set(families.FAMILIES))
    assert family_files == sorted(registered + shared), "every module under families/ is a registered family or a shared rewrite"
    for family in families.FAMILIES:
        assert callable(family.detect) and family.__doc__ and "Pattern" in family.__doc__, family.__name__
    assert set(families.PLANNERS) == {AdapterSite, WidenedSite, GroupedSite, LinearSite, RuntimeSite}
    for module in families.PLANNERS.values():
        assert callable(module.plan) and callable(module.disable)
