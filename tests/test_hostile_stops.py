"""Hostile stops: SIGTERM, SIGINT, shutdown, restart, nanny memory kill, SIGKILL.

Files written by entries are complete after a graceful stop and valid up to their
last complete line after a kill; no entry's teardown takes more than 1 second.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
from distributed import Client, Event
from distributed.utils_test import gen_cluster

import catalog
from catalog._entry import active_plugins
from tests.procs import LOOPBACK

#: The longest an entry's teardown may take.
TEARDOWN_LIMIT = 1.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def read_lines(path: Path, graceful: bool) -> list[dict]:
    """The file's records; after a graceful stop the last line is complete too."""
    data = path.read_bytes()
    if graceful:
        assert data.endswith(b"\n"), (path, data[-200:])
    *complete, tail = data.split(b"\n")
    records = [json.loads(line) for line in complete if line]
    if tail:  # only possible after a kill: a line cut in the middle
        assert not graceful
        with pytest.raises(ValueError):
            json.loads(tail)
    return records


# -- teardown time of every entry -----------------------------------------------


def teardown_times(servers_plugins) -> dict[str, float]:
    times = {}
    for server, plugin in servers_plugins:
        began = time.perf_counter()
        plugin._teardown(server)
        times[f"{type(plugin).__name__}"] = time.perf_counter() - began
    return times


@gen_cluster(client=True, nthreads=[(LOOPBACK, 2)])
async def test_every_entry_tears_down_within_a_second(c, s, a):
    tmp = tempfile.mkdtemp()
    gateway = f"http://{LOOPBACK}:{closed_port()}"
    worker_side = [
        catalog.WorkerEnvironment(set=["X=1"]),
        catalog.StructuredLogging(file=f"{tmp}/w-{{pid}}.jsonl"),
        catalog.Metrics(port=0, pushgateway=gateway, push_interval="50ms"),
        catalog.Tracer(dir=f"{tmp}/trace", flush_interval="10s"),
        catalog.MemoryGuard(interval="10ms"),
        catalog.Watchdog(warn_after="50ms", interval="10ms"),
    ]
    scheduler_side = [
        catalog.SchedulerEnvironment(set=["X=1"]),
        catalog.SchedulerStructuredLogging(file=f"{tmp}/s-{{pid}}.jsonl"),
        catalog.SchedulerMetrics(port=0, pushgateway=gateway, push_interval="50ms"),
        catalog.SchedulerTracer(dir=f"{tmp}/trace", flush_interval="10s"),
        catalog.EventLog(file=f"{tmp}/events.jsonl"),
    ]
    for plugin in worker_side + scheduler_side:
        await c.register_plugin(plugin)
    # Under load: a task blocked in the worker while the entries tear down.
    release = Event()
    blocked = c.submit(lambda e: e.wait(30), release, key="blocked")
    done = await c.gather(c.map(lambda x: x, range(200)))
    assert len(done) == 200
    await asyncio_sleep(0.3)
    pairs = [(a, p) for p in active_plugins(a).values()]
    pairs += [(s, p) for p in active_plugins(s).values()]
    assert len(pairs) == 11
    times = teardown_times(pairs)
    await release.set()
    await blocked
    slow = {name: t for name, t in times.items() if t > TEARDOWN_LIMIT}
    assert not slow, times
    print("teardown seconds:", json.dumps({k: round(v, 4) for k, v in times.items()}))


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_metrics_teardown_with_a_silent_pushgateway(c, s, a):
    import catalog.metrics

    # 2 s instead of 10 s keeps the test short and still shows the wait.
    saved, catalog.metrics.PUSH_TIMEOUT = catalog.metrics.PUSH_TIMEOUT, 2.0
    try:
        await _silent_pushgateway(c, a)
    finally:
        catalog.metrics.PUSH_TIMEOUT = saved


async def _silent_pushgateway(c, a):
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(16)  # the kernel accepts; nobody ever answers
        url = f"http://{LOOPBACK}:{silent.getsockname()[1]}"
        await c.register_plugin(catalog.Metrics(pushgateway=url, push_interval="5s"))
        await asyncio_sleep(0.2)
        (plugin,) = active_plugins(a).values()
        began = time.perf_counter()
        plugin._teardown(a)
        took = time.perf_counter() - began
    assert took <= TEARDOWN_LIMIT, took


# -- real processes: six ways to stop ------------------------------------------


