"""The shape of the package, kept true by tests: small modules, short functions, no import cycles, imports at the
top (``docs/architecture.md``, "House rules", names the exceptions and why they stay)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fusedit"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60

#: Modules allowed past MAX_MODULE_LINES, with the reason (repeated in docs/architecture.md).
LONG_MODULES: dict[str, str] = {}
#: Functions allowed past MAX_FUNCTION_LINES (qualified names), with the reason.
LONG_FUNCTIONS: dict[str, str] = {}
#: Modules that may import fusedit modules inside functions: the command layer (each command imports its
#: implementation when it runs, so `fusedit --help` does not load torch), the package root (``import fusedit`` stays
#: light).
LAZY_IMPORTERS = {"fusedit"}
LAZY_PACKAGES = ("fusedit.commands",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def runtime_imports(tree: ast.Module, name: str, is_package: bool) -> list[tuple[str, bool]]:
    """``(imported fusedit module, inside a function)`` for every import outside ``if TYPE_CHECKING:``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names if alias.name.startswith("fusedit"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(anchor[: len(anchor) - child.level + 1] + ([base] if base else []))
                if base.startswith("fusedit"):
                    for alias in child.names:  # `from package import module` imports the module
                        full = f"{base}.{alias.name}"
                        found.append((full if full in MODULES else base, nested))
            visit(child, nested)

    visit(tree, False)
    return found


GRAPH = {
    name: runtime_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
    for name, path in MODULES.items()
}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    edges = {name: {target for target, _ in imports if target != name} for name, imports in GRAPH.items()}
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges) or [])}"


def test_the_cycle_finder_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(planted) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_modules_import_fusedit_at_the_top():
    lazy = {
        name: sorted({t for t, nested in imports if nested})
        for name, imports in GRAPH.items()
        if name not in LAZY_IMPORTERS and not any(name == p or name.startswith(p + ".") for p in LAZY_PACKAGES)
    }
    assert {name: targets for name, targets in lazy.items() if targets} == {}


def test_modules_are_short():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    too_long = {name: n for name, n in long.items() if n > MAX_MODULE_LINES and name not in LONG_MODULES}
    assert too_long == {}


def function_lengths() -> dict[str, int]:
    lengths = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    owner = f".{node.name}" if isinstance(node, ast.ClassDef) else ""
                    lengths[f"{name}{owner}.{child.name}"] = child.end_lineno - child.lineno + 1
    return lengths


def test_functions_are_short():
    too_long = {
        name: n for name, n in function_lengths().items() if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS
    }
    assert too_long == {}


@pytest.mark.parametrize("name", sorted(LONG_MODULES))
def test_long_modules_still_need_their_exception(name):
    assert len(MODULES[name].read_text().splitlines()) > MAX_MODULE_LINES, f"{name} is short now: drop it"


@pytest.mark.parametrize("name", sorted(LONG_FUNCTIONS))
def test_long_functions_still_need_their_exception(name):
    assert function_lengths()[name] > MAX_FUNCTION_LINES, f"{name} is short now: drop it"
