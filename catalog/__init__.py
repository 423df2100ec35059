"""dask-catalog: ready-made Dask distributed preloads and plugins.

``import catalog`` registers the catalog's config defaults; ``--preload catalog``
is the umbrella preload that turns entries on with ``--enable``.
"""

from __future__ import annotations

import importlib
from typing import Any

from catalog._config import register_defaults, share_distributed_log_handler
from catalog._registry import builtin_names, facade, load_entries
from catalog._status import status, status_text
from catalog._text import escape_log_lines
from catalog._version import __version__

#: The public classes, and the entry module each lives in (from the registry).
_FACADE = facade()

__all__ = [
    "ENTRY_MODULES",
    "__version__",
    "dask_setup",
    "dask_teardown",
    "entry_modules",
    "status",
    "status_text",
]
# ... and every built-in entry's public classes, declared in the registry.
__all__ += sorted(_FACADE)

#: The built-in entries of the catalog, in the order the umbrella installs them
#: (declared once, in catalog/_registry.py).
ENTRY_MODULES = builtin_names()

register_defaults()
share_distributed_log_handler()
#: Every line the catalog logs shows untrusted text (keys, event topics,
#: exception messages) with its control characters escaped.
escape_log_lines(["catalog", *(f"catalog.{name}" for name in ENTRY_MODULES)])


def entry_modules() -> list[Any]:
    """The entry modules, imported: the built-in ones, then other distributions'.

    A third-party entry that cannot be imported is left out (and logged); the
    built-ins never depend on it.
    """
    return load_entries()[0]


def __getattr__(name: str) -> Any:
    # Entry modules are imported on first use, so `dask catalog list` and the
    # config registration stay cheap; distributed's preload lookup of
    # `dask_setup` lands here too.
    if name in _FACADE:
        return getattr(importlib.import_module(f"catalog.{_FACADE[name]}"), name)
    if name in ("dask_setup", "dask_teardown"):
        from catalog._umbrella import umbrella_preload

        modules, broken = load_entries()
        setup, teardown = umbrella_preload(modules, broken)
        globals().update(dask_setup=setup, dask_teardown=teardown)
        return globals()[name]
    raise AttributeError(f"module 'catalog' has no attribute {name!r}")
