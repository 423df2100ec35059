"""`dask catalog ...`: list, show and operate the catalog's entries."""

from __future__ import annotations

import json
from typing import Any

import click

from catalog._entry import Entry
from catalog._options import Duration
from catalog._registry import entry_module, known_names, load_entries
from catalog.tracer import trace_cli

__all__ = ["main"]

ROLES = ("worker", "scheduler", "nanny", "client")


def _entry(name: str) -> Entry:
    return entry_module(name).dask_setup.entry


def _plugin_classes(name: str) -> dict[str, type]:
    return dict(entry_module(name).dask_setup.plugins)


class EntryName(click.Choice):
    """An entry's name: a built-in one or one another distribution registered.

    The choices are read when the command runs, not at import: installing a
    package with entries needs no reload of the CLI.
    """

    def __init__(self) -> None:
        super().__init__([])

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        self.choices = tuple(known_names())
        return super().convert(value, param, ctx)

    def get_metavar(self, param: Any, *args: Any) -> str:
        return "ENTRY"


@click.group(name="catalog")
@click.version_option(package_name="dask-catalog", prog_name="dask-catalog")
def main() -> None:
    """dask-catalog: ready-made Dask preloads and plugins."""


@main.command("list")
def list_entries() -> None:
    """Every entry: its name, what it does and where it runs."""
    rows = []
    modules, broken = load_entries()
    for module in modules:
        entry = module.dask_setup.entry
        rows.append(
            (
                entry.name,
                entry.summary,
                ", ".join(r for r in ROLES if r in entry.runs_on),
            )
        )
    # A third-party entry that cannot be used is listed, with why.
    rows += [(name, f"BROKEN: {error}", "-") for name, error in broken.items()]
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
    # A built-in entry's module is catalog.NAME; another distribution's is its own.
    module = entry_module(name).__name__
    # The facade re-exports the built-ins' classes; others' live in their module.
    owner = "catalog" if module == f"catalog.{name}" else module
    lines = [f"{module}: {entry.summary}", ""]
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
            f"    Python       {owner}.{main_class}({opt.keyword}=...)",
            f"    config key   {entry.config_key(opt)}",
            f"    env var      {entry.env_var(opt)}",
            f"    default      {json.dumps(opt.default)}",
            f"    accepts      {opt.type.describe()}",
        ]
        if opt.secret:
            lines.append(
                "    secret       yes: shown as **** in logs, errors and status"
            )
    first = entry.options[0] if entry.options else None
    flag = f" {entry.flag(first)} VALUE" if first else ""
    lines += [
        "",
        "Three ways in:",
        f"  dask worker tcp://scheduler:8786 --preload {module}{flag}",
        f"  dask worker tcp://scheduler:8786 --preload catalog --enable {name}{flag}",
        f"  client.register_plugin({owner}.{main_class}())",
        f"  config: distributed.worker.preload: [{module}]",
        f"      or: distributed.worker.preload: [catalog] + catalog.enable: [{name}]",
    ]
    if entry.examples:
        lines += ["", "Examples:", *(f"  {e}" for e in entry.examples)]
    return "\n".join(lines)


@main.command("show")
@click.argument("entry", type=EntryName(), metavar="ENTRY")
def show(entry: str) -> None:
    """One entry's options with all their spellings, defaults and examples."""
    try:
        text = show_text(entry)
    except ImportError as exc:  # a third-party entry that cannot be loaded
        raise click.ClickException(str(exc)) from None
    click.echo(text)


class SchedulerAddress(click.ParamType):
    """A scheduler address as distributed reads it: ``[scheme://]host:port``."""

    name = "address"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from distributed.comm import get_address_host_port

        try:
            _, port = get_address_host_port(str(value))
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range")
        except ValueError as exc:
            self.fail(
                f"{value!r} ({exc}); accepted: an address such as "
                "tcp://127.0.0.1:8786 or 127.0.0.1:8786",
                param,
                ctx,
            )
        return str(value)


@main.command("status")
@click.argument("address", type=SchedulerAddress())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--timeout",
    type=Duration(),
    default="10s",
    show_default=True,
    help="Connection timeout, such as 10s or 1m.",
)
def status_command(address: str, as_json: bool, timeout: float) -> None:
    """Which entries are active on the scheduler at ADDRESS and on its workers."""
    from distributed import Client

    from catalog._status import status, status_text

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except Exception as exc:  # unreachable, refused, not a scheduler, ...
        raise click.ClickException(
            f"cannot reach the scheduler at {address}: {exc}"
        ) from None
    with client:
        data = status(client)
    click.echo(
        json.dumps(data, indent=2, default=str) if as_json else status_text(data)
    )


@main.command("demo")
@click.option(
    "--output",
    default="catalog-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for trace.json, events.jsonl, logs.jsonl and metrics.txt.",
)
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Worker processes.",
)
@click.option(
    "--enable",
    "enable",
    multiple=True,
    metavar="ENTRY[,ENTRY...]",
    help="Entries to turn on (default: all).",
)
@click.option(
    "--keep-alive",
    is_flag=True,
    help="Leave the cluster up and print its URLs until Ctrl-C.",
)
def demo(output: str, workers: int, enable: tuple[str, ...], keep_alive: bool) -> None:
    """Every entry at work on an embedded local cluster, in under a minute."""
    from catalog._entry import entry_names
    from catalog.demo import DEMO_ENTRIES, run_demo

    chosen = entry_names(enable, known_names(), "--enable") if enable else DEMO_ENTRIES
    run_demo(output=output, workers=workers, enable=chosen, keep_alive=keep_alive)


# Entries with commands of their own.
main.add_command(trace_cli, "trace")
