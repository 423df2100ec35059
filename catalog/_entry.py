"""Entry machinery, re-exported from its modules by concern.

:mod:`catalog._declare` (options, settings, the :class:`Entry` declaration),
:mod:`catalog._plugin` (the plugin life cycle) and :mod:`catalog._install`
(preloads and installing an entry on a server). ``catalog._entry`` keeps every
name it had so that code written against it before the split still runs; new
code imports :mod:`catalog.entry` (entries) or the concern's module.
"""

from __future__ import annotations

from catalog._declare import (
    _WARNED,
    Entry,
    EntrySetupError,
    Option,
    OptionError,
    Settings,
    entry_names,
    iter_entries,
)
from catalog._install import (
    FailedSchedulerSetup,
    FailedSetup,
    PreloadCommand,
    _add_pending_worker_plugin,
    _client_register,
    _describe_usage_error,
    _nanny_setup,
    _worker_setup_now,
    active_plugins,
    entry_preload,
    install,
    refuse,
    uninstall,
)
from catalog._plugin import (
    _ACTIVE,
    _ROLES,
    RUNTIME_HOOKS,
    EntryPlugin,
    NannyEntryPlugin,
    SchedulerEntryPlugin,
    WorkerEntryPlugin,
    _async_noop,
    _guarded,
    _noop,
    _SchedulerCloser,
    address_of,
    guards_itself,
    now,
    role_of,
)

__all__ = [
    "RUNTIME_HOOKS",
    "Entry",
    "EntryPlugin",
    "EntrySetupError",
    "FailedSchedulerSetup",
    "FailedSetup",
    "NannyEntryPlugin",
    "Option",
    "OptionError",
    "PreloadCommand",
    "SchedulerEntryPlugin",
    "Settings",
    "WorkerEntryPlugin",
    "active_plugins",
    "address_of",
    "entry_names",
    "entry_preload",
    "guards_itself",
    "install",
    "iter_entries",
    "now",
    "refuse",
    "role_of",
    "uninstall",
]

#: Private names that older code reached through this module; this round only.
_PRIVATE_REEXPORTS = (
    _ACTIVE,
    _ROLES,
    _WARNED,
    _SchedulerCloser,
    _add_pending_worker_plugin,
    _async_noop,
    _client_register,
    _describe_usage_error,
    _guarded,
    _noop,
    _nanny_setup,
    _worker_setup_now,
)
