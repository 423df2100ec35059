"""Preload and install: ``dask_setup``/``dask_teardown`` and strict refusal."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import click
import dask.config
from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin

from catalog._declare import Entry, EntrySetupError, OptionError
from catalog._plugin import _ACTIVE, EntryPlugin, NannyEntryPlugin, role_of

__all__ = [
    "FailedSchedulerSetup",
    "FailedSetup",
    "PreloadCommand",
    "active_plugins",
    "entry_preload",
    "install",
    "refuse",
    "uninstall",
]

logger = logging.getLogger("catalog")


class FailedSetup(WorkerPlugin):
    """Stands in for an entry that could not be built, so the worker refuses to start.

    distributed only logs what a preload raises; a worker plugin given at
    construction that fails its setup stops the worker before it registers.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        self.name = f"catalog.failed-setup.{abs(hash(message))}"

    def setup(self, worker: Any) -> None:
        raise EntrySetupError(self.message)


class FailedSchedulerSetup(SchedulerPlugin):
    """The scheduler's counterpart of :class:`FailedSetup`."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.name = f"catalog.failed-setup.{abs(hash(message))}"

    async def start(self, scheduler: Any) -> None:
        raise EntrySetupError(self.message)


def refuse(server: Any, message: str) -> None:
    """Apply the strict-mode rule for a preload that failed before any plugin ran."""
    role = role_of(server)
    if not dask.config.get("catalog.strict", default=True):
        logger.error("%s (catalog.strict is false: going on without it)", message)
        return
    logger.error("%s (catalog.strict is true: refusing to start)", message)
    if role == "worker":
        _add_pending_worker_plugin(server, FailedSetup(message))
    elif role == "scheduler":
        server.add_plugin(FailedSchedulerSetup(message))
    elif role == "nanny":
        # The nanny's worker process is built from worker_kwargs: it fails to
        # start, the nanny closes and `dask worker` exits non-zero.
        plugins = set(server.worker_kwargs.get("plugins") or ())
        plugins.add(FailedSetup(message))
        server.worker_kwargs["plugins"] = plugins
    else:
        raise EntrySetupError(message)


def _add_pending_worker_plugin(worker: Any, plugin: WorkerPlugin) -> bool:
    """Queue ``plugin`` with the constructor plugins, if the worker is still starting.

    Those are set up after the preloads and before the worker registers with the
    scheduler, with errors raised: a strict failure stops the worker cleanly.
    """
    from distributed.core import Status

    pending = getattr(worker, "_pending_plugins", None)
    if worker.status == Status.init and pending is not None:
        worker._pending_plugins = (*tuple(pending), plugin)
        return True
    return False


async def install(
    server: Any, entry: Entry, plugins: Mapping[str, Any], given: Mapping[str, Any]
) -> None:
    """Install one entry on ``server`` from its preload, as DESIGN.md describes.

    Args:
        server: the Scheduler, Worker, Nanny or Client given to ``dask_setup``.
        entry: the entry.
        plugins: the entry's plugin classes by role (worker, scheduler, nanny,
            client).
        given: options given on the command line / in ``preload-argv``.
    """
    role = role_of(server)
    # On a client the entry goes to the whole cluster (its scheduler, worker and
    # nanny halves) and, where it has one, a client half acts in this process.
    if role != "client":
        roles: tuple[str, ...] = (role,)
    elif entry.client_registers_cluster:
        roles = ("scheduler", "worker", "nanny", "client")
    else:
        roles = ("client",)
    try:
        built = [(r, plugins[r](**given)) for r in roles if r in plugins]
    except (OptionError, TypeError) as exc:
        refuse(server, f"catalog entry {entry.name!r} on {role}: {exc}")
        return
    if not built:
        # Bookkeeping, not news: nothing happened (DEBUG, as issue #15 asks).
        logger.debug("catalog entry %r has nothing to do on a %s", entry.name, role)
        return
    for target, plugin in built:
        if role == "worker":
            if getattr(plugin, "setup_in_preload", False):
                await _worker_setup_now(server, plugin)
            elif not _add_pending_worker_plugin(server, plugin):
                await server.plugin_add(plugin=plugin, catch_errors=False)
        elif role == "scheduler":
            server.add_plugin(plugin, name=plugin.name)
            if server.status.name == "running":
                await plugin.start(server)
        elif role == "nanny":
            await _nanny_setup(server, plugin)
        elif target == "client":
            plugin._setup(server)
        else:
            await _client_register(server, plugin)


async def _worker_setup_now(worker: Any, plugin: WorkerPlugin) -> None:
    """Set ``plugin`` up inside the preload, before the worker's startup lines.

    For entries that must act first (logging). A strict failure still stops the
    worker before it registers: a stand-in plugin that fails is queued.
    """
    try:
        await worker.plugin_add(plugin=plugin, catch_errors=False)
    except EntrySetupError as exc:
        if not _add_pending_worker_plugin(worker, FailedSetup(str(exc))):
            raise


async def _nanny_setup(nanny: Any, plugin: NannyEntryPlugin) -> None:
    nanny.plugins[plugin.name] = plugin
    try:
        plugin.setup(nanny=nanny)
    except EntrySetupError as exc:
        refuse(nanny, str(exc))


async def _client_register(client: Any, plugin: Any) -> None:
    # The client's preloads run on its event loop: call the coroutines directly.
    name = plugin.name
    if isinstance(plugin, SchedulerPlugin):
        await client._register_scheduler_plugin(plugin, name=name, idempotent=False)
    elif isinstance(plugin, NannyPlugin):
        await client._register_nanny_plugin(plugin, name=name, idempotent=False)
    else:
        await client._register_worker_plugin(plugin, name=name, idempotent=False)


def uninstall(server: Any, entry: Entry) -> None:
    """Tear down the entry's plugin on a server (``dask_teardown``)."""
    plugin = _ACTIVE.get(server, {}).get(entry.plugin_name)
    if plugin is not None:
        plugin._teardown(server)


