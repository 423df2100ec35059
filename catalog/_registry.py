"""Where the entries are declared: the built-in ones, and others' through entry points.

Everything that lists entries (the umbrella preload, ``dask catalog
list/show/status``, the facade classes, the demo, the config defaults and the
docs reference) derives from :data:`BUILTIN` and the ``dask_catalog.entries``
entry-point group, so adding an entry is one line here.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType

import dask.config

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "Builtin",
    "ThirdParty",
    "builtin_names",
    "demo_names",
    "entry_module",
    "facade",
    "known_names",
    "load_entries",
    "third_party",
]

logger = logging.getLogger("catalog")

ENTRY_POINT_GROUP = "dask_catalog.entries"


@dataclass(frozen=True)
class Builtin:
    """One built-in entry: its module ``catalog.<name>`` and what the facade shows.

    Attributes:
        name: the entry's name (and its module's).
        classes: the plugin classes ``catalog.<Class>`` re-exports, lazily.
        demo: whether ``dask catalog demo`` turns it on by default.
    """

    name: str
    classes: tuple[str, ...]
    demo: bool = False


#: Every built-in entry, in the order the umbrella installs them: env first (it
#: must act before anything reads the environment), logging next (so the
#: others' lines come out formatted). One line per entry.
BUILTIN: tuple[Builtin, ...] = (
    Builtin("env", ("Environment", "SchedulerEnvironment", "WorkerEnvironment"), True),
    Builtin(
        "logging",
        ("NannyStructuredLogging", "SchedulerStructuredLogging", "StructuredLogging"),
        True,
    ),
    Builtin("metrics", ("Metrics", "SchedulerMetrics"), True),
    Builtin("tracer", ("SchedulerTracer", "Tracer"), True),
    Builtin("memory", ("MemoryGuard",), True),
    Builtin("watchdog", ("Watchdog",), True),
    Builtin("events", ("EventLog",), True),
    Builtin("recycle", ("Recycler", "SchedulerRecycler")),
    Builtin("oom", ("OOMReporter",)),
    Builtin("dashboard", ("Dashboard", "WorkerDashboard")),
    Builtin("otel", ("OpenTelemetry", "SchedulerOpenTelemetry")),
)


def builtin_names() -> tuple[str, ...]:
    """The built-in entries' names, in install order."""
    return tuple(b.name for b in BUILTIN)


def demo_names() -> tuple[str, ...]:
    """The entries ``dask catalog demo`` turns on when none is chosen."""
    return tuple(b.name for b in BUILTIN if b.demo)


def facade() -> dict[str, str]:
    """The public class names of ``catalog`` and the entry module each lives in."""
    return {cls: b.name for b in BUILTIN for cls in b.classes}


@dataclass(frozen=True)
class ThirdParty:
    """An entry another distribution registered in the ``dask_catalog.entries`` group.

    Attributes:
        name: the entry point's name: the entry's name.
        module: the entry point's value: the module holding the entry.
        distribution: the distribution that registered it, for messages.
        error: why it cannot be used (a clash, an import error), or None.
    """

    name: str
    module: str
    distribution: str
    error: str | None = None


def third_party() -> dict[str, ThirdParty]:
    """The entries other distributions registered, by name (nothing imported).

    One that clashes with a built-in entry (or with another distribution's) is
    kept with its ``error`` set: refused, and shown as refused.
    """
    return dict(_third_party())


@functools.lru_cache(maxsize=1)
def _third_party() -> dict[str, ThirdParty]:
    # Read once per process: every plugin construction checks config keys
    # against the known names, and the installed distributions do not change.
    builtins = set(builtin_names())
    found: dict[str, ThirdParty] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(point.dist, "name", None) or "an unknown distribution"
        error = None
        if point.name in builtins:
            error = (
                f"refused: distribution {dist!r} registers an entry named "
                f"{point.name!r} (module {point.value}) in the {ENTRY_POINT_GROUP} "
                f"entry-point group, which is the name of a built-in entry; "
                "rename it"
            )
        elif point.name in found:
            other = found[point.name].distribution
            error = (
                f"refused: distributions {other!r} and {dist!r} both register an "
                f"entry named {point.name!r} in the {ENTRY_POINT_GROUP} group"
            )
        found[point.name] = ThirdParty(point.name, point.value, dist, error)
    return found


def known_names() -> list[str]:
    """Every entry name: the built-in ones, then the others' (even broken ones)."""
    builtins = builtin_names()
    return [*builtins, *(n for n in third_party() if n not in builtins)]


def entry_module(name: str) -> ModuleType:
    """Import the module of entry ``name``, built-in or third-party.

    Raises:
        KeyError: no entry of that name.
        ImportError: a third-party entry that is refused or cannot be imported;
            the message says which distribution registered it and why.
    """
    if name in builtin_names():
        return importlib.import_module(f"catalog.{name}")
    other = third_party()[name]
    if other.error is not None:
        raise ImportError(other.error)
    try:
        module = importlib.import_module(other.module)
    except Exception as exc:
        msg = (
            f"entry {name!r} (module {other.module}, from distribution "
            f"{other.distribution!r}) cannot be imported: {type(exc).__name__}: {exc}"
        )
        raise ImportError(msg) from exc
    setup = getattr(module, "dask_setup", None)
    entry = getattr(setup, "entry", None)
    if entry is None or entry.name != name:
        found = getattr(entry, "name", None)
        msg = (
            f"entry {name!r} (module {other.module}, from distribution "
            f"{other.distribution!r}) is not a catalog entry named {name!r}: its "
            "dask_setup must come from catalog.entry.entry_preload"
            + (f" (it declares entry {found!r})" if found else "")
        )
        raise ImportError(msg)
    _register_defaults(entry)
    return module


def _register_defaults(entry: object) -> None:
    """Register a third-party entry's config defaults when it is first loaded."""
    defaults = entry.defaults()  # type: ignore[attr-defined]
    dask.config.update_defaults({"catalog": {entry.name: defaults}})  # type: ignore[attr-defined]


def load_entries() -> tuple[list[ModuleType], dict[str, str]]:
    """Every usable entry module, and why each of the others is not usable.

    A broken third-party entry never breaks the built-ins: its error is
    returned (and logged once at WARNING) instead.
    """
    modules = [entry_module(name) for name in builtin_names()]
    broken: dict[str, str] = {}
    for name, other in third_party().items():
        if name in builtin_names():
            broken[f"{name} ({other.distribution})"] = str(other.error)
            continue
        try:
            modules.append(entry_module(name))
        except ImportError as exc:
            broken[name] = str(exc)
    for name, error in broken.items():
        if name not in _WARNED:
            _WARNED.add(name)
            logger.warning("catalog: third-party entry %s: %s", name, error)
    return modules, broken


_WARNED: set[str] = set()
