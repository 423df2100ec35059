"""Tests of catalog.watchdog: warnings with stacks, timeouts, running()."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import random
import subprocess
import sys
import threading
import time

import click
import dask
import pytest
from distributed import Client, secede
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog import _prom
from catalog._entry import OptionError
from catalog._runtime import TaskInterrupt
from catalog.watchdog import (
    ENTRY,
    EVENT_TOPIC,
    TaskTimeoutError,
    Watchdog,
    _task_frames,
    dask_setup,
    format_stack,
    running,
)
from tests.procs import REPO_ENV, local_cluster, worker_command

#: Real `dask scheduler` / `dask worker` processes import this module (task functions).
WORKER_ENV = REPO_ENV

ATTEMPTS: list[str] = []


def spin_for(seconds: float, tag: object = None) -> object:
    """A pure-Python task that loops (so an async exception lands at once)."""
    ATTEMPTS.append(str(tag))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return tag


def seceded_spin(seconds: float) -> str:
    secede()
    spin_for(seconds)
    return "done"


def sleep_in_c(seconds: float) -> str:
    time.sleep(seconds)  # C code: the exception waits until it returns
    return "slept"


def executor_threads_alive(dask_worker) -> list[bool]:
    return [t.is_alive() for t in dask_worker.executors["default"]._threads]


async def wait_for_events(client, action: str, count: int = 1, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        events = [
            m for _, m in await client.get_events(EVENT_TOPIC) if m["action"] == action
        ]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        await asyncio_sleep(0.05)


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# ---------------------------------------------------------------------------
# Unit
# ---------------------------------------------------------------------------


def test_defaults_and_options():
    plugin = Watchdog()
    assert plugin.name == "catalog.watchdog"
    assert plugin.settings.as_dict() == {
        "warn_after": 300.0,
        "fail_after": None,
        "interval": 1.0,
        "stack_depth": 8,
        "interrupt_grace": 5.0,
        "interrupt_attempts": 3,
    }
    plugin = Watchdog(warn_after="2s", fail_after="1m", interval="100ms", stack_depth=3)
    assert (plugin.settings.warn_after, plugin.settings.fail_after) == (2.0, 60.0)
    assert plugin.settings.interval == pytest.approx(0.1)
    assert Watchdog(warn_after="none").settings.warn_after is None
    assert catalog.Watchdog is Watchdog


def test_config_and_precedence():
    with dask.config.set({"catalog.watchdog.fail-after": "30s"}):
        assert Watchdog().settings.fail_after == 30.0
        assert Watchdog(fail_after="5s").settings.fail_after == 5.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"fail_after": "soon"}, "fail_after"),
        ({"warn_after": -1}, "warn_after"),
        ({"interval": "none"}, "interval"),
        ({"stack_depth": 0}, "stack_depth"),
    ],
)
def test_bad_values_name_the_option(kwargs, named):
    with pytest.raises(OptionError, match=named):
        Watchdog(**kwargs)


def test_unknown_keyword():
    with pytest.raises(TypeError, match="timeout"):
        Watchdog(timeout="1s")


def test_pickle_keeps_settings_only():
    plugin = Watchdog(fail_after="3s")
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.settings == plugin.settings
    assert not hasattr(clone, "_thread")


def test_task_timeout_error():
    exc = TaskTimeoutError("task 'x' ran longer than 3s")
    # Inside the task: not an Exception, so `except Exception` cannot eat it.
    assert isinstance(exc, TaskInterrupt)
    assert not isinstance(exc, Exception)
    # Pickled (to the scheduler and the client): still a TaskTimeoutError, and
    # an Exception / TimeoutError there, as a task error must be.
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is TaskTimeoutError.Reported
    assert isinstance(clone, TaskTimeoutError)
    assert isinstance(clone, TimeoutError)
    assert type(clone).__name__ == "TaskTimeoutError"
    assert str(clone) == "task 'x' ran longer than 3s"
    assert type(pickle.loads(pickle.dumps(clone))) is TaskTimeoutError.Reported


def test_dask_setup_parses_options():
    ctx = dask_setup.make_context(
        "dask_setup", ["--watchdog-fail-after", "30s", "--watchdog-interval", "250ms"]
    )
    assert ENTRY.given_from_params(ctx.params) == {"fail_after": 30.0, "interval": 0.25}
    with pytest.raises(click.BadParameter, match="soon"):
        dask_setup.parse_args(
            click.Context(dask_setup), ["--watchdog-fail-after", "soon"]
        )


def test_stack_is_the_innermost_frames():
    def inner():
        return _task_frames(sys._getframe(), depth=2)

    stack = inner()
    assert [f["name"] for f in stack] == ["test_stack_is_the_innermost_frames", "inner"]
    assert "_task_frames" in stack[-1]["line"]
    text = format_stack(stack)
    assert "in inner" in text
    assert format_stack([]) == "  (no Python frames)"


# ---------------------------------------------------------------------------
# In-process cluster
# ---------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_warns_with_stack_then_times_out(c, s, a):
    await c.register_plugin(
        Watchdog(warn_after="200ms", fail_after="1s", interval="50ms")
    )
    with captured_logger("catalog.watchdog") as log:
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError, match=r"ran longer than 1\.00 s"):
            await c.submit(spin_for, 60, "long")
        assert time.monotonic() - start < 30
        # The checker thread logs the timeout just after it raised it: the
        # client may hear of the error first.
        for _ in range(200):
            if "timed out after" in log.getvalue():
                break
            await asyncio.sleep(0.05)
    text = log.getvalue()
    assert "has been running for" in text
    assert "in spin_for" in text
    assert "timed out after" in text
    assert "fails at 1.00 s" in text
    # The worker survives and runs the next task.
    assert await c.submit(spin_for, 0.01, "next") == "next"
    warnings = await wait_for_events(c, "warning")
    timeouts = await wait_for_events(c, "timeout")
    assert warnings and timeouts
    event = timeouts[0]
    assert event["prefix"] == "spin_for"
    assert event["worker"] == a.address
    assert event["elapsed"] >= 1.0
    assert event["fail_after"] == 1.0
    assert any(f["name"] == "spin_for" for f in event["stack"])
    plugin = a.plugins["catalog.watchdog"]
    assert plugin.status()["timeouts"] == 1
    assert plugin.status()["warnings"] >= 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_annotation_sets_fail_after(c, s, a):
    await c.register_plugin(Watchdog(warn_after=None, interval="50ms"))
    with dask.annotate(catalog_timeout="300ms"):
        late = dask.delayed(spin_for)(60, "annotated")
    with pytest.raises(TaskTimeoutError):
        await c.compute(late)
    # Without the annotation there is no fail-after: this one runs to the end.
    assert await c.submit(spin_for, 0.5, "free") == "free"


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_annotation_none_lifts_the_default(c, s, a):
    await c.register_plugin(
        Watchdog(fail_after="200ms", warn_after=None, interval="50ms")
    )
    with dask.annotate(catalog_timeout="none"):
        ok = dask.delayed(spin_for)(0.6, "exempt")
    assert await c.compute(ok) == "exempt"


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_retries_rerun_once(c, s, a):
    await c.register_plugin(
        Watchdog(fail_after="300ms", warn_after=None, interval="50ms")
    )
    ATTEMPTS.clear()
    with pytest.raises(TaskTimeoutError):
        await c.submit(spin_for, 60, "retried", retries=1)
    assert ATTEMPTS == ["retried", "retried"]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_seceded_tasks_are_covered(c, s, a):
    await c.register_plugin(
        Watchdog(warn_after="200ms", fail_after="1s", interval="50ms")
    )
    with captured_logger("catalog.watchdog") as log:
        with pytest.raises(TaskTimeoutError):
            await c.submit(seceded_spin, 60)
    assert "long-running" in log.getvalue()
    assert await c.submit(spin_for, 0.01, "after") == "after"


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_blocked_in_c_gets_it_when_the_call_returns(c, s, a):
    await c.register_plugin(
        Watchdog(warn_after="300ms", fail_after="500ms", interval="50ms")
    )
    with captured_logger("catalog.watchdog") as log:
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError):
            await c.submit(sleep_in_c, 2)
        assert time.monotonic() - start >= 2
    text = log.getvalue()
    assert "TaskTimeoutError pending" in text
    assert "blocked outside Python" in text
    assert await c.submit(spin_for, 0.01, "after") == "after"


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_running_lists_tasks_with_stacks(c, s, a):
    await c.register_plugin(
        Watchdog(warn_after=None, fail_after="20s", interval="50ms")
    )
    fut = c.submit(spin_for, 3, "busy")
    while not a.active_threads:
        await asyncio_sleep(0.02)
    await asyncio_sleep(0.2)
    now = await running(c)
    (task,) = now[a.address]
    assert task["key"] == fut.key
    assert task["prefix"] == "spin_for"
    assert task["state"] == "executing"
    assert task["elapsed"] > 0
    assert task["fail_after"] == 20.0
    assert task["timed_out"] is False
    assert any(f["name"] == "spin_for" for f in task["stack"])
    await c.unregister_worker_plugin("catalog.watchdog")
    # Without the watchdog it still answers, from the worker's own start time.
    (task,) = (await running(c))[a.address]
    assert task["key"] == fut.key
    assert task["fail_after"] is None
    assert await fut == "busy"


@contextlib.contextmanager
def metrics_active(worker):
    """The metrics entry's families attached to ``worker``, as metrics would."""
    fam = _prom.Families("dask_catalog", {"worker": worker.address}, max_prefixes=10)
    _prom.attach(worker, fam)
    try:
        yield fam
    finally:
        _prom.detach(worker)


