"""The shape of the package: entries written on catalog.entry, no facade imports.

Static checks (an AST walk over the sources), so they name the file and line
of a breach rather than failing somewhere at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import catalog
import catalog.entry
from catalog._registry import builtin_names

PACKAGE = Path(catalog.__file__).parent

#: The one exception to "a built-in entry imports only catalog.entry": a private
#: helper module that belongs to that entry alone (documented in catalog.entry's
#: docstring). ``catalog._prom`` is shared, but its exposition side (attaching
#: families to a server, the process collector) is the metrics entry's own.
ENTRY_PRIVATE = {
    "dashboard": {"catalog._dashboard_settings"},
    "env": {"catalog._env_cores"},
    "logging": {"catalog._log_format"},
    "memory": {"catalog._memory_attribution"},
    "metrics": {"catalog._fine_metrics", "catalog._http", "catalog._prom"},
    "otel": {"catalog._otel"},
    "watchdog": {"catalog._watchdog_stacks"},
}

#: Modules over the size bound that another stream is splitting this round.
BEING_SPLIT = {
    "memory.py",
    "metrics.py",
    "otel.py",
    "recycle.py",
    "tracer.py",
    "watchdog.py",
}
MAX_LINES = 500


def _catalog_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a ``catalog`` module in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [
                (node.lineno, alias.name)
                for alias in node.names
                if alias.name.split(".")[0] == "catalog"
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "catalog":
                # ``from catalog import x`` imports the facade (or a submodule
                # through it): reported as the facade.
                out += [(node.lineno, "catalog")]
            elif node.module.split(".")[0] == "catalog":
                out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_entries_import_only_the_entry_api(name):
    path = PACKAGE / f"{name}.py"
    allowed = ENTRY_PRIVATE.get(name, set())
    # Public modules (catalog.entry, another entry's public functions) are fine;
    # private ones and the facade are not.
    bad = [
        f"{path.name}:{line}: {module}"
        for line, module in _catalog_imports(path)
        if module not in allowed
        and (module == "catalog" or module.split(".")[1].startswith("_"))
    ]
    assert not bad, (
        "built-in entries import catalog.entry only (add what they need to its "
        f"__all__): {bad}"
    )


def test_entry_private_modules_belong_to_one_entry():
    others = {
        module
        for name in builtin_names()
        for _, module in _catalog_imports(PACKAGE / f"{name}.py")
    }
    for owner, modules in ENTRY_PRIVATE.items():
        for module in modules - {"catalog._prom"}:
            users = [
                name
                for name in builtin_names()
                if module in {m for _, m in _catalog_imports(PACKAGE / f"{name}.py")}
            ]
            assert users in ([owner], []), (module, users)
    assert others  # the walk saw the imports at all


def test_no_module_inside_the_package_imports_the_facade():
    bad = [
        f"{path.name}:{line}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "__init__.py"
        for line, module in _catalog_imports(path)
        if module == "catalog"
    ]
    assert not bad, f"modules inside catalog/ import the facade: {bad}"


def test_machinery_modules_stay_small():
    big = {
        path.name: n
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name not in BEING_SPLIT
        and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"split these by concern (over {MAX_LINES} lines): {big}"


def test_entry_api_all_names_exist_and_are_sorted():
    names = catalog.entry.__all__
    assert len(set(names)) == len(names)
    missing = [n for n in names if not hasattr(catalog.entry, n)]
    assert not missing
    # Names only ever get added: the ones every entry author may rely on.
    for name in (
        "Entry",
        "Option",
        "EntryPlugin",
        "WorkerEntryPlugin",
        "SchedulerEntryPlugin",
        "NannyEntryPlugin",
        "entry_preload",
        "Families",
        "families_for",
        "client_call",
        "local_status",
        "__version__",
    ):
        assert name in names


def test_comma_items_splits_repeatable_lists():
    assert catalog.entry.comma_items(["a,b", " c ", "", "d,,e"]) == [
        "a",
        "b",
        "c",
        "d",
        "e",
    ]
    assert catalog.entry.comma_items([]) == []
