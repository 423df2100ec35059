"""Plugin life cycle: settings, strict setup, hooks that never raise, status."""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import dask.config
from distributed import Client, Nanny, Scheduler, Worker
from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin

from catalog._declare import Entry, EntrySetupError
from catalog._secrets import mask_text

__all__ = [
    "RUNTIME_HOOKS",
    "EntryPlugin",
    "NannyEntryPlugin",
    "SchedulerEntryPlugin",
    "WorkerEntryPlugin",
    "address_of",
    "guards_itself",
    "now",
    "plugin_on",
    "role_of",
]

logger = logging.getLogger("catalog")


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


P = TypeVar("P", bound="EntryPlugin")


def plugin_on(server: Any, entry: Entry, cls: type[P]) -> P | None:
    """``entry``'s plugin on ``server`` when it is a ``cls`` and active, else None.

    For functions that ``client.run`` calls on every server: a server without
    the entry, with another plugin under its name, or whose setup failed gives
    None.
    """
    plugin = getattr(server, "plugins", {}).get(entry.plugin_name)
    if isinstance(plugin, cls) and plugin.active:
        return plugin
    return None


def now() -> float:
    """Wall-clock seconds (the clock distributed stamps tasks with)."""
    return time.time()
