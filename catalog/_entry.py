"""Entry machinery: one option declaration gives click option, config key, docs row."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import click
import dask.config
from distributed import Client, Nanny, Scheduler, Worker
from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin

from catalog._config import ENTRY_NAMES, unknown_keys
from catalog._options import OptionType
from catalog._secrets import MASK, mask, mask_text

__all__ = [
    "Entry",
    "EntryPlugin",
    "EntrySetupError",
    "NannyEntryPlugin",
    "Option",
    "OptionError",
    "SchedulerEntryPlugin",
    "Settings",
    "WorkerEntryPlugin",
    "guards_itself",
    "role_of",
]

logger = logging.getLogger("catalog")


#: Config-key warnings already given in this process (each is given once).
_WARNED: set[str] = set()


class OptionError(ValueError):
    """A bad option value given in Python or in dask config."""


class EntrySetupError(RuntimeError):
    """An entry could not set up on a server while ``catalog.strict`` is true."""


@dataclass(frozen=True)
class Option:
    """One option of an entry, declared once.

    Attributes:
        name: kebab-case name inside the entry, e.g. ``"task-limit"``.
        type: the parser shared by CLI, Python and config.
        default: the built-in default, as written in ``catalog.yaml``.
        help: one sentence for ``--help``, ``dask catalog show`` and the docs.
        multiple: a list; repeatable on the CLI.
        secret: a password or token: its value is never shown (``****`` in
            repr, logs, errors and ``dask catalog status``), and the docs table
            and ``dask catalog show`` say so.
    """

    name: str
    type: OptionType
    default: Any
    help: str
    multiple: bool = False
    secret: bool = False

    def __post_init__(self) -> None:
        if self.secret and not self.type.secret:
            # The type builds the CLI's error messages too: its own copy knows.
            secret_type = copy.copy(self.type)
            secret_type.secret = True
            object.__setattr__(self, "type", secret_type)

    @property
    def keyword(self) -> str:
        """The Python keyword argument, e.g. ``task_limit``."""
        return self.name.replace("-", "_")

    def parse(self, value: Any, where: str) -> Any:
        """Parse a Python or config value; raise OptionError naming ``where``."""
        if self.multiple:
            if value is None:
                return ()
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                accepted = f"a list of {self.type.describe()}"
                shown = self.type.shown(value)
                msg = f"invalid value for {where}: {shown}; accepted: {accepted}"
                raise OptionError(msg)
            return tuple(self._parse_one(v, where) for v in items)
        return self._parse_one(value, where)

    def _parse_one(self, value: Any, where: str) -> Any:
        try:
            return self.type.convert(value, None, None)
        except click.BadParameter as exc:
            msg = f"invalid value for {where}: {exc.message}"
            raise OptionError(msg) from None


class Settings(SimpleNamespace):
    """The resolved, plain (picklable) settings of one plugin."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Entry:
    """An entry of the catalog: its name, what it does, and its options.

    The module ``catalog/<name>.py`` holds one ``Entry`` and the plugin classes
    built on it; everything a user can spell is derived from ``options`` here.
    """

    name: str
    summary: str
    runs_on: Mapping[str, str]
    options: Sequence[Option]
    examples: Sequence[str] = ()
    #: Whether the entry's preload on a client registers it on the whole cluster
    #: (as DESIGN.md asks) besides any client half; env acts on the client alone,
    #: since a cluster-wide registration would restart every worker.
    client_registers_cluster: bool = True
    #: Checks options that only make sense together (raises OptionError); run by
    #: ``resolve`` and, as a usage error, when a command line is parsed.
    check: Callable[[Settings], None] | None = None
    _by_keyword: dict[str, Option] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_keyword = {opt.keyword: opt for opt in self.options}
        ENTRY_NAMES.add(self.name)

    # -- the five spellings -------------------------------------------------
    def flag(self, option: Option) -> str:
        return f"--{self.name}-{option.name}"

    def config_key(self, option: Option) -> str:
        return f"catalog.{self.name}.{option.name}"

    def env_var(self, option: Option) -> str:
        return f"DASK_CATALOG__{self.name.upper()}__{option.keyword.upper()}"

    @property
    def plugin_name(self) -> str:
        return f"catalog.{self.name}"

    def option(self, name: str) -> Option:
        return self._by_keyword[name.replace("-", "_")]

    # -- resolution ---------------------------------------------------------
    def resolve(
        self, given: Mapping[str, Any], owner: str = "", checked: bool = True
    ) -> Settings:
        """Explicit values win over dask config, which wins over the defaults.

        Args:
            given: keyword arguments passed in Python or parsed from the CLI.
            owner: the class name, for error messages about unknown keywords.
            checked: run the entry's ``check`` on the result.
        """
        unknown = sorted(set(given) - set(self._by_keyword))
        if unknown:
            msg = (
                f"{owner or self.plugin_name}() got unknown option(s) {unknown}; "
                f"options are: {sorted(self._by_keyword)}"
            )
            raise TypeError(msg)
        self.check_config_keys()
        values = {}
        for opt in self.options:
            if opt.keyword in given:
                value, where = given[opt.keyword], f"{opt.keyword}= ({self.flag(opt)})"
            else:
                value = dask.config.get(self.config_key(opt), default=opt.default)
                where = f"config {self.config_key(opt)}"
            values[opt.keyword] = opt.parse(value, where)
        settings = Settings(**values)
        if checked and self.check is not None:
            self.check(settings)
        return settings

    def check_command_line(self, params: Mapping[str, Any]) -> None:
        """Run ``check`` on parsed CLI params: a click usage error (exit 2)."""
        if self.check is None:
            return
        try:
            settings = self.resolve(self.given_from_params(params), checked=False)
        except (OptionError, TypeError):
            return  # a bad config value: refused at setup, naming its key
        try:
            self.check(settings)
        except OptionError as exc:
            raise click.UsageError(str(exc)) from None

    def check_config_keys(self) -> None:
        """Refuse (``catalog.strict``) or warn once about misspelt config keys.

        A typo such as ``catalog.memory.prcess-limit`` would otherwise leave the
        option at its default without a word.
        """
        problems = unknown_keys(self.name, [opt.name for opt in self.options])
        if not problems:
            return
        if dask.config.get("catalog.strict", default=True):
            raise OptionError("; ".join(problems) + " (catalog.strict is true)")
        for problem in problems:
            if problem not in _WARNED:
                _WARNED.add(problem)
                logger.warning("%s (ignored: catalog.strict is false)", problem)

    def masked(self, settings: Settings) -> dict[str, Any]:
        """Settings for logs and status, with secret values hidden."""
        shown = {}
        for opt in self.options:
            value = getattr(settings, opt.keyword)
            if opt.secret and value:
                value = MASK
            elif opt.multiple and value:
                value = [mask(v) for v in value]
            else:
                value = mask(value)
            shown[opt.keyword] = value
        return shown

    def defaults(self) -> dict[str, Any]:
        """The config section this entry contributes to ``catalog.yaml``."""
        return {opt.name: opt.default for opt in self.options}

    # -- click ---------------------------------------------------------------
    def click_options(self) -> list[click.Option]:
        """One click option per declared option, defaulting to 'not given'."""
        return [
            click.Option(
                [self.flag(opt), f"{self.name}__{opt.keyword}"],
                type=opt.type,
                multiple=opt.multiple,
                default=None,
                help=f"{opt.help} [config: {self.config_key(opt)}]",
                metavar=opt.type.name.upper(),
            )
            for opt in self.options
        ]

    def given_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The entry's options that were actually given on a command line."""
        given = {}
        for opt in self.options:
            value = params.get(f"{self.name}__{opt.keyword}")
            if value is not None and value != ():
                given[opt.keyword] = value
        return given


