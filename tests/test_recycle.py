"""The recycle entry: workers retired and restarted before they rot."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import time

import click
import dask.config
import pytest
from distributed import Client
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog import _prom, recycle
from catalog.entry import OptionError
from catalog.recycle import EVENT_TOPIC, Recycler, SchedulerRecycler, dask_setup
from tests.procs import by_value
from tests.reliability import collected

MiB = 2**20


def test_spellings_defaults_and_config():
    assert (
        catalog.Recycler is Recycler and catalog.SchedulerRecycler is SchedulerRecycler
    )
    settings = Recycler(
        max_tasks=10, max_lifetime="1h", lifetime_stagger="5m", max_unmanaged=0.5
    ).settings
    assert settings.max_tasks == 10 and settings.max_lifetime == 3600.0
    assert settings.lifetime_stagger == 300.0 and settings.max_unmanaged == 0.5
    assert Recycler(max_unmanaged="2GiB").settings.max_unmanaged == 2 * 2**30
    assert Recycler().settings.max_retiring == 0.25
    with dask.config.set({"catalog.recycle.max-tasks": 7}):
        assert Recycler().settings.max_tasks == 7
        assert Recycler(max_tasks=3).settings.max_tasks == 3
    clone = pickle.loads(pickle.dumps(Recycler(max_tasks=5)))
    assert clone.settings.max_tasks == 5


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_tasks": 0}, r"max_tasks=.*--recycle-max-tasks.*>= 1"),
        ({"max_lifetime": "soon"}, r"max_lifetime=.*'soon'.*duration"),
        ({"max_unmanaged": "4"}, r"max_unmanaged=.*did you mean 4MiB"),
        ({"max_unmanaged": 1.5}, r"max_unmanaged=.*fraction"),
        ({"max_retiring": 0}, r"max_retiring=.*fraction in \(0, 1\]"),
        ({"max_retiring": "half"}, r"max_retiring=.*'half'"),
        ({"interval": "1ms"}, r"interval=.*at least|interval=.*from 10ms"),
        ({"lifetime_stagger": "5m"}, r"lifetime-stagger.*needs max-lifetime"),
    ],
)
def test_bad_values_name_the_option(kwargs, named):
    with pytest.raises(OptionError, match=named):
        Recycler(**kwargs)


def test_cli_bad_values_are_usage_errors():
    with pytest.raises(click.BadParameter) as info:
        dask_setup.parse_args(click.Context(dask_setup), ["--recycle-max-tasks", "x"])
    assert "--recycle-max-tasks" in info.value.format_message()
    with pytest.raises(click.UsageError, match="needs max-lifetime"):
        dask_setup.parse_args(
            click.Context(dask_setup), ["--recycle-lifetime-stagger", "5m"]
        )


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 4)
async def test_fleet_limits_are_decided_on_the_scheduler(c, s, *workers):
    await c.register_plugin(SchedulerRecycler(max_retiring=0.5))
    plugin = s.plugins["catalog.recycle"]
    first, second, third, fourth = (w.address for w in workers)
    assert plugin.decide(first) is None
    plugin.retiring[first] = "max-tasks"
    assert plugin.decide(first) == "already being recycled"
    assert plugin.decide(second) is None  # 2 of 4 at once with 0.5
    plugin.retiring[second] = "max-tasks"
    assert "2 of 4 workers are being recycled" in plugin.decide(third)
    plugin.retiring.clear()
    plugin.retiring.update({first: "x", second: "x", third: "x"})
    plugin.settings.max_retiring = 1.0
    assert plugin.decide(fourth) == "it is the last running worker"
    plugin.retiring.clear()
    answer = plugin.request(worker="tcp://127.0.0.1:1", reason="max-tasks")
    assert answer["status"] == "deferred" and "not running" in answer["why"]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_the_last_worker_is_never_recycled(c, s, a):
    await c.register_plugin(SchedulerRecycler())
    with captured_logger("catalog.recycle") as log:
        await c.register_plugin(Recycler(max_tasks=1, interval="20ms"))
        assert await c.submit(sum, [1, 2]) == 3
        plugin = a.plugins["catalog.recycle"]
        while not plugin.deferred:
            await asyncio.sleep(0.02)
    assert "has no nanny" in log.getvalue()
    assert s.plugins["catalog.recycle"].status()["deferred"] >= 1
    assert a.address in s.workers and not s.plugins["catalog.recycle"].retiring


def inc_logged(x, path):
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x + 1


async def _events(c, action, n=1, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            msg for _, msg in await c.get_events(EVENT_TOPIC) if msg["action"] == action
        ]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {n} {action!r} events: {await c.get_events(EVENT_TOPIC)}")


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_max_tasks_retires_without_a_nanny_and_keeps_results(
    c, s, a, b, tmp_path
):
    path = str(tmp_path / "runs")
    fam = _prom.Families("dask_catalog", {}, max_prefixes=10)
    _prom.attach(s, fam)
    try:
        await c.register_plugin(SchedulerRecycler())
        await c.register_plugin(Recycler(max_tasks=2, interval="20ms"))
        futures = c.map(
            inc_logged,
            range(4),
            path=path,
            workers=[a.address],
            allow_other_workers=True,
        )
        assert await c.gather(futures) == [1, 2, 3, 4]
        (done,) = await _events(c, "recycled")
        assert done["worker"] == a.address and done["reason"] == "max-tasks"
        assert done["nanny"] is False
        assert "tasks computed (max-tasks 2)" in done["detail"]
        (retiring,) = await _events(c, "retiring")
        assert retiring["worker"] == a.address
        assert a.address not in s.workers and b.address in s.workers
        # The results moved to b: nothing is computed again.
        assert await c.gather(futures) == [1, 2, 3, 4]
        with open(path) as f:
            assert sorted(f.read().split()) == ["0", "1", "2", "3"]
        samples = collected(fam, "dask_catalog_worker_recycled_total", "reason")
        assert samples == {"max-tasks": 1}
    finally:
        _prom.detach(s)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_without_the_scheduler_half_the_worker_warns_once(
    c, s, a, b, monkeypatch
):
    monkeypatch.setattr(recycle, "REQUEST_TIMEOUT", 0.3)
    with captured_logger("catalog.recycle") as log:
        await c.register_plugin(Recycler(max_tasks=1, interval="20ms"))
        assert await c.submit(sum, [1, 2], workers=[a.address]) == 3
        deadline = time.monotonic() + 10
        while "did not answer" not in log.getvalue():
            assert time.monotonic() < deadline, log.getvalue()
            await asyncio.sleep(0.05)
    assert log.getvalue().count("did not answer") == 1
    assert "--preload catalog.recycle" in log.getvalue()
    assert a.address in s.workers


def test_check_reports_each_limit():
    class FakeWorker:  # only what check() reads, not a stand-in for distributed
        pass

    plugin = Recycler(max_tasks=2, max_lifetime="1s", max_unmanaged="1MiB")
    plugin.settings.max_unmanaged_for = 0.05
    plugin.started = time.monotonic()
    plugin.lifetime = 1.0
    plugin.tasks_done = 0
    plugin._unmanaged_limit = MiB
    plugin._above_since = None
    plugin.unmanaged = lambda: 2 * MiB  # type: ignore[method-assign]
    assert plugin.check() is None  # above the limit, not yet for long enough
    time.sleep(0.06)
    reason, detail = plugin.check()
    assert (
        reason == "max-unmanaged" and "2.00 MiB above max-unmanaged 1.00 MiB" in detail
    )
    plugin.tasks_done = 2
    assert plugin.check()[0] == "max-tasks"
    plugin.tasks_done = 0
    plugin.started -= 2
    assert plugin.check()[0] == "max-lifetime"


# -- real processes ---------------------------------------------------------------


def _read_events(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _recycles(path, action):
    return [
        e["msg"]
        for e in _read_events(path)
        if e["event"] == EVENT_TOPIC and e["msg"]["action"] == action
    ]


def _wait(predicate, timeout=120, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def slow_logged(x, path):
    import time

    time.sleep(0.1)
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x * 10


def _cluster(procs, tmp_path, *worker_options, workers=2):
    events = str(tmp_path / "events.jsonl")
    sched, addr = procs.scheduler(
        "--preload", "catalog", "--enable", "recycle,events", "--events-file", events
    )
    started = [
        procs.worker(
            addr,
            *("--nanny", "--nthreads", "1", "--name", f"w{i}"),
            *("--preload", "catalog.recycle", "--recycle-interval", "100ms"),
            *worker_options,
        )
        for i in range(workers)
    ]
    return sched, addr, events, started


@pytest.mark.slow
def test_real_max_tasks_recycles_a_nanny_worker_without_recomputing(procs, tmp_path):
    runs = str(tmp_path / "runs")
    sched, addr, events, _ = _cluster(procs, tmp_path, "--recycle-max-tasks", "5")
    with Client(addr, timeout=30) as client:
        futures = client.map(by_value(slow_logged), range(30), path=runs)
        assert client.gather(futures) == [x * 10 for x in range(30)]
        _wait(lambda: _recycles(events, "recycled"), what="a recycle")
        client.wait_for_workers(2, timeout=60)
        # Every result is still there, and each task ran exactly once.
        assert client.gather(futures) == [x * 10 for x in range(30)]
        names = sorted(
            str(w["name"]) for w in client.scheduler_info()["workers"].values()
        )
        assert names == ["w0", "w1"]  # the nanny brought the recycled one back
    with open(runs) as f:
        assert sorted(int(x) for x in f.read().split()) == list(range(30))
    done = _recycles(events, "recycled")[0]
    assert done["reason"] == "max-tasks" and done["nanny"] is True
    assert "tasks computed (max-tasks 5)" in done["detail"]
    sched.wait_for("catalog.recycle: recycling worker")
    assert "catalog entry 'recycle':" not in sched.output  # no run-time error


def sleep_then(seconds, path):
    import time

    time.sleep(seconds)
    with open(path, "a") as f:
        f.write("ran\n")
    return "finished"


@pytest.mark.slow
def test_real_lifetime_restart_waits_for_the_running_task(procs, tmp_path):
    runs = str(tmp_path / "runs")
    events = str(tmp_path / "events.jsonl")
    _sched, addr = procs.scheduler(
        "--preload", "catalog", "--enable", "recycle,events", "--events-file", events
    )
    with Client(addr, timeout=30) as client:
        # The spare first: the lifetime of w0 counts from its start, and the task
        # must be running on it when the lifetime ends.
        procs.worker(addr, "--nanny", "--nthreads", "1", "--name", "spare")
        procs.worker(
            addr,
            *("--nanny", "--nthreads", "1", "--name", "w0"),
            *("--preload", "catalog.recycle", "--recycle-interval", "100ms"),
            *("--recycle-max-lifetime", "8s"),
        )
        client.wait_for_workers(2, timeout=60)
        workers = {
            str(w["name"]): a for a, w in client.scheduler_info()["workers"].items()
        }
        future = client.submit(
            by_value(sleep_then), 12, runs, workers=["w0"], key="long-1"
        )
        assert future.result(timeout=120) == "finished"
        done = _wait(lambda: _recycles(events, "recycled"), what="a recycle")[0]
    assert done["reason"] == "max-lifetime" and done["worker"] == workers["w0"]
    # The restart waited for the task: it ran once, to its end.
    assert done["drained"] > 0.5
    with open(runs) as f:
        assert f.read().split() == ["ran"]
    assert [e for e in _read_events(events) if e["event"] == "task-erred"] == []


def leak(megabytes):
    import builtins

    store = builtins.__dict__.setdefault("_catalog_test_leak", [])
    store.append(b"x" * (megabytes * 2**20))
    return len(store)


@pytest.mark.slow
def test_real_leak_triggers_max_unmanaged(procs, tmp_path):
    _sched, addr, events, _ = _cluster(
        procs,
        tmp_path,
        *("--recycle-max-unmanaged", "150MiB", "--recycle-max-unmanaged-for", "1s"),
    )
    with Client(addr, timeout=30) as client:
        workers = {
            str(w["name"]): a for a, w in client.scheduler_info()["workers"].items()
        }
        assert client.submit(by_value(leak), 200, workers=[workers["w0"]]).result(60)
        done = _wait(lambda: _recycles(events, "recycled"), what="a recycle")[0]
        client.wait_for_workers(2, timeout=60)
    assert done["reason"] == "max-unmanaged" and done["worker"] == workers["w0"]
    assert "above max-unmanaged 150.00 MiB" in done["detail"]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_a_failed_recycle_puts_the_worker_back_to_work(c, s, a, b):
    await c.register_plugin(SchedulerRecycler())
    plugin = s.plugins["catalog.recycle"]
    ws = s.workers[a.address]
    s.handle_worker_status_change("closing_gracefully", ws, "test-retire")
    s.stream_comms[a.address].send(
        {
            "op": "worker-status-change",
            "status": "closing_gracefully",
            "stimulus_id": "t",
        }
    )
    while a.status.name != "closing_gracefully":
        await asyncio.sleep(0.01)
    plugin._resume(a.address, "test-resume")
    assert ws.status.name == "running"
    while a.status.name != "running":
        await asyncio.sleep(0.01)
    assert await c.submit(sum, [1, 2], workers=[a.address]) == 3
