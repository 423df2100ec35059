"""Hostile hooks: a plugin hook driven with garbage never raises into distributed."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import tempfile

import dask.config
import pytest
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog._entry import (
    RUNTIME_HOOKS,
    EntryPlugin,
    EntrySetupError,
    active_plugins,
)
from catalog._runtime import TaskInterrupt
from catalog.memory import TaskMemoryLimitExceeded
from catalog.watchdog import TaskTimeoutError
from tests.procs import LOOPBACK, local_cluster

PUBLIC = [
    name
    for name in catalog.__all__
    if isinstance(getattr(catalog, name), type)
    and issubclass(getattr(catalog, name), EntryPlugin)
]


class Hostile:
    """An argument that fails whatever is done with it."""

    def __getattr__(self, name):
        raise RuntimeError(f"no {name}")

    def __hash__(self):
        raise TypeError("unhashable")

    def __eq__(self, other):
        raise ValueError("no comparison")

    def __str__(self):
        raise ValueError("no str")

    __repr__ = __str__

    def __iter__(self):
        raise OSError("no iteration")

    def __len__(self):
        raise OverflowError("no len")


GARBAGE = [
    None,
    0,
    -1,
    math.nan,
    "",
    "x" * 10_000,
    b"\xff\xfe",
    ("tuple-key", 1),
    object(),
    [],
    {},
    Hostile(),
]


def plugins_for(tmp: str) -> list[EntryPlugin]:
    """One instance of every public class, configured to use every resource."""
    return [
        catalog.WorkerEnvironment(set=["X=1"]),
        catalog.SchedulerEnvironment(set=["X=1"]),
        catalog.StructuredLogging(file=f"{tmp}/w-{{pid}}.jsonl"),
        catalog.SchedulerStructuredLogging(file=f"{tmp}/s-{{pid}}.jsonl"),
        catalog.Metrics(port=0),
        catalog.SchedulerMetrics(port=0),
        catalog.Tracer(dir=f"{tmp}/trace"),
        catalog.SchedulerTracer(dir=f"{tmp}/trace"),
        catalog.MemoryGuard(task_limit="1GiB"),
        catalog.Watchdog(warn_after="1s", fail_after="1h"),
        catalog.EventLog(file=f"{tmp}/events.jsonl"),
    ]


def garbage_calls(method) -> list[tuple[tuple, dict]]:
    """Argument lists for ``method``: garbage for every parameter, and worse."""
    try:
        params = list(inspect.signature(method).parameters.values())[1:]  # self
    except (TypeError, ValueError):
        params = []
    named = [
        p
        for p in params
        if p.kind
        not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    calls: list[tuple[tuple, dict]] = [((), {}), ((), {"unexpected": 1})]
    for value in GARBAGE:
        positional = tuple(
            value
            for p in named
            if p.kind
            in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            )
        )
        keywords = {
            p.name: value for p in named if p.kind == inspect.Parameter.KEYWORD_ONLY
        }
        calls.append((positional, keywords))
        calls.append(((), {p.name: value for p in named}))
        calls.append(((*positional, value, value), {**keywords, "stimulus_id": value}))
    return calls


async def drive(plugin: EntryPlugin) -> int:
    """Call every run-time hook of ``plugin`` with garbage; return the call count."""
    count = 0
    for hook in sorted(RUNTIME_HOOKS):
        method = getattr(type(plugin), hook, None)
        # distributed's own no-op defaults are called by distributed with the
        # right arguments; the catalog's hooks must survive anything.
        if not getattr(method, "_catalog_guarded", False):
            continue
        for args, kwargs in garbage_calls(method):
            try:
                result = getattr(plugin, hook)(*args, **kwargs)
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:
                pytest.fail(f"{type(plugin).__name__}.{hook} raised {exc!r}")
            count += 1
    return count


def test_named_exceptions_escape_except_exception_but_are_exceptions_outside():
    # Inside the task a BaseException (library `except Exception` cannot eat it;
    # distributed's task runner catches BaseException). Pickled to the scheduler
    # and the client, an Exception: distributed's client only handles those.
    for exc in (TaskInterrupt, TaskTimeoutError, TaskMemoryLimitExceeded):
        assert not issubclass(exc, Exception)
        assert issubclass(exc.Reported, exc)
        assert issubclass(exc.Reported, Exception)


class NotAServer:
    """Garbage in the place of a server (weak-referenceable, as servers are)."""


class BrokenServer:
    address = None
    loop = None
    state = None
    name = Hostile()

    def __getattr__(self, name):
        raise RuntimeError(f"no {name}")


@pytest.mark.parametrize("name", PUBLIC)
@pytest.mark.parametrize("strict", [True, False])
def test_hooks_before_setup_and_lifecycle_on_garbage(name, strict):
    """Hooks of a plugin that never set up; teardown, setup, close on garbage."""
    asyncio.run(_before_setup_and_lifecycle(getattr(catalog, name), strict))


async def _before_setup_and_lifecycle(cls, strict: bool) -> None:
    with dask.config.set({"catalog.strict": strict}):
        guarded = [
            h
            for h in RUNTIME_HOOKS
            if getattr(getattr(cls, h, None), "_catalog_guarded", 0)
        ]
        assert (await drive(cls()) > 10) == bool(guarded)
        for server in (NotAServer(), BrokenServer()):
            plugin = cls()
            await lifecycle(plugin, "teardown", server)  # never set up: a no-op
            try:
                await lifecycle(plugin, "setup", server)
            except EntrySetupError as exc:
                assert strict and "could not set up" in str(exc)
            assert (await drive(plugin) > 10) == bool(guarded)
            await lifecycle(plugin, "teardown", server)
            await lifecycle(plugin, "close", server)
            assert not plugin.active


async def lifecycle(plugin, hook: str, server) -> None:
    from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin

    if isinstance(plugin, SchedulerPlugin):
        call = {"setup": plugin.start, "teardown": plugin.close}.get(hook, plugin.close)
        result = call(server) if hook == "setup" else call()
    elif hook == "close":
        return
    else:
        role = "nanny" if isinstance(plugin, NannyPlugin) else "worker"
        result = getattr(plugin, hook)(**{role: server})
    if inspect.isawaitable(result):
        await result


@gen_cluster(client=True, nthreads=[(LOOPBACK, 2)])
async def test_hooks_of_active_plugins_swallow_garbage(c, s, a):
    tmp = tempfile.mkdtemp()
    plugins = plugins_for(tmp)
    for plugin in plugins:
        await c.register_plugin(plugin)
    assert len(active_plugins(a)) == 6 and len(active_plugins(s)) == 5
    with captured_logger("catalog", level=logging.ERROR) as log:
        calls = 0
        for server in (a, s):
            for plugin in active_plugins(server).values():
                calls += await drive(plugin)
    assert calls > 500
    # Work goes on, and every entry is still active.
    futures = c.map(lambda x: x * 3, range(50))
    assert sum(await c.gather(futures)) == 3 * sum(range(50))
    for server in (a, s):
        for plugin in active_plugins(server).values():
            assert plugin.active, plugin
    # At most one ERROR line per plugin, however many calls failed.
    errors = [line for line in log.getvalue().splitlines() if "catalog entry" in line]
    assert len(errors) <= 11, errors
    noisy = [p for srv in (a, s) for p in active_plugins(srv).values() if p.errors]
    assert len(errors) == len(noisy)


@gen_cluster(client=True, nthreads=[])
async def test_a_disabled_scheduler_entry_does_not_break_scheduler_close(c, s):
    """After a failed setup (strict false) the scheduler still closes cleanly."""
    blocker = tempfile.mkdtemp() + "/file"
    open(blocker, "w").close()
    with dask.config.set({"catalog.strict": False}):
        await c.register_plugin(catalog.EventLog(file=f"{blocker}/events.jsonl"))
    (plugin,) = active_plugins(s).values()
    assert not plugin.active and plugin.last_error
    # distributed awaits before_close at close, and calls restart plainly.
    result = plugin.before_close()
    if not inspect.isawaitable(result):
        pytest.fail(f"disabled before_close returns {result!r}: not awaitable")
    await result
    assert plugin.restart(s) is None


@pytest.mark.slow
def test_a_nanny_entry_that_cannot_set_up_does_not_restart_the_worker(tmp_path):
    from distributed import Client

    blocker = tmp_path / "file"
    blocker.write_text("")
    with (
        dask.config.set({"catalog.strict": False}),
        local_cluster(1, processes=True) as cluster,
        Client(cluster) as client,
    ):
        kept = client.submit(lambda: 42, key="kept")
        assert kept.result() == 42
        (before,) = client.run(os.getpid).values()
        client.register_plugin(
            catalog.NannyStructuredLogging(file=str(blocker / "nanny.log"))
        )
        (after,) = client.run(os.getpid).values()
        assert after == before, "the worker was restarted and lost its data"
