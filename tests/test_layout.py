"""The package's layers: imports point downward only, and no module imports one that imports it back."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lower layers first; a module may import its own layer and those before it.
LAYERS = [
    ("polychat.errors", "polychat.generation", "polychat.protocols", "polychat.retry"),
    ("polychat.providers",),
    ("polychat.client", "polychat"),
    ("polychat.server.store",),
    ("polychat.server.shared",),
    ("polychat.server.gateway",),
    ("polychat.server.faces",),
    ("polychat.server.app", "polychat.server"),
    ("polychat.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The polychat modules a file imports at its top level (imports inside functions are deliberate late ones)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polychat"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("polychat"))
    return found


def layer(module: str) -> int:
    best = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = index, len(prefix)
    assert best[0] >= 0, module
    return best[0]


GRAPH = {module_name(path): imports(path) for path in SRC.rglob("*.py")}


def test_imports_point_downward() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(module) and not (module == "polychat" and target.startswith("polychat.providers"))
    ]
    assert upward == []


def test_faces_do_not_import_each_other() -> None:
    shared = {"polychat.server.faces.sessions", "polychat.server.faces.vendor"}
    # The Gravityengine route is OpenAI's API under another prefix: it serves the OpenAI face's handlers.
    # (So do the OpenAI face's other endpoints, in modules of their own.)
    builds_on = {
        (f"polychat.server.faces.{module}", "polychat.server.faces.openai")
        for module in ("gravityengine", "completions", "embeddings")
    }

    def face(module: str) -> str:
        """The face a module belongs to (a face package's modules are one face)."""
        return module.split(".")[3]

    crossing = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.startswith("polychat.server.faces.")
        for target in targets
        if target.startswith("polychat.server.faces.")
        and target not in shared
        and face(target) != face(module)
        and (module, target) not in builds_on
    ]
    assert crossing == []


def test_no_import_cycle() -> None:
    def resolve(target: str) -> str:
        return target if target in GRAPH else target.rsplit(".", 1)[0]

    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(resolve(t) for t in GRAPH.get(module, ())):
            if target not in GRAPH or target == module:
                continue
            if seen.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [module, target])
            elif target not in seen:
                visit(target, [*path, target])
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module, [module])
    # A package's __init__ that re-exports its modules is not a cycle of logic.
    real = [cycle for cycle in cycles if not any(b.startswith(a + ".") for a, b in itertools.pairwise(cycle))]
    assert real == []
