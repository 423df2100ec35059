"""catalog.yaml, the declarations and the docs agree; every entry has one shape."""

from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path

import click
import dask.config
import pytest
import yaml

import catalog
from catalog._config import YAML_PATH, expected_defaults
from catalog._entry import EntryPlugin
from catalog.docs import options_table

ROOT = Path(__file__).resolve().parent.parent
MODULES = catalog.entry_modules()
IDS = [m.__name__ for m in MODULES]


def test_catalog_yaml_matches_the_declarations():
    with open(YAML_PATH) as f:
        shipped = yaml.safe_load(f)
    assert shipped == expected_defaults(), (
        "catalog/catalog.yaml is stale: regenerate it with\n"
        "python -c 'import catalog._config as c; c.write_yaml()'"
    )


def test_defaults_are_registered_on_import():
    for module in MODULES:
        entry = module.dask_setup.entry
        for opt in entry.options:
            assert dask.config.get(entry.config_key(opt)) == opt.default
    assert dask.config.get("catalog.strict") is True


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_every_default_parses(module):
    entry = module.dask_setup.entry
    for opt in entry.options:
        opt.parse(opt.default, "default")


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_entry_page_has_the_generated_options_table(module):
    entry = module.dask_setup.entry
    page = ROOT / "docs" / "entries" / f"{entry.name}.md"
    text = page.read_text()
    assert f"<!-- catalog:options {entry.name} -->" in text
    table = options_table(entry.name)
    for opt in entry.options:
        assert entry.flag(opt) in table and entry.config_key(opt) in table
        assert entry.env_var(opt) in table
    assert f"::: catalog.{entry.name}" in text


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_entry_module_shape(module):
    source = Path(module.__file__).read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    assert doc and "\n" not in doc.strip(), "one-line module docstring"
    assert isinstance(module.dask_setup, click.Command)
    assert callable(module.dask_teardown)
    # Sorted as ruff's RUF022 sorts (constants, then classes, then functions),
    # which `ruff check` enforces; here: nothing missing, nothing twice.
    assert len(set(module.__all__)) == len(module.__all__)
    assert "dask_setup" in module.__all__ and "dask_teardown" in module.__all__
    plugins = module.dask_setup.plugins
    assert plugins, "an entry installs at least one plugin"
    for cls in plugins.values():
        assert issubclass(cls, EntryPlugin)
        assert cls.name == f"catalog.{module.dask_setup.entry.name}"
        assert cls.__name__ in module.__all__ or cls.__name__.startswith("_")


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_every_plugin_pickles_with_plain_settings(module):
    for cls in module.dask_setup.plugins.values():
        plugin = cls()
        clone = pickle.loads(pickle.dumps(plugin))
        assert clone.settings == plugin.settings
        assert type(clone) is cls


def test_facade_names_resolve():
    for name in catalog.__all__:
        assert getattr(catalog, name) is not None
    with pytest.raises(AttributeError):
        catalog.NoSuchThing  # noqa: B018


def test_every_module_imports():
    for path in sorted((ROOT / "catalog").glob("*.py")):
        importlib.import_module(
            f"catalog.{path.stem}" if path.stem != "__init__" else "catalog"
        )


def test_config_reference_lists_every_key():
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert "<!-- catalog:config-reference -->" in page
