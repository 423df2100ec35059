"""The oom entry: what ran on a worker its nanny killed for memory."""

from __future__ import annotations

import asyncio
import json
import pickle
import time

import click
import dask.config
import pytest
from distributed import Client, Event
from distributed.scheduler import KilledWorker
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog import _prom
from catalog.entry import OptionError
from catalog.oom import EVENT_TOPIC, OOMKilledWorker, OOMReporter, dask_setup
from tests.procs import by_value
from tests.reliability import collected

MiB = 2**20


def test_spellings_defaults_and_config():
    assert catalog.OOMReporter is OOMReporter
    assert OOMReporter().settings.retries is None
    assert OOMReporter(retries=2).settings.retries == 2
    with dask.config.set({"catalog.oom.retries": 1}):
        assert OOMReporter().settings.retries == 1
    clone = pickle.loads(pickle.dumps(OOMReporter(retries=3)))
    assert clone.settings.retries == 3


@pytest.mark.parametrize("value", [-1, "many", 1.5])
def test_bad_values_name_the_option(value):
    with pytest.raises(OptionError, match=r"retries=.*--oom-retries.*whole number"):
        OOMReporter(retries=value)


def test_cli_bad_value_is_a_usage_error():
    with pytest.raises(click.BadParameter) as info:
        dask_setup.parse_args(click.Context(dask_setup), ["--oom-retries", "x"])
    message = info.value.format_message()
    assert "--oom-retries" in message and "'x'" in message
    assert "whole number" in message


def test_exception_pickles_and_is_a_killed_worker():
    exc = OOMKilledWorker(
        "hog-1",
        "tcp://127.0.0.1:1",
        3,
        [{"key": "hog-1", "prefix": "hog", "executing": True, "attempt": 1}],
        410 * MiB,
        400 * MiB,
        "Failed early.",
    )
    clone = pickle.loads(pickle.dumps(exc))
    assert isinstance(clone, KilledWorker)
    assert clone.suspects == exc.suspects and clone.rss == 410 * MiB
    text = str(clone)
    assert "'hog-1'" in text and "410.00 MiB of a 400.00 MiB limit" in text
    assert "hog-1 (hog, executing)" in text and "Failed early." in text


def block(event_name):
    Event(event_name).wait(timeout=30)
    return "done"


async def _processing_on(s, worker, key):
    ws = s.workers[worker.address]
    while key not in {ts.key for ts in ws.processing}:
        await asyncio.sleep(0.01)
    # The task started on the worker: the nanny could see its memory.
    while key not in worker.state.tasks or worker.state.tasks[key].state != "executing":
        await asyncio.sleep(0.01)


async def _oom_events(c, n):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [msg for _, msg in await c.get_events(EVENT_TOPIC)]
        if len(events) >= n:
            return events
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {n} {EVENT_TOPIC} events")


