"""The package arrows of DESIGN.md, and no import cycle between lorad's modules.

daemon → (adapters, trainer, ota); trainer → adapters; ota → adapters; adapters imports
none of the others. Imports inside functions count too: they hide a cycle, not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("adapters", "trainer", "ota", "daemon")
ALLOWED = {
    "adapters": set(),
    "trainer": {"adapters"},
    "ota": {"adapters"},
    "daemon": {"adapters", "trainer", "ota"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["lorad", *parts])


def _package(module: str) -> str:
    """``lorad.trainer.run`` → ``trainer``."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    """module → the lorad modules it imports (``from x import y`` counts y when y is a module)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def test_package_arrows_follow_the_design() -> None:
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _imports().items()
        for dep in deps
        if _package(dep) != _package(mod) and _package(dep) not in ALLOWED[_package(mod)]
    )
    assert not wrong, wrong


def test_no_import_cycle() -> None:
    graph = _imports()
    # A package's __init__ re-exporting its modules is not a cycle of the code: leave those edges out.
    graph = {m: {d for d in deps if not (d.startswith(m + ".") and (REPO / m.removeprefix("lorad.").replace(".", "/") / "__init__.py").exists())}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d):], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "lorad.daemon.config" in graph and graph["lorad.daemon.config"] >= {"lorad.adapters.config", "lorad.trainer.config", "lorad.ota.config"}