def active_plugins(server: Any) -> dict[str, EntryPlugin]:
    """The catalog plugins active on ``server``, by plugin name."""
    return dict(_ACTIVE.get(server, {}))


class PreloadCommand(click.Command):
    """A ``dask_setup`` click command that keeps bad config argv from vanishing.

    On the CLI distributed validates the argv with ``parse_args`` and exits 2 on a
    usage error. From config (``preload-argv``) it calls ``make_context`` inside
    a ``try`` that only logs; here a usage error is instead handed to the callback,
    which applies the strict-mode rule.
    """

    def __init__(
        self,
        *args: Any,
        check: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.check = check

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        if self.check is not None:
            self.check(ctx.params)
        return rest

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        args = list(args)
        if len(args) > 1 and all(isinstance(a, str) and len(a) == 1 for a in args):
            # distributed splits a preload-argv string into its characters.
            text = "".join(args)
            ctx = click.Context(self, info_name=info_name, parent=parent)
            ctx.params = {
                "_usage_error": f"preload-argv is a string ({text!r}), which "
                f"distributed splits into characters; give a list: {text.split()!r}"
            }
            return ctx
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            ctx = click.Context(self, info_name=info_name, parent=parent)
            ctx.params = {"_usage_error": _describe_usage_error(exc)}
            return ctx


def _describe_usage_error(exc: click.ClickException) -> str:
    return re.sub(r"\s+", " ", exc.format_message()).strip()


def entry_preload(
    entry: Entry, **plugins: type[EntryPlugin]
) -> tuple[click.Command, Callable[[Any], None]]:
    """Build an entry module's ``dask_setup`` click command and ``dask_teardown``.

    Args:
        entry: the entry.
        **plugins: its plugin classes by role: ``worker=``, ``scheduler=``, ``nanny=``.
    """

    async def callback(
        server: Any, _usage_error: str | None = None, **params: Any
    ) -> None:
        if _usage_error is not None:
            refuse(server, f"catalog entry {entry.name!r} preload-argv: {_usage_error}")
            return
        await install(server, entry, plugins, entry.given_from_params(params))

    def dask_teardown(server: Any) -> None:
        uninstall(server, entry)

    command = PreloadCommand(
        "dask_setup",
        params=entry.click_options(),
        callback=callback,
        check=entry.check_command_line,
        help=f"catalog.{entry.name}: {entry.summary}",
    )
    command.entry = entry  # type: ignore[attr-defined]
    command.plugins = plugins  # type: ignore[attr-defined]
    return command, dask_teardown
