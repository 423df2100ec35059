"""`dask catalog ...`: list, show and operate the catalog's entries."""

from __future__ import annotations

import importlib
import json
from typing import Any

import click

from catalog import ENTRY_MODULES
from catalog._entry import Entry

__all__ = ["main"]

ROLES = ("worker", "scheduler", "nanny", "client")


def _entry(name: str) -> Entry:
    return importlib.import_module(f"catalog.{name}").dask_setup.entry


def _plugin_classes(name: str) -> dict[str, type]:
    return dict(importlib.import_module(f"catalog.{name}").dask_setup.plugins)


@click.group(name="catalog")
@click.version_option(package_name="dask-catalog", prog_name="dask-catalog")
def main() -> None:
    """dask-catalog: ready-made Dask preloads and plugins."""


@main.command("list")
def list_entries() -> None:
    """Every entry: its name, what it does and where it runs."""
    rows = []
    for name in ENTRY_MODULES:
        entry = _entry(name)
        rows.append(
            (name, entry.summary, ", ".join(r for r in ROLES if r in entry.runs_on))
        )
    width = max(len(r[0]) for r in rows)
    where_width = max(len(r[2]) for r in rows)
    click.echo(f"{'ENTRY':<{width}}  {'RUNS ON':<{where_width}}  SUMMARY")
    for name, summary, where in rows:
        click.echo(f"{name:<{width}}  {where:<{where_width}}  {summary}")
    click.echo("\nDetails: dask catalog show ENTRY")


def show_text(name: str) -> str:
    """What `dask catalog show NAME` prints."""
    entry = _entry(name)
    classes = _plugin_classes(name)
    main_class = next(iter(classes.values())).__name__
    lines = [f"catalog.{name}: {entry.summary}", ""]
    lines.append("Runs on:")
    for role in ROLES:
        if role in entry.runs_on:
            lines.append(f"  {role:<10} {entry.runs_on[role]}")
    lines += ["", "Options:"]
    for opt in entry.options:
        lines += [
            f"  {opt.name}: {opt.help}",
            f"    CLI flag     {entry.flag(opt)} {opt.type.name.upper()}"
            + ("  (repeatable)" if opt.multiple else ""),
            f"    Python       catalog.{main_class}({opt.keyword}=...)",
            f"    config key   {entry.config_key(opt)}",
            f"    env var      {entry.env_var(opt)}",
            f"    default      {json.dumps(opt.default)}",
            f"    accepts      {opt.type.describe()}",
        ]
    first = entry.options[0] if entry.options else None
    flag = f" {entry.flag(first)} VALUE" if first else ""
    lines += [
        "",
        "Three ways in:",
        f"  dask worker tcp://scheduler:8786 --preload catalog.{name}{flag}",
        f"  dask worker tcp://scheduler:8786 --preload catalog --enable {name}{flag}",
        f"  client.register_plugin(catalog.{main_class}())",
        f"  config: distributed.worker.preload: [catalog.{name}]",
        f"      or: distributed.worker.preload: [catalog] + catalog.enable: [{name}]",
    ]
    if entry.examples:
        lines += ["", "Examples:", *(f"  {e}" for e in entry.examples)]
    return "\n".join(lines)


@main.command("show")
@click.argument("entry", type=click.Choice(ENTRY_MODULES), metavar="ENTRY")
def show(entry: str) -> None:
    """One entry's options with all their spellings, defaults and examples."""
    click.echo(show_text(entry))


def _mount_entry_commands() -> None:
    # Entries with commands of their own (for example `dask catalog trace`).
    for name in ENTRY_MODULES:
        try:
            module = importlib.import_module(f"catalog.{name}")
        except ImportError:  # pragma: no cover - an entry being written
            continue
        command: Any = getattr(module, "cli_command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_mount_entry_commands()
