"""The import layering of the package (docs/ARCHITECTURE.md): the core never imports the application layer
``guidelab.app``, and no two modules import each other, directly or around a loop. Every import counts:
module level and inside functions (lazy imports), relative ones resolved; importing ``a.b.c`` also
imports the package ``a.b`` (its ``__init__`` runs first), except the root ``guidelab``."""

import ast
from pathlib import Path

import guidelab

SRC = Path(guidelab.__file__).parent
APP = ("guidelab.app", "guidelab.__main__")  # the application layer and the `python -m guidelab` entry point


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("guidelab",) + path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, known) -> str:
    """The longest known module that ``name`` names (``guidelab.a.b.func`` -> ``guidelab.a.b``)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _with_packages(target: str, source: str) -> list[str]:
    """``target`` and the packages that importing it runs first (``a.b.c`` runs ``a.b``), except the root
    ``guidelab`` (the facade that imports everything) and the packages ``source`` itself sits in."""
    parts = target.split(".")
    pkgs = [".".join(parts[:i]) for i in range(2, len(parts))]
    return [target] + [p for p in pkgs if not source.startswith(p + ".")]


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the guidelab modules it imports (an imported name that is a module counts as that module)."""
    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {_resolve(n, modules) for n in names if n == "guidelab" or n.startswith("guidelab.")}
        graph[mod] = {p for d in deps for p in _with_packages(d, mod)} - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component of more than one module."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for u in sorted(graph.get(v, ())):
            if u not in index:
                visit(u)
                low[v] = min(low[v], low[u])
            elif u in on:
                low[v] = min(low[v], index[u])
        if low[v] == index[v]:
            comp = set()
            while True:
                u = stack.pop()
                on.discard(u)
                comp.add(u)
                if u == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # shortest loops until every module of the component is on one
        left = set(comp)
        while left:
            loop = _loop(graph, min(left), comp)
            out.append(loop)
            left -= set(loop)
    return out


def _loop(graph, start: str, comp: set[str]) -> list[str]:
    """A shortest loop from ``start`` back to itself inside ``comp`` (breadth first)."""
    paths, seen = [[start]], {start}
    while True:
        path = paths.pop(0)
        nxt = sorted(graph[path[-1]] & comp)
        if start in nxt:
            return path + [start]
        for u in nxt:
            if u not in seen:
                seen.add(u)
                paths.append(path + [u])


def _is_app(mod: str) -> bool:
    return any(mod == a or mod.startswith(a + ".") for a in APP)


def test_core_never_imports_the_application_layer():
    graph = imports(_modules())
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if not _is_app(m) for d in deps if _is_app(d))
    assert not bad, "core modules import guidelab.app:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(imports(_modules()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_see_lazy_relative_imports_and_cycles():
    # a relative import inside a function, resolved; a module imported as a name of its package
    graph = {"guidelab.a": {"guidelab.b"}, "guidelab.b": {"guidelab.c"}, "guidelab.c": {"guidelab.a"}, "guidelab.d": set()}
    assert cycles(graph) == [["guidelab.a", "guidelab.b", "guidelab.c", "guidelab.a"]]
    mods = _modules()
    graph = imports(mods)
    assert "guidelab.guidance.registry" in graph["guidelab.training.distill"]  # from ..guidance import registry
    assert "guidelab.app.cli" in graph["guidelab.__main__"]
