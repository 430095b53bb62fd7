"""The package's layout rules (docs/architecture.md), read from the source with ``ast``: no import cycle among
the modules' top-level imports, and no private (``_x``) name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gere_plugin"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement of ``module`` names."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _with_packages(name: str, targets: set[str], modules: dict[str, Path]) -> set[str]:
    """``targets`` and the packages above each (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``
    first), except the packages above ``name`` itself, which are already being imported when it runs."""
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    out = set(targets)
    for target in targets:
        parts = target.split(".")
        out |= {p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules and p not in own}
    return out


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run at import time: the body, with the bodies of top-level ``try`` / ``if`` blocks
    (``if TYPE_CHECKING:`` blocks, which never run, left out)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.Try):
            out += _top_level(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                out += _top_level(node.body + node.orelse)
        else:
            out.append(node)
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules its top-level statements import, packages above them included
    (function-local imports, which run late on purpose, are left out)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _top_level(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.ImportFrom):
                target = _target(name, path, node)
                deps |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = _with_packages(name, deps, modules) - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, each as the list of modules around it (empty: none)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_cycle_finder_sees_a_cycle_and_a_clean_chain():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    modules = {n: Path() for n in ("p", "p.a", "p.b", "q", "q.c")}
    # importing q.c from p.a runs q/__init__ too; p/__init__ is already running when p.a is imported
    assert _with_packages("p.a", {"q.c", "p.b"}, modules) == {"q.c", "q", "p.b"}


def test_no_import_cycle_among_top_level_imports():
    modules = _modules()
    assert "gere_plugin.assets.tasks" in modules and "gere_plugin.trainer.step" in modules
    cycles = find_cycles(import_graph(modules))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{name}:{node.lineno} imports {a.name} from {node.module or '.'}"
                              for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == [], "\n".join(offenders)
