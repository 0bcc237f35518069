"""The layout's rules, read from the imports (``ast``): what each folder may import.

README's "Where things are" says it in words. Cycles are checked on module-level imports, those
under ``if TYPE_CHECKING:`` included (a type-only loop is still a loop for a reader); the arrows
between folders on every import, a function's own included (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "helpline"

# Folder -> the folders (besides itself) it may import. ``None``: anything.
MAY_IMPORT: dict[str, set[str] | None] = {
    "config": set(),
    "store": {"config"},
    "runtime": {"config", "store"},
    "delivery": {"config", "store", "runtime"},
    "domain": {"config", "store", "runtime", "delivery"},
    "routing": {"config", "store", "runtime", "delivery", "domain"},
    "api": {"config", "store", "runtime", "delivery", "domain", "routing"},
    "console": set(),
    "testing": None,
}
# Top-level modules (helpline/<name>.py) and what they may import.
TOP_LEVEL: dict[str, set[str]] = {
    "app": {"config", "store", "runtime", "delivery", "domain", "routing", "api", "console", "worker"},
    "worker": {"config", "store", "runtime", "delivery", "domain", "routing"},
    "cli": {"config", "store", "runtime", "delivery", "domain", "routing", "app", "worker", "testing"},
}
WEB_FRAMEWORKS = ("fastapi", "starlette", "uvicorn")


@dataclass(frozen=True)
class Import:
    importer: str  # helpline.domain.inbound
    imported: str  # helpline.runtime.core (a module of ours) or fastapi.x (another package)
    line: int
    module_level: bool  # False: inside a function


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of(name: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"

    def walk(node: ast.AST, module_level: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(name, alias.name, child.lineno, module_level)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(name, is_package, child)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    yield Import(name, full if full in MODULES else base, child.lineno, module_level)
            yield from walk(child, inner)

    yield from walk(tree, True)


IMPORTS = [imp for name, path in sorted(MODULES.items()) for imp in _imports_of(name, path)]


def _ours(module: str) -> str | None:
    """The module of ours that ``module`` names (``helpline.x.y`` or a package of ours), else None."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module if module.startswith(PACKAGE + ".") or module == PACKAGE else None


def _room(module: str) -> str:
    """``helpline.domain.inbound`` -> ``domain``; ``helpline.app`` -> ``app``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_scan_sees_the_package() -> None:
    # Guards the rules below against passing on nothing.
    assert "helpline.domain.inbound" in MODULES and "helpline.runtime.core" in MODULES
    assert any(i.importer == "helpline.app" and i.imported.startswith("helpline.api") for i in IMPORTS)
    assert any(not i.module_level for i in IMPORTS)  # the CLI's lazy imports


def test_no_import_loop() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        target = _ours(imp.imported)
        if imp.module_level and target is not None and target != imp.importer:
            graph[imp.importer].add(target)
    # A package's __init__ importing its own modules is not a loop with them.
    loops: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loops.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops)


def _arrow_allowed(importer: str, imported: str) -> bool:
    src, dst = _room(importer), _room(imported)
    if src == dst or dst == "":
        return True
    if src in TOP_LEVEL:
        return dst in TOP_LEVEL[src]
    allowed = MAY_IMPORT.get(src, set())
    return allowed is None or dst in allowed


def test_every_arrow_points_down() -> None:
    wrong = [
        f"{i.importer}:{i.line} imports {target}"
        for i in IMPORTS
        if (target := _ours(i.imported)) is not None and not _arrow_allowed(i.importer, target)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("room", ["domain", "routing", "store", "delivery", "config", "runtime"])
def test_the_core_never_imports_the_web_layer(room: str) -> None:
    wrong = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if _room(i.importer) == room
        and (
            _room(_ours(i.imported) or "") == "api"
            or (room in ("domain", "routing") and i.imported.split(".")[0] in WEB_FRAMEWORKS)
        )
    ]
    assert not wrong, "\n".join(wrong)


def test_only_testing_and_the_cli_import_the_fakes() -> None:
    wrong = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if _room(_ours(i.imported) or "") == "testing" and _room(i.importer) not in ("testing", "cli")
    ]
    assert not wrong, "\n".join(wrong)


def test_delivery_never_imports_the_rules() -> None:
    wrong = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if _room(i.importer) == "delivery" and _room(_ours(i.imported) or "") in ("domain", "routing", "api")
    ]
    assert not wrong, "\n".join(wrong)


def test_a_forbidden_arrow_is_caught() -> None:
    # The rules' own check, on made-up arrows: a loop and an upward import are both refused.
    assert not _arrow_allowed("helpline.delivery.outbox", "helpline.domain.outbox")
    assert not _arrow_allowed("helpline.domain.inbound", "helpline.api.openchs")
    assert not _arrow_allowed("helpline.config.sites", "helpline.runtime.core")
    assert _arrow_allowed("helpline.domain.outbox", "helpline.delivery.rapidpro")
    assert _arrow_allowed("helpline.cli", "helpline.testing.demo")
