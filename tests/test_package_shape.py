"""The package's shape, guarded: every module is named in its package's docstring, the root's lazy exports agree
with its typing imports, and no import runs back up the floors of the package nor closes a circle.

All by reading the source (``ast``), importing nothing: a module added without a word in its package's docstring,
a name exported without its typing import, or an import from a higher floor fails here with the names at fault.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import automodel_plugins

PACKAGE = Path(automodel_plugins.__file__).parent
FLOORS = (
    ("errors", "_version", "progress"),
    ("registry",),
    ("sources",),
    ("checkpoint",),
    ("fp8",),
    ("adapters",),
    ("ops",),
    ("model",),
    ("pipeline",),
    ("", "cli", "testing", "integrations"),  # "": the package root, whose lazy exports reach every floor
)
"""Bottom to top, as the root's docstring lists them: a module imports only from its own floor or below."""


def _modules() -> dict[str, Path]:
    """Every module and package of automodel_plugins by dotted name (``automodel_plugins.pipeline.load``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run (at module level or inside a function); ``if TYPE_CHECKING:`` bodies
    only inform the type checker and are left out."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def _imports_of(name: str, path: Path) -> set[str]:
    """The modules of automodel_plugins that ``name`` imports when it runs (a ``from package import module``
    counts as the module, not the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            candidates = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        targets.update(target for target in candidates if target in MODULES and target != name)
    return targets


IMPORTS = {name: _imports_of(name, path) for name, path in MODULES.items()}


def _floor(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(
        f"{name}: on no floor of FLOORS; add its folder to FLOORS and to the root's docstring"
    )


def test_every_module_stands_on_a_floor() -> None:
    for name in MODULES:
        _floor(name)


def test_no_import_runs_back_up_the_floors() -> None:
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in IMPORTS.items()
        for target in targets
        if _floor(target) > _floor(name)
    )
    assert upward == [], "imports from a higher floor:\n" + "\n".join(upward)


def _circles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(IMPORTS[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(MODULES):
        if name not in index:
            visit(name)
    return circles


def test_no_two_modules_import_each_other() -> None:
    assert _circles() == []


def test_the_guards_see_an_upward_import_and_a_circle() -> None:
    """The checks above can fail: the import graph as read names sources' own imports, and a made-up edge from
    sources back to the pipeline is both upward and, with the pipeline's import of sources, a circle."""
    assert "automodel_plugins.sources.location" in IMPORTS["automodel_plugins.sources.hub"]
    assert _floor("automodel_plugins.pipeline.load.load") > _floor("automodel_plugins.sources.resolve")
    IMPORTS["automodel_plugins.sources.resolve"].add("automodel_plugins.pipeline.load.load")
    try:
        assert any("automodel_plugins.sources.resolve" in circle for circle in _circles())
    finally:
        IMPORTS["automodel_plugins.sources.resolve"].discard("automodel_plugins.pipeline.load.load")


PACKAGES = sorted(name for name, path in MODULES.items() if path.name == "__init__.py")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_named_in_its_package_docstring(package: str) -> None:
    """A newcomer reads a package's docstring to find the room for a job: each module (and sub-package) must
    be in it, as ``name`` (or ``name/`` for a folder of the root)."""
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text(encoding="utf-8"))) or ""
    children = sorted(
        name.rpartition(".")[2]
        for name in MODULES
        if name.rpartition(".")[0] == package and name.rpartition(".")[2] != "__main__"
    )
    missing = [
        child
        for child in children
        if f"``{child}``" not in doc and not re.search(rf"^\s*{child}/", doc, re.M)
    ]
    assert missing == [], f"{package}'s docstring does not name: {', '.join(missing)}"


def _root() -> ast.Module:
    return ast.parse(MODULES["automodel_plugins"].read_text(encoding="utf-8"))


def test_lazy_exports_match_the_typing_imports() -> None:
    """``_LAZY`` (name -> module, what runs) and the ``if TYPE_CHECKING:`` imports (what a type checker and an
    IDE see) must name the same names from the same modules; ``__all__`` is derived from ``_LAZY``."""
    root = _root()
    lazy = next(
        node.value
        for node in root.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets)
    )
    declared = {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(lazy.keys, lazy.values, strict=True)}
    typing_block = next(
        node for node in root.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    )
    typed = {
        alias.asname or alias.name: statement.module
        for statement in typing_block.body
        if isinstance(statement, ast.ImportFrom)
        for alias in statement.names
    }
    assert typed == declared


def test_every_export_resolves_and_all_lists_each_once() -> None:
    names = automodel_plugins.__all__
    assert len(names) == len(set(names))
    assert set(automodel_plugins._LAZY) <= set(names)
    for name in names:
        assert getattr(automodel_plugins, name) is not None, name


def test_the_registry_doc_lists_every_fixture_of_the_kit() -> None:
    """``docs/registry.md`` is where a plugin author looks the fixtures up: all of them, each by name."""
    tree = ast.parse((PACKAGE / "testing" / "pytest_plugin.py").read_text(encoding="utf-8"))
    fixtures = sorted(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
    )
    doc = (PACKAGE.parent / "docs" / "registry.md").read_text(encoding="utf-8")
    assert len(fixtures) >= 10
    assert [name for name in fixtures if f"`{name}" not in doc] == []
