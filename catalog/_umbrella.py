"""The umbrella preload ``--preload catalog``: all entries behind one click command."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import click
import dask.config

from catalog._entry import (
    Entry,
    PreloadCommand,
    entry_names,
    install,
    refuse,
    uninstall,
)

__all__ = ["umbrella_preload"]


def umbrella_preload(
    modules: Sequence[ModuleType], broken: Mapping[str, str] | None = None
) -> tuple[click.Command, Callable[[Any], None]]:
    """Build ``catalog.dask_setup`` / ``dask_teardown`` over the entry modules.

    ``--enable`` (repeatable, comma lists; config ``catalog.enable``) chooses the
    entries; every entry's options keep their own spelling. An option of an entry
    that is not enabled is a usage error naming the missing ``--enable``.

    Args:
        modules: the entry modules, in install order.
        broken: third-party entries that could not be loaded, with why: naming
            one in ``--enable`` is a usage error that says why.
    """
    broken = dict(broken or {})
    commands = {m.dask_setup.entry.name: m.dask_setup for m in modules}
    entries: dict[str, Entry] = {name: c.entry for name, c in commands.items()}

    def enabled_from(params: dict[str, Any]) -> list[str]:
        given = params.get("enable") or ()
        if given:
            values, source = given, "--enable"
        else:
            configured = dask.config.get("catalog.enable", default=[]) or []
            if isinstance(configured, str):
                # DASK_CATALOG__ENABLE=metrics,tracer arrives as one string.
                configured = [configured]
            values, source = configured, "config catalog.enable"
        names = entry_names(values, [*entries, *broken], source)
        for name in names:
            if name in broken:
                raise click.BadParameter(
                    f"entry {name!r} cannot be enabled: {broken[name]}",
                    param_hint=f"'{source}'",
                )
        return names

    def check(params: dict[str, Any]) -> None:
        enabled = enabled_from(params)
        for name, entry in entries.items():
            if name in enabled:
                entry.check_command_line(params)
                continue
            for keyword in entry.given_from_params(params):
                flag = entry.flag(entry.option(keyword))
                raise click.UsageError(
                    f"option '{flag}' belongs to entry {name!r}, which is not enabled: "
                    f"add '--enable {name}'"
                )
        if not enabled:
            raise click.UsageError(
                "no entry enabled: give '--enable ENTRY' "
                f"(entries: {', '.join(entries)}) "
                "or set config catalog.enable"
            )

    async def callback(
        server: Any, _usage_error: str | None = None, **params: Any
    ) -> None:
        if _usage_error is not None:
            refuse(server, f"catalog preload-argv: {_usage_error}")
            return
        for name in enabled_from(params):
            command = commands[name]
            await install(
                server,
                entries[name],
                command.plugins,
                entries[name].given_from_params(params),
            )

    def dask_teardown(server: Any) -> None:
        for entry in reversed(list(entries.values())):
            uninstall(server, entry)

    params: list[click.Parameter] = [
        click.Option(
            ["--enable", "enable"],
            multiple=True,
            metavar="ENTRY[,ENTRY...]",
            help=f"Entries to turn on: {', '.join(entries)} [config: catalog.enable]",
        )
    ]
    for entry in entries.values():
        params.extend(entry.click_options())
    command = PreloadCommand(
        "dask_setup",
        params=params,
        callback=callback,
        check=check,
        help="catalog: turn on catalog entries with --enable.",
    )
    return command, dask_teardown
