"""dask-catalog: ready-made Dask distributed preloads and plugins.

``import catalog`` registers the catalog's config defaults; ``--preload catalog``
is the umbrella preload that turns entries on with ``--enable``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from catalog._config import register_defaults, share_distributed_log_handler
from catalog._status import status, status_text
from catalog._text import escape_log_lines

try:
    __version__ = version("dask-catalog")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ENTRY_MODULES",
    "Dashboard",
    "Environment",
    "EventLog",
    "MemoryGuard",
    "Metrics",
    "NannyStructuredLogging",
    "OOMReporter",
    "Recycler",
    "SchedulerEnvironment",
    "SchedulerMetrics",
    "SchedulerRecycler",
    "SchedulerStructuredLogging",
    "SchedulerTracer",
    "StructuredLogging",
    "Tracer",
    "Watchdog",
    "WorkerDashboard",
    "WorkerEnvironment",
    "__version__",
    "dask_setup",
    "dask_teardown",
    "entry_modules",
    "status",
    "status_text",
]

#: Every entry of the catalog, in the order the umbrella installs them: env
#: first (it must act before anything reads the environment), logging next (so
#: the others' lines come out formatted).
ENTRY_MODULES = (
    *("env", "logging", "metrics", "tracer", "memory", "watchdog", "events"),
    *("recycle", "oom", "dashboard"),
)

#: The public classes, and the entry module each lives in.
_FACADE = {
    "Environment": "env",
    "WorkerEnvironment": "env",
    "SchedulerEnvironment": "env",
    "StructuredLogging": "logging",
    "SchedulerStructuredLogging": "logging",
    "NannyStructuredLogging": "logging",
    "Metrics": "metrics",
    "SchedulerMetrics": "metrics",
    "Tracer": "tracer",
    "SchedulerTracer": "tracer",
    "MemoryGuard": "memory",
    "Watchdog": "watchdog",
    "EventLog": "events",
    "Recycler": "recycle",
    "SchedulerRecycler": "recycle",
    "OOMReporter": "oom",
    "Dashboard": "dashboard",
    "WorkerDashboard": "dashboard",
}

register_defaults()
share_distributed_log_handler()
#: Every line the catalog logs shows untrusted text (keys, event topics,
#: exception messages) with its control characters escaped.
escape_log_lines(["catalog", *(f"catalog.{name}" for name in ENTRY_MODULES)])


def entry_modules() -> list[Any]:
    """The entry modules, imported."""
    return [importlib.import_module(f"catalog.{name}") for name in ENTRY_MODULES]


def __getattr__(name: str) -> Any:
    # Entry modules are imported on first use, so `dask catalog list` and the
    # config registration stay cheap; distributed's preload lookup of
    # `dask_setup` lands here too.
    if name in _FACADE:
        return getattr(importlib.import_module(f"catalog.{_FACADE[name]}"), name)
    if name in ("dask_setup", "dask_teardown"):
        from catalog._umbrella import umbrella_preload

        setup, teardown = umbrella_preload(entry_modules())
        globals().update(dask_setup=setup, dask_teardown=teardown)
        return globals()[name]
    raise AttributeError(f"module 'catalog' has no attribute {name!r}")