def counter_totals(fam) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels["prefix"]): s.value
        for metric in fam.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_metrics_counters(c, s, a):
    with metrics_active(a) as fam:
        await c.register_plugin(
            Watchdog(warn_after="100ms", fail_after="400ms", interval="50ms")
        )
        with pytest.raises(TaskTimeoutError):
            await c.submit(spin_for, 60, "m")
        samples = counter_totals(fam)
    assert samples[("dask_catalog_watchdog_timeouts_total", "spin_for")] == 1
    assert samples[("dask_catalog_watchdog_warnings_total", "spin_for")] >= 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_timeout_is_counted_when_the_client_sees_it(c, s, a, slow_interrupter):
    # The checker thread pauses right after raising: the task's leaving
    # transition counts the timeout, and the checker does not count it again.
    with metrics_active(a) as fam:
        await c.register_plugin(
            Watchdog(warn_after=None, fail_after="200ms", interval="50ms")
        )
        with pytest.raises(TaskTimeoutError):
            await c.submit(spin_for, 60, "m")
        seen = counter_totals(fam)
        await asyncio.sleep(0.8)  # the checker's pause is over
        later = counter_totals(fam)
    timeouts = ("dask_catalog_watchdog_timeouts_total", "spin_for")
    assert seen[timeouts] == later[timeouts] == 1
    assert a.plugins["catalog.watchdog"].status()["timeouts"] == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_teardown_stops_the_checker(c, s, a):
    await c.register_plugin(Watchdog(interval="50ms"))
    plugin = a.plugins["catalog.watchdog"]
    thread = plugin._thread
    assert thread.is_alive()
    await c.unregister_worker_plugin("catalog.watchdog")
    assert not thread.is_alive()
    assert "catalog-watchdog" not in [t.name for t in threading.enumerate()]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_bad_annotation_is_reported_not_raised(c, s, a):
    await c.register_plugin(Watchdog(fail_after="5s", warn_after=None, interval="50ms"))
    with dask.annotate(catalog_timeout="whenever"):
        task = dask.delayed(spin_for)(0.1, "kept")
    with captured_logger("catalog") as log:
        assert await c.compute(task) == "kept"
    status = a.plugins["catalog.watchdog"].status()
    assert status["errors"] == 1
    assert "catalog_timeout='whenever'" in status["last_error"]
    assert "whenever" in log.getvalue()