# ---------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------


#: Server classes and their role names (the logging entry asks for every line).
_ROLES = (
    (Worker, "worker"),
    (Scheduler, "scheduler"),
    (Nanny, "nanny"),
    (Client, "client"),
)


def role_of(server: Any) -> str:
    """``"worker"``, ``"scheduler"``, ``"nanny"`` or ``"client"``."""
    for cls, role in _ROLES:
        if isinstance(server, cls):
            return role
    return type(server).__name__.lower()


def address_of(server: Any) -> str:
    try:
        return str(server.address)
    except Exception:  # a server that is not listening yet
        return "(not listening)"


#: The plugin instance of each entry that is active on each server, so that a
#: replacement (re-registration, a second preload) tears the old one down even
#: where distributed does not (scheduler and nanny plugins replaced by name).
_ACTIVE: weakref.WeakKeyDictionary[Any, dict[str, EntryPlugin]] = (
    weakref.WeakKeyDictionary()
)

#: Plugin hooks that distributed calls at run time: wrapped so they never raise.
RUNTIME_HOOKS = frozenset(
    {
        "transition",
        "release_key",
        "add_worker",
        "remove_worker",
        "add_client",
        "remove_client",
        "update_graph",
        "log_event",
        "restart",
        "before_close",
        "add_keys",
    }
)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