def wait_for_new_processes(
    client: Client, before: dict[str, str], renewed: set[str], timeout: float = 120
) -> dict[str, str]:
    """Wait until the workers named ``renewed`` are back with new addresses."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.scheduler_info()["workers"]
        now = {w["name"]: address for address, w in info.items()}
        if all(name in now and now[name] != before[name] for name in renewed):
            return now
        assert time.monotonic() < deadline, (before, now)
        time.sleep(0.2)


@pytest.mark.slow
def test_every_kind_of_stop_leaves_valid_files(procs, tmp_path):
    logs = tmp_path / "logs"
    trace = tmp_path / "trace"
    events = tmp_path / "events.jsonl"
    logs.mkdir()
    _, addr = procs.scheduler(
        "--preload",
        "catalog",
        "--enable",
        "events,logging,tracer",
        "--events-file",
        str(events),
        "--logging-file",
        str(logs / "scheduler-{pid}.jsonl"),
        "--tracer-dir",
        str(trace),
        "--tracer-flush-interval",
        "1h",
    )
    common = [
        "--nthreads",
        "1",
        "--preload",
        "catalog",
        "--logging-file",
        str(logs / "{name}-{pid}.jsonl"),
        "--tracer-dir",
        str(trace),
        # Only teardown writes the trace: a graceful stop must flush it.
        "--tracer-flush-interval",
        "1h",
        "--watchdog-warn-after",
        "1m",
    ]
    every = "logging,tracer,metrics,watchdog,memory"
    names = ["sigterm", "sigint", "sigkill", "memkill", "restart"]
    workers = {}
    for name in names:
        enable = every if name != "memkill" else "logging,tracer,metrics,watchdog"
        extra = ["--memory-limit", "400MB"] if name == "memkill" else []
        workers[name] = procs.worker(
            addr, *common, "--enable", enable, "--name", name, *extra, wait=False
        )
    # The logging entry sends the workers' lines to their files, not stderr.
    client = Client(addr, timeout="30s")
    client.wait_for_workers(len(names), timeout=120)
    info = client.scheduler_info()["workers"]
    by_name = {w["name"]: address for address, w in info.items()}
    pids = client.run(os.getpid)
    # A last task on each worker, whose key must be in a gracefully closed trace.
    for name in names:
        key = f"last-{name}"
        assert client.submit(len, "abc", key=key, workers=[by_name[name]]).result() == 3

    stop_seconds = {}
    for name, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        began = time.monotonic()
        code = workers[name].stop(sig, timeout=30)
        stop_seconds[name] = time.monotonic() - began
        assert code == 0, workers[name].output
    os.kill(pids[by_name["sigkill"]], signal.SIGKILL)

    def hog():
        import time as time_

        blocks = []
        for _ in range(200):
            blocks.append(bytearray(50 * 2**20))
            time_.sleep(0.02)
        return len(blocks)

    hogging = client.submit(
        hog, workers=[by_name["memkill"]], allow_other_workers=False
    )
    workers["memkill"].wait_for(r"exceeded 95% memory budget", timeout=60)
    hogging.cancel()
    # The nannies bring back the killed workers; restart once all three are back,
    # and shut down only when all three are back again (a worker still
    # connecting when the scheduler goes away would wait for it for ever).
    back = wait_for_new_processes(client, by_name, {"sigkill", "memkill"})
    began = time.monotonic()
    client.restart(timeout="60s")
    stop_seconds["restart"] = time.monotonic() - began
    wait_for_new_processes(client, back, {"sigkill", "memkill", "restart"})
    began = time.monotonic()
    client.shutdown()
    client.close()
    for proc in procs.started:
        proc.popen.wait(60)
    stop_seconds["shutdown"] = time.monotonic() - began

    # Graceful stops leave complete files with the last task's transitions
    # (only teardown writes them); kills leave files valid to their last line.
    killed = {"sigkill", "memkill"}
    flushed = set()
    for path in sorted(trace.iterdir()):
        first = json.loads(path.read_bytes().split(b"\n", 1)[0])
        graceful = first["name"] not in killed
        header, *records = read_lines(path, graceful=graceful)
        assert header["type"] == "process", header
        flushed |= {r.get("key") for r in records if "last-" in str(r.get("key"))}
    # The first worker process of each of these names tore down and flushed.
    assert {"last-sigterm", "last-sigint", "last-restart"} <= flushed, flushed
    for path in sorted(logs.iterdir()):
        graceful = not path.name.startswith(tuple(killed))
        records = read_lines(path, graceful=graceful)
        assert records and all("event" in r or "message" in r for r in records)
    ev = read_lines(events, graceful=True)
    assert ev[-1]["event"] == "scheduler-closing"
    assert {"worker-added", "worker-removed"} <= {r["event"] for r in ev}
    print(
        "stop seconds:", json.dumps({k: round(v, 2) for k, v in stop_seconds.items()})
    )
    assert stop_seconds["sigterm"] < 15 and stop_seconds["sigint"] < 15
