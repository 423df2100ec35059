"""The entry-author API: everything an entry of the catalog is written with.

The built-in entries import only from this module, and so can an entry that
lives in a package of its own (registered through the ``dask_catalog.entries``
entry-point group). Its ``__all__`` is stable: names are added, never removed
or renamed without a deprecation.

The one exception, checked by ``tests/test_entry_api.py``: a built-in entry may
import a private helper module that belongs to it alone and to no other entry
(``catalog._fine_metrics`` and ``catalog._http`` for metrics, ``catalog._otel``
for otel, ``catalog._env_cores`` for env, ``catalog._log_format`` for logging,
``catalog._memory_attribution`` for memory, ``catalog._watchdog_stacks`` for
watchdog, ``catalog._dashboard_settings`` for dashboard);
the module's name says whose it is. Metrics, which serves ``/metrics``, may
use the exposition side of ``catalog._prom`` (attaching families to a server,
the process collector).
"""

from __future__ import annotations

from catalog._declare import Entry, EntrySetupError, Option, OptionError, Settings
from catalog._files import (
    MAX_BACKUPS,
    JsonLinesFile,
    expand_path,
    json_line,
    open_private,
    private_dir,
    safe_filename,
)
from catalog._install import entry_preload
from catalog._interrupt import (
    RETRY_INTERVAL,
    Firing,
    TaskInterrupt,
    at_safe_point,
    interrupt_options,
    is_task_runner,
    pending,
)
from catalog._options import (
    ENV_NAME,
    Boolean,
    Choice,
    Duration,
    FloatList,
    Integer,
    LogLevel,
    NameValue,
    OptionType,
    RotateSize,
    Size,
    SizeOrFraction,
    Text,
)
from catalog._plugin import (
    EntryPlugin,
    NannyEntryPlugin,
    SchedulerEntryPlugin,
    WorkerEntryPlugin,
    address_of,
    guards_itself,
    now,
    plugin_on,
    role_of,
)
from catalog._prom import (
    OTHER,
    Collector,
    Families,
    Histogram,
    add_collector,
    families_for,
    histogram_family,
    remove_collector,
)
from catalog._runtime import (
    RUNNING_STATES,
    bounded,
    client_call,
    client_then,
    count,
    log_worker_event,
    prefix_of,
    run_soon,
    server_running,
)
from catalog._secrets import mask, mask_text
from catalog._status import local_status
from catalog._text import comma_items
from catalog._version import __version__

__all__ = [
    "ENV_NAME",
    "MAX_BACKUPS",
    "OTHER",
    "RETRY_INTERVAL",
    "RUNNING_STATES",
    "Boolean",
    "Choice",
    "Collector",
    "Duration",
    "Entry",
    "EntryPlugin",
    "EntrySetupError",
    "Families",
    "Firing",
    "FloatList",
    "Histogram",
    "Integer",
    "JsonLinesFile",
    "LogLevel",
    "NameValue",
    "NannyEntryPlugin",
    "Option",
    "OptionError",
    "OptionType",
    "RotateSize",
    "SchedulerEntryPlugin",
    "Settings",
    "Size",
    "SizeOrFraction",
    "TaskInterrupt",
    "Text",
    "WorkerEntryPlugin",
    "__version__",
    "add_collector",
    "address_of",
    "at_safe_point",
    "bounded",
    "client_call",
    "client_then",
    "comma_items",
    "count",
    "entry_preload",
    "expand_path",
    "families_for",
    "guards_itself",
    "histogram_family",
    "interrupt_options",
    "is_task_runner",
    "json_line",
    "local_status",
    "log_worker_event",
    "mask",
    "mask_text",
    "now",
    "open_private",
    "pending",
    "plugin_on",
    "prefix_of",
    "private_dir",
    "remove_collector",
    "role_of",
    "run_soon",
    "safe_filename",
    "server_running",
]