async def _async_noop(*args: Any, **kwargs: Any) -> None:
    return None


class EntryPlugin:
    """What every catalog plugin shares: settings, strict setup, safe hooks, status.

    Subclasses set ``entry`` and implement ``on_setup(server)`` and
    ``on_teardown(server)``. ``__init__`` keeps only plain settings (the plugin is
    pickled to workers); ``on_setup`` builds threads, files and collectors;
    ``on_teardown`` undoes all of it and must cope with a setup that failed halfway.
    """

    entry: ClassVar[Entry]
    name: str
    idempotent = False
    #: The server the plugin is set up on, and its kind (set by setup).
    server: Any
    role: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "entry" in cls.__dict__:
            cls.name = cls.entry.plugin_name
            # help() and IDEs show the declared options as keyword arguments.
            cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [
                    inspect.Parameter(
                        opt.keyword, inspect.Parameter.KEYWORD_ONLY, default=opt.default
                    )
                    for opt in cls.entry.options
                ]
            )
        for hook in RUNTIME_HOOKS:
            method = getattr(cls, hook, None)
            # Wrap hooks written for the catalog (also in mixins), once each;
            # distributed's own no-op defaults stay as they are.
            if (
                callable(method)
                and not getattr(method, "_catalog_guarded", False)
                and not method.__module__.startswith("distributed.")
            ):
                setattr(cls, hook, _guarded(method))

    def __init__(self, **options: Any) -> None:
        self.settings = self.entry.resolve(options, owner=type(self).__name__)
        self.last_error: str | None = None
        self.errors = 0
        self.active = False

    def __getstate__(self) -> dict[str, Any]:
        # Only plain settings travel; run-time state is rebuilt in setup.
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings = state["settings"]
        self.last_error = None
        self.errors = 0
        self.active = False

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}" for k, v in self.entry.masked(self.settings).items()
        )
        return f"{type(self).__name__}({args})"

    # -- subclass interface -------------------------------------------------
    def on_setup(self, server: Any) -> None:
        """Build what the entry needs on ``server``."""

    def on_teardown(self, server: Any) -> None:
        """Undo ``on_setup``; must cope with a setup that failed halfway."""

    # -- machinery ------------------------------------------------------------
    def _setup(self, server: Any) -> None:
        if self.active:  # set up twice: undo the first, never run twice
            self._teardown(self.server)
        for hook in RUNTIME_HOOKS:  # undo _disable of an earlier teardown
            self.__dict__.pop(hook, None)
        self.server = server
        self.role = role_of(server)
        previous = _ACTIVE.setdefault(server, {}).get(self.name)
        if previous is not None and previous is not self:
            previous._teardown(server)
        _ACTIVE[server][self.name] = self
        if self.role == "scheduler":
            _SchedulerCloser.attach(server)
        try:
            self.on_setup(server)
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            msg = mask_text(
                f"catalog entry {self.entry.name!r} could not set up on "
                f"{self.role} {address_of(server)}: {cause}"
            )
            self.last_error = msg
            self._disable()
            self._safe_teardown(server)
            if dask.config.get("catalog.strict", default=True):
                logger.error("%s (catalog.strict is true: refusing to start)", msg)
                raise EntrySetupError(msg) from exc
            logger.error("%s (catalog.strict is false: going on without it)", msg)
            return
        self.active = True
        logger.info(
            "catalog entry %r active on %s %s: %s",
            self.entry.name,
            self.role,
            address_of(server),
            self.entry.masked(self.settings),
        )

    def _teardown(self, server: Any) -> None:
        if _ACTIVE.get(server, {}).get(self.name) is self:
            del _ACTIVE[server][self.name]
        if self.active:
            self.active = False
            self._safe_teardown(server)
        self._disable()

    def _safe_teardown(self, server: Any) -> None:
        try:
            self.on_teardown(server)
        except Exception:
            logger.exception("catalog entry %r failed to tear down", self.entry.name)

    def _disable(self) -> None:
        # Instance attributes shadow the hooks, so distributed's calls cost nothing.
        # Async hooks (distributed awaits before_close) get an async stand-in;
        # attributes that are not hooks (NannyPlugin.restart is a flag) stay.
        for hook in RUNTIME_HOOKS:
            method = getattr(type(self), hook, None)
            if callable(method):
                stand_in = _async_noop if inspect.iscoroutinefunction(method) else _noop
                setattr(self, hook, stand_in)

    def report_error(self, what: str, exc: BaseException | str) -> None:
        """Record a run-time error: one ERROR log line per entry, then counts only."""
        cause = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.errors += 1
        self.last_error = mask_text(f"{what}: {cause}")
        if self.errors == 1:
            logger.error(
                "catalog entry %r: %s (further errors are counted, not logged; "
                "see `dask catalog status`)",
                self.entry.name,
                self.last_error,
            )

    def memory(self) -> int | None:
        """Bytes of state this plugin holds that grows with work, by its own count.

        None for an entry that keeps nothing per task beyond a few fixed
        structures; entries with buffers (the tracer's ring) override it.
        """
        return None

    def status(self) -> dict[str, Any]:
        """What ``dask catalog status`` shows for this plugin."""
        return {
            "entry": self.entry.name,
            "class": type(self).__name__,
            "active": self.active,
            "options": self.entry.masked(self.settings),
            "last_error": self.last_error,
            "errors": self.errors,
            "memory": self.memory() if self.active else None,
        }