# ---------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_worker_warns_times_out_and_survives(procs):
    _, address = procs.scheduler(env=WORKER_ENV)
    worker = procs.worker(
        address,
        "--nthreads",
        "1",
        "--preload",
        "catalog.watchdog",
        "--watchdog-warn-after",
        "1s",
        "--watchdog-fail-after",
        "3s",
        "--watchdog-interval",
        "250ms",
        env=WORKER_ENV,
    )
    with Client(address, timeout=30) as client:
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError, match=r"ran longer than 3\.00 s"):
            client.submit(spin_for, 10, "cli").result(timeout=60)
        assert time.monotonic() - start < 10  # cut short, not run to its end
        worker.wait_for(r"catalog.watchdog - WARNING - Task .* has been running for")
        worker.wait_for(r"timed out after")
        assert "in spin_for" in worker.output
        events = client.get_events(EVENT_TOPIC)
        warning = next(m for _, m in events if m["action"] == "warning")
        timeout = next(m for _, m in events if m["action"] == "timeout")
        # Not before the limits, and the warning well before the timeout; how
        # soon after a limit the watchdog acts is benchmarks/watchdog_latency.py's
        # business, not a timed test's on a shared machine.
        assert 1.0 <= warning["elapsed"] < 3.0
        assert 3.0 <= timeout["elapsed"] < 10.0
        # The worker survives and runs the next task.
        assert client.submit(spin_for, 0.01, "next").result(timeout=30) == "next"

        # The annotation form, with retries=1: two attempts, two timeouts.
        with dask.annotate(catalog_timeout="500ms"):
            late = dask.delayed(spin_for, pure=False)(10, "again")
        with pytest.raises(TaskTimeoutError, match=r"500\.00 ms"):
            client.compute(late, retries=1).result(timeout=60)
        key = str(late.key)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            hits = [m for _, m in client.get_events(EVENT_TOPIC) if m["key"] == key]
            if len([m for m in hits if m["action"] == "timeout"]) >= 2:
                break
            time.sleep(0.1)
        assert [m["action"] for m in hits].count("timeout") == 2
        assert client.submit(spin_for, 0.01, "last").result(timeout=30) == "last"
    assert worker.popen.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--watchdog-fail-after", "soon"),
        ("--watchdog-interval", "0"),
        ("--watchdog-stack-depth", "x"),
    ],
)
def test_cli_bad_value_exits_2(option, value, tmp_path):
    done = subprocess.run(
        worker_command(
            "tcp://127.0.0.1:1", "--preload", "catalog.watchdog", option, value
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "Error:" in done.stderr
    assert option in done.stderr


@pytest.mark.slow
def test_race_tasks_finishing_at_fail_after_never_kill_the_executor():
    """Tasks that end right as the timeout fires: every outcome is clean.

    Each task either returns or fails with TaskTimeoutError; no executor thread
    dies, the worker process stays the same and later tasks run.
    """
    fail_after = 0.02
    with (
        local_cluster(1, processes=True, threads_per_worker=2) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(
            Watchdog(fail_after=fail_after, warn_after=None, interval="2ms")
        )
        pids = client.run(os.getpid)
        rng = random.Random(8)
        futures = [
            client.submit(
                spin_for, fail_after + rng.uniform(-0.003, 0.003), i, pure=False
            )
            for i in range(400)
        ]
        outcomes = {"ok": 0, "timeout": 0}
        for fut in futures:
            try:
                fut.result(timeout=60)
                outcomes["ok"] += 1
            except TaskTimeoutError:
                outcomes["timeout"] += 1
        assert outcomes["ok"] > 0 and outcomes["timeout"] > 0, outcomes
        assert sum(outcomes.values()) == 400
        assert client.run(executor_threads_alive) == {
            addr: [True, True] for addr in pids
        }
        with dask.annotate(catalog_timeout="none"):
            later = [dask.delayed(spin_for, pure=False)(0.05, i) for i in range(4)]
        assert client.compute(later, sync=True) == [0, 1, 2, 3]
        assert client.run(os.getpid) == pids


# ---------------------------------------------------------------------------
# Interrupts that do not stop the task: re-fired, then given up on (#22)
# ---------------------------------------------------------------------------


def swallow_everything(seconds: float) -> str:
    """A task that catches even BaseException: no interrupt can stop it."""
    deadline = time.perf_counter() + seconds
    caught = 0
    while True:  # every instruction of the work is inside the try
        try:
            while time.perf_counter() < deadline:
                pass
            return f"survived {caught}"
        except BaseException:
            caught += 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_swallowed_timeout_is_fired_again_then_given_up_on(c, s, a):
    with metrics_active(a) as fam:
        await c.register_plugin(
            Watchdog(
                fail_after="200ms",
                warn_after=None,
                interval="20ms",
                interrupt_grace="200ms",
                interrupt_attempts=2,
            )
        )
        with captured_logger("catalog.watchdog") as log:
            fut = c.submit(swallow_everything, 3)
            events = await wait_for_events(c, "unstoppable")
            (task,) = (await running(c))[a.address]
            result = await fut
        samples = {name: v for (name, _), v in counter_totals(fam).items()}
    assert result.startswith("survived")
    assert int(result.split()[1]) >= 2  # both interrupts landed, and were eaten
    text = log.getvalue()
    assert "interrupted again" in text
    assert "attempt 2 of 2" in text
    assert "cannot be stopped" in text
    (event,) = events
    assert event["key"] == fut.key
    assert event["attempt"] == 2
    assert task["unstoppable"] is True
    assert task["interrupts"] == 2
    status = a.plugins["catalog.watchdog"].status()
    assert (status["timeouts"], status["refires"], status["unstoppable"]) == (1, 1, 1)
    assert samples["dask_catalog_watchdog_timeouts_total"] == 1
    assert samples["dask_catalog_watchdog_refires_total"] == 1
    assert samples["dask_catalog_watchdog_unstoppable_total"] == 1
    # The worker and its thread are fine.
    assert await c.submit(spin_for, 0.01, "after") == "after"


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_annotation_cache_is_bounded_and_counts_the_overflow(c, s, a):
    import catalog.watchdog as watchdog_module

    await c.register_plugin(Watchdog(warn_after=None, interval="50ms"))
    plugin = a.plugins["catalog.watchdog"]
    cap = 5
    original = watchdog_module.MAX_CACHED_ANNOTATIONS
    watchdog_module.MAX_CACHED_ANNOTATIONS = cap
    try:
        tasks = []
        for i in range(cap + 3):
            with dask.annotate(catalog_timeout=f"{100 + i}s"):
                tasks.append(dask.delayed(spin_for, pure=False)(0, i))
        assert await c.gather(c.compute(tasks)) == list(range(cap + 3))
    finally:
        watchdog_module.MAX_CACHED_ANNOTATIONS = original
    assert len(plugin._timeouts) == cap
    assert plugin.status()["annotation_cache_overflow"] == 3
