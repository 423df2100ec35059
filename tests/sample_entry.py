"""A sample entry for testing the machinery (not part of the package)."""

from __future__ import annotations

from catalog._entry import (
    Entry,
    NannyEntryPlugin,
    Option,
    SchedulerEntryPlugin,
    WorkerEntryPlugin,
    entry_preload,
)
from catalog._options import Duration, Integer, NameValue, Size

__all__ = [
    "SampleNanny",
    "SampleScheduler",
    "SampleWorker",
    "dask_setup",
    "dask_teardown",
]

#: A count that makes setup fail, as a taken port or unwritable directory would.
FAILING_COUNT = 13

ENTRY = Entry(
    name="sample",
    summary="a sample entry for the machinery's tests",
    runs_on={
        "worker": "counts transitions",
        "scheduler": "counts transitions",
        "nanny": "sets a variable",
    },
    options=[
        Option("count", Integer(1), 3, "a count; 13 makes setup fail"),
        Option("limit", Size(nullable=True), None, "a size"),
        Option("every", Duration(), "1s", "a duration"),
        Option("set", NameValue(), [], "NAME=VALUE pairs", multiple=True),
    ],
)


class _Counting:
    def on_setup(self, server):
        if self.settings.count == FAILING_COUNT:
            raise OSError(f"resource {FAILING_COUNT} is taken")
        self.transitions = 0
        self.setups = getattr(server, "_sample_setups", 0) + 1
        server._sample_setups = self.setups
        server._sample_teardowns = getattr(server, "_sample_teardowns", 0)

    def on_teardown(self, server):
        server._sample_teardowns = getattr(server, "_sample_teardowns", 0) + 1

    def transition(self, key, start, finish, **kwargs):
        self.transitions += 1
        if isinstance(key, str) and key.startswith("explode"):
            raise ZeroDivisionError("a hook that raises")


class SampleWorker(_Counting, WorkerEntryPlugin):
    entry = ENTRY


class SampleScheduler(_Counting, SchedulerEntryPlugin):
    entry = ENTRY


class SampleNanny(NannyEntryPlugin):
    entry = ENTRY

    def on_setup(self, nanny):
        if self.settings.count == FAILING_COUNT:
            raise OSError(f"resource {FAILING_COUNT} is taken")
        for assignment in self.settings.set:
            name, _, value = assignment.partition("=")
            nanny.pre_spawn_env[name] = value


dask_setup, dask_teardown = entry_preload(
    ENTRY, worker=SampleWorker, scheduler=SampleScheduler, nanny=SampleNanny
)
