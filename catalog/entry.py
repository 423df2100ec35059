"""The entry-author API: everything an entry of the catalog is written with.

The built-in entries import only from this module, and so can an entry that
lives in a package of its own (registered through the ``dask_catalog.entries``
entry-point group). Its ``__all__`` is stable: names are added, never removed
or renamed without a deprecation.
"""

from __future__ import annotations

from catalog._entry import (
    Entry,
    EntryPlugin,
    EntrySetupError,
    NannyEntryPlugin,
    Option,
    OptionError,
    SchedulerEntryPlugin,
    Settings,
    WorkerEntryPlugin,
    address_of,
    entry_preload,
    guards_itself,
    now,
    role_of,
)
from catalog._options import (
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
from catalog._prom import OTHER, add_collector, families_for, remove_collector
from catalog._runtime import (
    MAX_BACKUPS,
    Firing,
    JsonLinesFile,
    TaskInterrupt,
    at_safe_point,
    bounded,
    expand_path,
    interrupt_options,
    log_worker_event,
    prefix_of,
    private_dir,
    run_soon,
    server_running,
)
from catalog._secrets import mask, mask_text

__all__ = [
    "MAX_BACKUPS",
    "OTHER",
    "Boolean",
    "Choice",
    "Duration",
    "Entry",
    "EntryPlugin",
    "EntrySetupError",
    "Firing",
    "FloatList",
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
    "add_collector",
    "address_of",
    "at_safe_point",
    "bounded",
    "entry_preload",
    "expand_path",
    "families_for",
    "guards_itself",
    "interrupt_options",
    "log_worker_event",
    "mask",
    "mask_text",
    "now",
    "prefix_of",
    "private_dir",
    "remove_collector",
    "role_of",
    "run_soon",
    "server_running",
]