def guards_itself(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a hot hook whose body catches its own errors (``report_error``).

    Such a hook must accept any call, as the wrapper does: defaults for its
    named parameters, ``*args, **kwargs``, and its whole body inside ``try``.

    The scheduler calls ``transition`` several times per task with a dozen
    keyword arguments; the wrapper of :func:`_guarded` repacks them once more
    and adds a call, which costs more than a cheap hook's own work.
    """
    hook._catalog_guarded = True  # type: ignore[attr-defined]
    return hook


def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a run-time hook so that no exception ever reaches distributed."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def guarded_async(self: EntryPlugin, *args: Any, **kwargs: Any) -> Any:
            try:
                return await hook(self, *args, **kwargs)
            except Exception as exc:
                self.report_error(hook.__name__, exc)
                return None

        guarded_async._catalog_guarded = True  # type: ignore[attr-defined]
        return guarded_async

    @functools.wraps(hook)
    def guarded(self: EntryPlugin, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:
            self.report_error(hook.__name__, exc)
            return None

    guarded._catalog_guarded = True  # type: ignore[attr-defined]
    return guarded


class WorkerEntryPlugin(EntryPlugin, WorkerPlugin):
    """Base of the entries' worker plugins."""

    def setup(self, worker: Any) -> None:
        self._setup(worker)

    def teardown(self, worker: Any) -> None:
        self._teardown(worker)


class SchedulerEntryPlugin(EntryPlugin, SchedulerPlugin):
    """Base of the entries' scheduler plugins."""

    async def start(self, scheduler: Any) -> None:
        self._setup(scheduler)

    async def close(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            self._teardown(server)


class _SchedulerCloser(SchedulerPlugin):
    """Tears down, when the scheduler closes, entries it no longer lists.

    ``Client.unregister_scheduler_plugin`` removes a plugin without calling its
    ``close``: without this its files, threads and ports would stay open.
    """

    name = "catalog.closer"

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    @classmethod
    def attach(cls, scheduler: Any) -> None:
        plugins = getattr(scheduler, "plugins", None)
        if isinstance(plugins, dict) and cls.name not in plugins:
            scheduler.add_plugin(cls(scheduler), name=cls.name)

    async def close(self) -> None:
        for plugin in list(_ACTIVE.get(self.scheduler, {}).values()):
            plugin._teardown(self.scheduler)


class NannyEntryPlugin(EntryPlugin, NannyPlugin):
    """Base of the entries' nanny plugins."""

    def setup(self, nanny: Any) -> None:
        self._setup(nanny)

    def teardown(self, nanny: Any) -> None:
        self._teardown(nanny)


# ---------------------------------------------------------------------------
# Preloads
# ---------------------------------------------------------------------------


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


def now() -> float:
    """Wall-clock seconds (the clock distributed stamps tasks with)."""
    return time.time()


def entry_names(values: Iterable[str], known: Sequence[str], source: str) -> list[str]:
    """Parse ``--enable``-style lists; unknown names are a usage error on ``source``."""
    names = iter_entries(values)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise click.BadParameter(
            f"unknown entry {', '.join(map(repr, unknown))}; "
            f"entries are: {', '.join(known)}",
            param_hint=f"'{source}'",
        )
    return names


def iter_entries(names: Iterable[str]) -> list[str]:
    """Split repeatable, comma-separated entry lists."""
    out = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out
