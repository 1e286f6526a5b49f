"""The layers hold: every import in the four packages, read with ``ast`` (imports inside
functions and under ``if TYPE_CHECKING:`` count: each is still a dependency), obeys the layer
rules of ARCHITECTURE.md, no two modules depend on each other in a circle, and no file is over
500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
#: package -> packages it may not import.
FORBIDDEN = {
    "common": {"client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
    "simulations": set(),
}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
}


def _resolve(name: str) -> str | None:
    """The module of ours ``name`` is, or is inside (``server.app.app`` -> ``server.app``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for each import of ours in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod.
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES and (target := _resolve(name)) is not None:
                found.append((target, node.lineno))
    return found


def test_no_package_imports_a_layer_above_it_or_beside_it() -> None:
    bad = [
        f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}"
        for module in MODULES
        for target, line in imports(module)
        if target.split(".")[0] in FORBIDDEN[module.split(".")[0]]
    ]
    assert not bad, "imports against the layers (ARCHITECTURE.md):\n" + "\n".join(bad)


def _circles() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {module: {t for t, _ in imports(module) if t != module} for module in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for module in graph:
        if module not in index:
            visit(module)
    return components


def test_no_modules_import_each_other_in_a_circle() -> None:
    circles = [" <-> ".join(sorted(c)) for c in _circles()]
    assert not circles, "import circles (move the shared type down a module):\n" + "\n".join(
        circles
    )


def test_no_module_is_over_500_lines() -> None:
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in MODULES.values()
    }
    long = sorted(f"{name}: {n} lines" for name, n in lengths.items() if n > MAX_LINES)
    assert not long, f"files over {MAX_LINES} lines (split by role):\n" + "\n".join(long)


def test_the_import_reader_sees_imports_in_functions_and_typing_blocks() -> None:
    """The reader must not miss an import in a function or under ``TYPE_CHECKING``."""
    found = {target for target, _ in imports("server.commands")}
    assert {"server.coordinator", "server.report_command", "common.cli"} <= found
    # common.tasks.base names the synthetic generator's type under TYPE_CHECKING only.
    assert "common.synthetic" in {target for target, _ in imports("common.tasks.base")}
