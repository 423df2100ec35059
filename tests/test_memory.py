"""Tests of catalog.memory: the memory guard."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import sys
import time

import dask
import pytest
from distributed import Client, KilledWorker
from distributed.core import Status
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog import _prom
from catalog._entry import OptionError
from catalog._prom import Families
from catalog.memory import (
    ENTRY,
    MemoryGuard,
    TaskMemoryLimitExceeded,
    dask_setup,
    host_decision,
    merge_reports,
    report,
    split_growth,
)
from tests.procs import LOOPBACK, REPO_ENV, local_cluster, worker_command
from tests.reliability import collected
from tests.test_metrics import scrape_of, value

MiB = 2**20


def grow(step_mib: int = 20, steps: int = 50, pause: float = 0.02) -> int:
    """Touch ``step_mib`` more MiB per iteration; return the MiB held at the end."""
    held = []
    for _ in range(steps):
        held.append(b"x" * (step_mib * MiB))  # written, so really resident
        time.sleep(pause)
    return len(held) * step_mib


def make_data(n: int) -> bytes:
    return b"d" * n


def worker_pid() -> int:
    return os.getpid()


def times_computed(client: Client, key: str) -> int:
    """How often the scheduler sent ``key`` to a worker (from its transition log)."""

    def count(dask_scheduler) -> int:
        return sum(1 for t in dask_scheduler.story(key) if t[2] == "processing")

    return client.run_on_scheduler(count)


def guard_events(client: Client) -> list[dict]:
    return [msg for _, msg in client.get_events("catalog.memory")]


async def guard_events_async(client: Client) -> list[dict]:
    return [msg for _, msg in await client.get_events("catalog.memory")]


# ---------------------------------------------------------------------------
# Unit level
# ---------------------------------------------------------------------------


def test_defaults_and_names():
    guard = MemoryGuard()
    assert guard.name == "catalog.memory"
    assert guard.settings.task_limit is None
    assert guard.settings.process_limit == 0.9
    assert guard.settings.host_min_available is None
    assert guard.settings.interval == 0.05
    assert catalog.MemoryGuard is MemoryGuard


def test_settings_parse_sizes_and_fractions():
    guard = MemoryGuard(
        task_limit="300MiB",
        process_limit="3GiB",
        host_min_available=0.1,
        interval="10ms",
    )
    assert guard.settings.task_limit == 300 * MiB
    assert guard.settings.process_limit == 3 * 2**30
    assert guard.settings.host_min_available == 0.1
    assert guard.settings.interval == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"task_limit": "lots"}, "task_limit"),
        ({"task_limit": "300"}, "task_limit"),
        ({"process_limit": 1.5}, "process_limit"),
        ({"host_min_available": "-1GiB"}, "host_min_available"),
        ({"interval": "0s"}, "interval"),
    ],
)
def test_bad_python_values_name_the_option(kwargs, named):
    with pytest.raises(OptionError, match=named):
        MemoryGuard(**kwargs)


def test_config_is_read_at_construction():
    with dask.config.set({"catalog.memory.task-limit": "1GiB"}):
        assert MemoryGuard().settings.task_limit == 2**30
    assert MemoryGuard(task_limit="2GiB").settings.task_limit == 2 * 2**30


def test_pickle_keeps_only_settings():
    guard = MemoryGuard(task_limit="300MiB", interval="20ms")
    clone = pickle.loads(pickle.dumps(guard))
    assert clone.settings == guard.settings
    assert not clone.active
    assert clone.peak_of("x") is None


def test_exception_is_a_memory_error_on_the_client_and_pickles():
    exc = TaskMemoryLimitExceeded("task 'x' exceeded its memory limit")
    # Inside the task neither `except Exception` nor `except MemoryError` eats it.
    assert isinstance(exc, catalog._runtime.TaskInterrupt)
    assert not isinstance(exc, Exception)
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is TaskMemoryLimitExceeded.Reported
    assert isinstance(clone, TaskMemoryLimitExceeded)
    assert isinstance(clone, MemoryError)
    assert str(clone) == "task 'x' exceeded its memory limit"
    # tblib, which distributed ships exceptions with, calls cls.__new__ directly.
    assert str(type(clone).__new__(type(clone), "again")) == "again"


def test_dask_setup_parses_its_options():
    ctx = dask_setup.make_context(
        "dask_setup",
        ["--memory-task-limit", "300MiB", "--memory-process-limit", "0.85"],
    )
    given = ENTRY.given_from_params(ctx.params)
    assert given == {"task_limit": 300 * MiB, "process_limit": 0.85}
    bad = dask_setup.make_context("dask_setup", ["--memory-process-limit", "1.5"])
    assert "--memory-process-limit" in bad.params["_usage_error"]


def test_split_growth_rule():
    assert split_growth(100.0, [0.0], [None]) == [100.0]
    # Growth follows page faults; an unknown weight takes the mean of the known.
    assert split_growth(100.0, [0.0, 0.0], [300, 100]) == [75.0, 25.0]
    assert split_growth(90.0, [0.0, 0.0, 0.0], [None, 10, 20]) == [30.0, 20.0, 40.0]
    assert split_growth(90.0, [0.0, 0.0, 0.0], [None, None, None]) == [30.0] * 3
    # A drop goes to the tasks holding memory, in proportion.
    assert split_growth(-40.0, [30.0, 10.0], [5, 5]) == [-30.0, -10.0]
    assert split_growth(-40.0, [0.0, 0.0], [5, 5]) == [-20.0, -20.0]


def test_host_decision_has_hysteresis():
    assert host_decision(False, 90, 100) == "pause"
    assert host_decision(False, 110, 100) is None
    assert host_decision(True, 110, 100) is None  # not yet 1.25x
    assert host_decision(True, 126, 100) == "resume"


def test_merge_reports():
    merged = merge_reports(
        {
            "w1": {
                "grow": {"count": 1, "mean": 10.0, "max": 10, "shared": 0, "failed": 1}
            },
            "w2": {
                "grow": {"count": 3, "mean": 30.0, "max": 50, "shared": 2, "failed": 0}
            },
        }
    )
    assert merged == {
        "grow": {"count": 4, "mean": 25.0, "max": 50, "shared": 2, "failed": 1}
    }


# ---------------------------------------------------------------------------
# In-process cluster
# ---------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_task_limit_fails_the_task_and_worker_goes_on(c, s, a):
    guard = MemoryGuard(task_limit="100MiB", interval="20ms")
    await c.register_plugin(guard)
    with captured_logger("catalog.memory", level=logging.WARNING) as log:
        fut = c.submit(grow, 10, 60, 0.01, key="grow-1")
        with pytest.raises(TaskMemoryLimitExceeded, match=r"grow-1.*100\.00 MiB"):
            await fut
    assert "exceeded its memory limit" in log.getvalue()
    assert await c.submit(sum, [1, 2], key="after") == 3
    plugin = a.plugins["catalog.memory"]
    peak = plugin.peak_of("grow-1")
    assert peak is not None and 100 * MiB < peak < 400 * MiB
    for _ in range(100):
        events = await guard_events_async(c)
        if events:
            break
        await asyncio.sleep(0.05)
    (event,) = events
    assert event["action"] == "task-limit"
    assert event["key"] == "grow-1"
    assert event["prefix"] == "grow"
    assert event["limit"] == 100 * MiB
    assert event["observed"] > 100 * MiB
    stats = await report(c)
    assert stats["grow"]["count"] == 1
    assert stats["grow"]["failed"] == 1
    assert stats["grow"]["max"] == peak


def test_rss_reader_reads_what_psutil_reads_and_falls_back_after_close():
    import psutil

    from catalog.memory import RssReader

    process = psutil.Process()
    reader = RssReader(process)
    try:
        block = b"r" * (32 * MiB)  # RSS moves between readings: compare in between
        before = process.memory_info().rss
        ours = reader()
        after = process.memory_info().rss
        assert min(before, after) - MiB <= ours <= max(before, after) + MiB
        assert len(block) == 32 * MiB
    finally:
        reader.close()
    assert reader.fd is None
    assert abs(reader() - process.memory_info().rss) <= MiB  # psutil now


def nap(i: int, seconds: float = 0.02) -> int:
    time.sleep(seconds)
    return i


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_tasks_shorter_than_the_interval_are_counted_with_their_growth(c, s, a):
    # `--enable metrics,memory`; no sample can land inside a task.
    await c.register_plugin(catalog.Metrics())
    await c.register_plugin(MemoryGuard(interval="30s"))
    assert await c.gather([c.submit(nap, i, key=f"nap-{i}") for i in range(3)])
    held = c.submit(make_data, 64 * MiB, key="make_data-1")
    await held  # the result stays on the worker: RSS grew by it, start to end
    text = scrape_of(a)
    assert value(text, "dask_catalog_task_peak_memory_bytes_count", prefix="nap") == 3
    count = value(text, "dask_catalog_task_peak_memory_bytes_count", prefix="make_data")
    assert count == 1
    total = value(text, "dask_catalog_task_peak_memory_bytes_sum", prefix="make_data")
    assert total >= 60 * MiB
    stats = await report(c)
    assert stats["nap"]["count"] == 3
    assert stats["make_data"]["count"] == 1
    assert stats["make_data"]["max"] >= 60 * MiB
    assert a.plugins["catalog.memory"].peak_of("make_data-1") >= 60 * MiB


@gen_cluster(client=True, nthreads=[(LOOPBACK, 2)])
async def test_sampled_and_short_tasks_are_each_counted_exactly_once(c, s, a):
    await c.register_plugin(catalog.Metrics())
    await c.register_plugin(MemoryGuard(interval="20ms"))
    long = [c.submit(grow, 5, 10, 0.02, key=f"grow-{i}") for i in range(2)]
    short = [c.submit(nap, i, 0.002, key=f"nap-{i}") for i in range(20)]
    await c.gather(long + short)
    text = scrape_of(a)
    counts = {
        prefix: value(text, "dask_catalog_task_peak_memory_bytes_count", prefix=prefix)
        for prefix in ("grow", "nap")
    }
    assert counts == {"grow": 2, "nap": 20}
    stats = await report(c)
    assert (stats["grow"]["count"], stats["nap"]["count"]) == (2, 20)
    # Sampled while growing to 50 MiB. The peak is RSS growth, and the
    # allocator may hand back pages an earlier test already made resident (a
    # CI run saw 37.3 MiB against a 40 MiB bound): the bound says "sampled".
    assert stats["grow"]["max"] >= 20 * MiB


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_failed_task_is_counted_when_the_client_sees_it(
    c, s, a, slow_interrupter
):
    # The sampler thread pauses right after raising: the task's leaving
    # transition reports the failure, and the sampler does not report it again.
    fam = Families("dask_catalog", {"worker": a.address}, max_prefixes=10)
    _prom.attach(a, fam)
    try:
        await c.register_plugin(MemoryGuard(task_limit="50MiB", interval="20ms"))
        with captured_logger("catalog.memory") as log:
            with pytest.raises(TaskMemoryLimitExceeded):
                await c.submit(grow, 10, 60, 0.01, key="hog-1")
            seen = collected(fam, "dask_catalog_memory_actions_total", "action")
            await asyncio.sleep(0.8)  # the sampler's pause is over
            later = collected(fam, "dask_catalog_memory_actions_total", "action")
    finally:
        _prom.detach(a)
    assert seen == later == {"task-limit": 1}
    assert log.getvalue().count("exceeded its memory limit") == 1


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_metrics_families_when_metrics_entry_is_active(c, s, a):
    # What the metrics entry does at setup: attach this worker's families.
    fam = Families("dask_catalog", {"worker": a.address}, max_prefixes=10)
    _prom.attach(a, fam)
    try:
        await c.register_plugin(MemoryGuard(task_limit="50MiB", interval="20ms"))
        with pytest.raises(TaskMemoryLimitExceeded):
            await c.submit(grow, 10, 60, 0.01, key="hog-1")
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in fam.collect()
            for sample in metric.samples
        }
    finally:
        _prom.detach(a)
    action = (
        "dask_catalog_memory_actions_total",
        (("action", "task-limit"), ("prefix", "hog"), ("worker", a.address)),
    )
    assert samples[action] == 1
    count = (
        "dask_catalog_task_peak_memory_bytes_count",
        (("prefix", "hog"), ("worker", a.address)),
    )
    assert samples[count] == 1
    total = (
        "dask_catalog_task_peak_memory_bytes_sum",
        (("prefix", "hog"), ("worker", a.address)),
    )
    assert samples[total] > 50 * MiB


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_annotation_overrides_task_limit(c, s, a):
    await c.register_plugin(MemoryGuard(task_limit="2GiB", interval="20ms"))
    with dask.annotate(catalog_memory_limit="60MiB"):
        fut = c.submit(grow, 10, 60, 0.01, key="tight")
    with pytest.raises(TaskMemoryLimitExceeded, match=r"60\.00 MiB"):
        await fut
    # The same work without the annotation runs to the end under 2GiB.
    assert await c.submit(grow, 10, 12, 0.01, key="loose") == 120
    # Measured, though freed memory the allocator reuses does not count as growth.
    assert a.plugins["catalog.memory"].peak_of("loose") is not None


@gen_cluster(
    client=True,
    nthreads=[(LOOPBACK, 1)],
    worker_kwargs={"memory_limit": "64GiB"},
)
async def test_host_pause_holds_against_distributed_monitor(c, s, a):
    # More than any host has available: the guard pauses at once.
    await c.register_plugin(MemoryGuard(host_min_available="1000TiB", interval="20ms"))
    for _ in range(200):
        if a.status == Status.paused:
            break
        await asyncio.sleep(0.02)
    assert a.status == Status.paused
    # distributed's monitor (100 ms, process far below its pause fraction)
    # would unpause it; the guard's pause holds.
    await asyncio.sleep(0.5)
    assert a.status == Status.paused
    fut = c.submit(sum, [1, 2], key="waits")
    await asyncio.sleep(0.3)
    assert not fut.done()
    assert any(e["action"] == "pause" for e in await guard_events_async(c))
    # Removing the guard resumes the worker and the task runs.
    await c.unregister_worker_plugin("catalog.memory")
    assert await fut == 3
    assert a.status == Status.running
    assert "_maybe_pause_or_unpause" not in a.memory_manager.__dict__


def seceded_grow() -> int:
    from distributed import secede

    secede()
    return grow(10, 60, 0.01)


def alloc_then_block(mib: int, seconds: float) -> int:
    held = b"x" * (mib * MiB)
    time.sleep(seconds)  # one C call: an async exception waits for its return
    return len(held)


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_seceded_task_is_still_guarded_and_counted_once(c, s, a):
    await c.register_plugin(MemoryGuard(task_limit="60MiB", interval="20ms"))
    with pytest.raises(TaskMemoryLimitExceeded, match="seceded"):
        await c.submit(seceded_grow, key="seceded")
    stats = await report(c)
    assert stats["seceded"]["count"] == 1
    assert stats["seceded"]["failed"] == 1


@gen_cluster(client=True, nthreads=[(LOOPBACK, 2)])
async def test_task_blocked_in_c_then_still_rising_warns(c, s, a):
    import psutil

    rss = psutil.Process().memory_info().rss
    guard = MemoryGuard(
        task_limit="50MiB", process_limit=f"{rss // MiB + 120}MiB", interval="20ms"
    )
    await c.register_plugin(guard)
    with captured_logger("catalog.memory", level=logging.WARNING) as log:
        blocked = c.submit(alloc_then_block, 80, 2.0, key="blocked")
        while "blocked" not in a.active_threads.values():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        grower = c.submit(grow, 4, 100, 0.02, key="grower")
        with pytest.raises(TaskMemoryLimitExceeded, match="task-limit"):
            await blocked
        with pytest.raises(TaskMemoryLimitExceeded, match="process-limit"):
            await grower
    assert "was failed but has not stopped" in log.getvalue()
    actions = [(e["action"], e["key"]) for e in await guard_events_async(c)]
    assert actions[:3] == [
        ("task-limit", "blocked"),
        ("still-running", "blocked"),
        ("process-limit", "grower"),
    ]
    # The worker's threads survived: both run the next tasks.
    assert await c.gather(c.map(sum, [[1], [2], [3]])) == [1, 2, 3]


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_teardown_stops_the_sampler(c, s, a):
    await c.register_plugin(MemoryGuard(interval="10ms"))
    plugin = a.plugins["catalog.memory"]
    thread = plugin._state.thread
    assert thread.is_alive()
    await c.unregister_worker_plugin("catalog.memory")
    assert not thread.is_alive()
    assert not plugin.active


# ---------------------------------------------------------------------------
# Real worker processes
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_worker_fails_task_keeps_data_and_pid(procs):
    _, address = procs.scheduler(env=REPO_ENV)
    worker = procs.worker(
        address,
        "--nthreads",
        "1",
        "--memory-limit",
        "2GiB",
        "--preload",
        "catalog.memory",
        "--memory-task-limit",
        "300MiB",
        env=REPO_ENV,
    )
    with Client(address) as client:
        pid = client.submit(worker_pid, pure=False).result()
        data = client.submit(make_data, 10 * MiB, key="earlier")
        assert len(data.result()) == 10 * MiB
        fut = client.submit(grow, 20, 50, 0.02, key="hog")
        with pytest.raises(TaskMemoryLimitExceeded, match=r"hog.*300\.00 MiB") as info:
            fut.result(timeout=60)
        assert "task-limit" in str(info.value)
        # Same process, earlier result still there (no recomputation), next task runs.
        assert client.submit(worker_pid, pure=False).result() == pid
        held = client.run(lambda dask_worker: "earlier" in dask_worker.data)
        assert list(held.values()) == [True]
        assert times_computed(client, "earlier") == 1
        assert client.submit(len, data).result() == 10 * MiB
        deadline = time.monotonic() + 10
        while not guard_events(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        (event,) = guard_events(client)
        assert event["action"] == "task-limit"
        assert 300 * MiB < event["observed"] < 400 * MiB
        stats = report(client)
        assert stats["hog"]["failed"] == 1
        assert 300 * MiB < stats["hog"]["max"] < 400 * MiB
    # An operator sees the WARNING on the worker's stderr without the logging entry.
    worker.wait_for(r"catalog\.memory - WARNING - task .hog. exceeded its memory limit")


@pytest.mark.slow
def test_without_guard_the_nanny_restarts_the_worker():
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        local_cluster(processes=True, memory_limit="600MiB") as cluster,
        Client(cluster) as client,
    ):
        pid = client.submit(worker_pid, pure=False).result()
        data = client.submit(make_data, MiB, key="earlier")
        data.result()
        fut = client.submit(grow, 20, 60, 0.02, key="hog")
        with pytest.raises(KilledWorker):
            fut.result(timeout=120)
        client.wait_for_workers(1, timeout=60)
        assert client.submit(worker_pid, pure=False).result() != pid
        # The earlier result died with the worker and was computed again.
        assert data.result() == b"d" * MiB
        assert times_computed(client, "earlier") == 2


@pytest.mark.slow
def test_process_limit_fails_the_larger_of_two_growing_tasks():
    with (
        local_cluster(
            processes=True, threads_per_worker=2, memory_limit="2GiB"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(MemoryGuard(process_limit="800MiB", interval="20ms"))
        base = client.run(lambda: __import__("psutil").Process().memory_info().rss)
        (base_rss,) = base.values()
        assert base_rss < 500 * MiB
        big = client.submit(grow, 20, 60, 0.02, key="big")
        small = client.submit(grow, 4, 60, 0.02, key="small")
        with pytest.raises(TaskMemoryLimitExceeded, match="process-limit"):
            big.result(timeout=60)
        assert small.result(timeout=60) == 240
        events = guard_events(client)
        failed = [e for e in events if e["action"] == "process-limit"]
        assert [e["key"] for e in failed] == ["big"]
        assert failed[0]["shared"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "value"),
    [("--memory-task-limit", "lots"), ("--memory-process-limit", "1.5")],
)
def test_bad_cli_values_exit_2_naming_the_option(flag, value):
    result = subprocess.run(
        worker_command(
            f"tcp://{LOOPBACK}:1", "--preload", "catalog.memory", flag, value
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if "Error:" in line]
    assert error and flag in result.stderr, result.stderr
    assert value in result.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---------------------------------------------------------------------------
# Interrupts that do not stop the task: re-fired, then escalated (#22)
# ---------------------------------------------------------------------------


def hold_and_swallow(mib: int, seconds: float, marker: str = "") -> str:
    """Hold ``mib`` MiB and catch even BaseException: no interrupt stops it.

    With ``marker``, only the first run (which creates the file) misbehaves.
    """
    if marker:
        if os.path.exists(marker):
            return "second run"
        with open(marker, "w"):
            pass
    held: list[bytes] = []
    deadline = time.perf_counter() + seconds
    caught = 0
    while True:  # every instruction of the work is inside the try
        try:
            while time.perf_counter() < deadline:
                if len(held) < mib // 10:
                    held.append(b"x" * (10 * MiB))  # written, so resident
            return f"survived {caught} with {len(held) * 10} MiB"
        except BaseException:
            caught += 1


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_unstoppable_task_limit_victim_is_refired_then_logged(c, s, a):
    await c.register_plugin(
        MemoryGuard(
            task_limit="50MiB",
            process_limit=None,
            interval="20ms",
            interrupt_grace="200ms",
            interrupt_attempts=2,
        )
    )
    with captured_logger("catalog.memory", level=logging.WARNING) as log:
        result = await c.submit(hold_and_swallow, 100, 2.0)
    assert result.startswith("survived")
    deadline = time.monotonic() + 30  # events reach the scheduler in batches
    while True:
        actions = [e["action"] for e in await guard_events_async(c)]
        if len(actions) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert actions[:3] == ["task-limit", "refire", "unstoppable"], actions
    text = log.getvalue()
    assert "raising it again (attempt 2 of 2)" in text
    assert "cannot be stopped" in text
    assert "not over process-limit, so it is left alone" in text
    status = a.plugins["catalog.memory"].status()
    assert status["unstoppable"] == 1
    assert status["restarting"] is False
    assert a.status == Status.running


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_prefix_stats_are_bounded_and_count_the_overflow(c, s, a):
    import catalog.memory as memory_module

    await c.register_plugin(MemoryGuard(interval="1s"))
    guard = a.plugins["catalog.memory"]
    state = guard._state
    original = memory_module.MAX_PREFIXES
    memory_module.MAX_PREFIXES = 3
    try:
        for i in range(5):
            key = (f"prefix{i}", 0)
            guard.transition(key, "ready", "executing")
            guard._start(a, state, 10_000 + i, key)
            guard.transition(key, "executing", "memory")
        # Counted when read (or by the sampler thread): still under the cap.
        stats = guard.prefix_stats()
    finally:
        memory_module.MAX_PREFIXES = original
    # Like the metrics' prefix labels: `cap` prefixes, then "other".
    assert sorted(stats) == ["other", "prefix0", "prefix1", "prefix2"]
    assert stats["other"]["count"] == 2
    assert guard.status()["prefixes_overflow"] == 2


def worker_memory_events(client: Client, action: str) -> list[dict]:
    return [m for _, m in client.get_events("catalog.memory") if m["action"] == action]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unstoppable_process_limit_victim_restarts_the_worker_results_moved(
    tmp_path,
):
    """A process-limit victim that eats every interrupt: the worker is retired
    through the scheduler (its results move to the other worker) and its nanny
    starts a new one, instead of the nanny killing it and losing the results."""
    with (
        local_cluster(2, processes=True, memory_limit="4GiB") as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(
            MemoryGuard(
                process_limit="450MiB",
                interval="20ms",
                interrupt_grace="300ms",
                interrupt_attempts=2,
            )
        )
        victim, other = sorted(client.scheduler_info()["workers"])
        kept = client.submit(os.urandom, 16, workers=[victim], pure=False)
        value = kept.result(timeout=60)
        hog = client.submit(
            hold_and_swallow,
            600,
            120,
            str(tmp_path / "ran-once"),
            workers=[victim],
            allow_other_workers=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not worker_memory_events(
            client, "restart"
        ):
            time.sleep(0.1)
        (restart,) = worker_memory_events(client, "restart")
        assert restart["worker"] == victim
        assert restart["key"] == hog.key
        # The nanny brings a new worker process in the old one's place.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = client.scheduler_info()["workers"]
            if victim not in workers and len(workers) == 2:
                break
            time.sleep(0.1)
        workers = client.scheduler_info()["workers"]
        assert victim not in workers and len(workers) == 2, workers
        # The result computed on the old worker was moved, not recomputed.
        assert kept.result(timeout=60) == value
        assert other in client.who_has(kept)[kept.key]
        assert hog.result(timeout=120) == "second run"
        actions = [
            m["action"]
            for _, m in client.get_events("catalog.memory")
            if m["action"] != "still-running"
        ]
        assert actions[:3] == ["process-limit", "refire", "restart"], actions