def _nanny_report(s, worker, rss=500 * MiB):
    """What distributed's nanny publishes when it kills its worker for memory."""
    s.log_event("worker-restart-memory", {"worker": worker, "pid": 4321, "rss": rss})


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_kill_names_the_running_task_and_counts_it(c, s, a):
    fam = _prom.Families("dask_catalog", {}, max_prefixes=10)
    _prom.attach(s, fam)
    try:
        await c.register_plugin(OOMReporter())
        release = Event("release-1")
        future = c.submit(block, "release-1", key="block-1")
        await _processing_on(s, a, "block-1")
        with captured_logger("catalog.oom") as log:
            _nanny_report(s, a.address)
            (event,) = await _oom_events(c, 1)
        assert event["action"] == "kill" and event["worker"] == a.address
        assert event["pid"] == 4321 and event["rss"] == 500 * MiB
        assert event["memory_limit"] == s.workers[a.address].memory_limit
        assert [x["key"] for x in event["suspects"]] == ["block-1"]
        assert event["suspects"][0]["prefix"] == "block"
        assert event["suspects"][0]["attempt"] == 1
        assert list(event["prefixes"]) == ["block"] and not event["failed"]
        assert event["late"] is False
        line = log.getvalue()
        assert "was killed by its nanny for memory (500.00 MiB" in line
        assert "block-1 (prefix block" in line
        # distributed's rule applies by default: the task is not failed.
        await release.set()
        assert await future == "done"
        samples = collected(fam, "dask_catalog_oom_kills_total", "prefix")
        assert samples == {"block": 1}
    finally:
        _prom.detach(s)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_retries_fail_the_prefix_early_with_the_memory_in_the_message(c, s, a):
    await c.register_plugin(OOMReporter(retries=0))
    release = Event("release-2")
    future = c.submit(block, "release-2", key="block-2")
    await _processing_on(s, a, "block-2")
    _nanny_report(s, a.address, rss=410 * MiB)
    with pytest.raises(KilledWorker) as info:
        await future
    assert isinstance(info.value, OOMKilledWorker)
    text = str(info.value)
    assert "'block-2'" in text and "killed it for memory (410.00 MiB" in text
    assert "catalog.oom retries is 0" in text
    (event,) = await _oom_events(c, 1)
    assert list(event["failed"]) == ["block-2"]
    plugin = s.plugins["catalog.oom"]
    assert plugin.status()["failed_early"] == 1
    assert plugin.status()["prefix_kills"] == {"block": 1}
    await release.set()


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1)],
    config={"distributed.scheduler.allowed-failures": 0},
)
async def test_the_last_allowed_death_fails_with_the_better_message(c, s, a):
    await c.register_plugin(OOMReporter())
    release = Event("release-3")
    future = c.submit(block, "release-3", key="block-3")
    await _processing_on(s, a, "block-3")
    _nanny_report(s, a.address)
    with pytest.raises(OOMKilledWorker, match="allowed-failures is 0"):
        await future
    assert s.plugins["catalog.oom"].status()["failed_early"] == 0
    await release.set()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_report_after_the_removal_is_still_recorded(c, s, a):
    await c.register_plugin(OOMReporter())
    release = Event("release-4")
    future = c.submit(block, "release-4", key="block-4")
    await _processing_on(s, a, "block-4")
    address = a.address
    await s.remove_worker(address, stimulus_id="test-late", close=False)
    _nanny_report(s, address)
    (event,) = await _oom_events(c, 1)
    assert event["late"] is True and not event["failed"]
    assert [x["key"] for x in event["suspects"]] == ["block-4"]
    await release.set()
    del future


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_a_bad_report_never_raises_into_distributed(c, s, a):
    await c.register_plugin(OOMReporter())
    s.log_event("worker-restart-memory", "not a dict")
    s.log_event("worker-restart-memory", {"worker": None})
    await _oom_events(c, 1)
    assert await c.submit(sum, [1, 2]) == 3
    assert s.plugins["catalog.oom"].status()["errors"] == 0


def hog():
    import time

    chunks = []
    while True:
        chunks.append(b"x" * (20 * 2**20))
        time.sleep(0.02)


@pytest.mark.slow
def test_real_nanny_kill_is_attributed_to_the_task(procs, tmp_path):
    path = tmp_path / "events.jsonl"
    sched, addr = procs.scheduler(
        *("--preload", "catalog", "--enable", "oom,events"),
        *("--events-file", str(path), "--oom-retries", "0"),
    )
    procs.worker(
        addr, "--nanny", "--nthreads", "1", "--name", "big", "--memory-limit", "300MiB"
    )
    with Client(addr, timeout=30) as client:
        innocent = client.submit(sum, [1, 2], key="innocent-1")
        assert innocent.result(timeout=30) == 3
        killed = client.submit(by_value(hog), key="hog-1")
        with pytest.raises(KilledWorker) as info:
            killed.result(timeout=120)
        # One kill, not allowed-failures + 1 (4): retries=0 failed it early.
        client.wait_for_workers(1, timeout=60)
    text = str(info.value)
    assert type(info.value).__name__ == "OOMKilledWorker", text
    assert "'hog-1'" in text and "killed it for memory" in text
    assert "hog-1 (hog" in text and "300.00 MiB limit" in text
    sched.wait_for("was killed by its nanny for memory")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    kills = [e for e in events if e["event"] == EVENT_TOPIC]
    assert len(kills) == 1, [e["event"] for e in events]
    kill = kills[0]["msg"]
    assert [s["key"] for s in kill["suspects"]] == ["hog-1"]
    assert kill["failed"] == ["hog-1"] and kill["rss"] > 0.9 * 300 * MiB
    erred = [e for e in events if e["event"] == "task-erred" and e["key"] == "hog-1"]
    assert len(erred) == 1 and "killed it for memory" in erred[0]["exception"]
