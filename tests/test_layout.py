"""The package's house rules, checked on its source: one storage seam, no import cycles,
modules under 400 lines, a docstring on every subpackage."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "cluster_singletons"

#: The modules that may run database statements: one per group of tables.
STORES = {
    "cluster/membership.py",
    "cluster/leases.py",
    "cluster/fencing.py",
    "cluster/crash_detection.py",
    "cluster/heartbeats.py",
    "beat/ledger.py",
    "beat/schedule_records.py",
    "beat/deliveries.py",
    "beat/periodic_tasks.py",
    "singletons/state.py",
    "singletons/steps.py",
    "tasks/claims.py",
    "snowflake/machine_ids.py",
}
#: Attribute names that, used in a module, mean it talks to the database itself.
_QUERYING = {
    "objects",
    "cursor",
    "execute",
    "executemany",
    "select_for_update",
    "bulk_create",
    "bulk_update",
    "raw",
    "values_list",
    "update_or_create",
    "get_or_create",
}
_QUERYING_NAMES = {"RawSQL"}


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("migrations/"):
            continue
        yield relative, ast.parse(path.read_text(), filename=str(path))


def _queries(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _QUERYING:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in _QUERYING_NAMES:
            found.append(f"line {node.lineno}: {node.id}")
    return found


def test_database_statements_run_only_in_the_store_modules() -> None:
    # models.py defines the tables (managers, not queries); the admin's querysets are the
    # ones Django hands its actions, which use none of the names above.
    outside = {
        name: hits
        for name, tree in _modules()
        if name not in STORES | {"models.py"} and (hits := _queries(tree))
    }
    assert outside == {}, "move these statements into a store module (see STORES)"


def test_every_store_module_states_its_invariants() -> None:
    for name, tree in _modules():
        if name in STORES:
            doc = (ast.get_docstring(tree) or "").lower()
            assert "invariant" in doc or "statements" in doc, f"{name}: state the invariants"
            assert "fenced" in doc or "fencing" in doc, f"{name}: say which writes are fenced"


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules a module imports, at any depth (lazy imports count too):
    ``from pkg import sub`` names the submodule, ``from pkg import name`` the package."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & known


def _module_name(relative: str) -> str:
    dotted = "cluster_singletons." + relative.removesuffix(".py").replace("/", ".")
    return dotted.removesuffix(".__init__")


def test_the_package_has_no_import_cycle() -> None:
    trees = dict(_modules())
    known = {_module_name(rel) for rel in trees}
    graph = {
        _module_name(rel): _imports(tree, known) - {_module_name(rel)}
        for rel, tree in trees.items()
    }
    # The top package's lazy table and TYPE_CHECKING block name everything: not a cycle.
    graph["cluster_singletons"] = set()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_subsystem_packages_do_not_import_each_other_in_a_loop() -> None:
    order = ["snowflake", "cluster", "singletons", "tasks", "beat", "health"]
    trees = dict(_modules())
    known = {_module_name(rel) for rel in trees}
    for relative, tree in trees.items():
        top = relative.split("/")[0]
        if top not in order:
            continue
        for imported in _imports(tree, known):
            parts = imported.split(".")
            if len(parts) > 1 and parts[1] in order:
                assert order.index(parts[1]) <= order.index(top), (
                    f"{relative} imports {imported}: {top} sits below {parts[1]}"
                )


def test_no_module_reaches_400_lines() -> None:
    long = {
        rel: n
        for path in PACKAGE.rglob("*.py")
        if "migrations" not in path.parts and (n := len(path.read_text().splitlines())) >= 400
        for rel in [path.relative_to(PACKAGE).as_posix()]
    }
    assert long == {}


def test_every_subpackage_says_what_it_holds_and_may_import() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        if init.parent.name in {"migrations", "management", "templates"}:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Holds" in doc and "May import" in doc, init


def test_no_two_modules_differ_only_by_a_plural() -> None:
    stems = {p.stem for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    assert {s for s in stems if s + "s" in stems} == set()


def test_the_readme_layout_names_every_module_where_it_is() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    rows = {
        cells[1].strip().strip("`/"): cells[2]
        for line in readme.splitlines()
        if line.strip().startswith("| ") and len(cells := line.split("|")) == 4
    }
    for folder in ("cluster", "beat", "singletons", "tasks", "snowflake", "health"):
        modules = {p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__"}
        missing = {m for m in modules if f"`{m}`" not in rows.get(folder, "")}
        assert missing == set(), f"README's layout table misses {folder}/{sorted(missing)}"
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert {m for m in top if f"`{m}`" not in rows.get("top", "")} == set()
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders - {"cluster", "beat", "singletons", "tasks", "snowflake", "health"} == {
        "management",
        "migrations",
    }
