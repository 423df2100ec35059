"""The events entry: an audit log of the cluster, as JSON lines or log records."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import click
import dask.config
import pytest
from distributed import Client, Scheduler, Worker
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog import _prom
from catalog._entry import OptionError
from catalog.events import ENTRY, EventLog, dask_setup, names, plain, reason_of
from tests.procs import LOOPBACK, by_value, scheduler_command

# The key of the failing task: newlines and quotes must still give one JSON line.
NASTY_KEY = "fail-\"quoted\"\n'line'"


def read_events(path) -> list[dict]:
    """Every line of an events file, each parsed on its own (each must be JSON)."""
    text = Path(path).read_text()
    assert text == "" or text.endswith("\n"), "the last line is incomplete"
    return [json.loads(line) for line in text.splitlines()]


def of(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]


def fail(message):
    raise ValueError(message)


class Records(logging.Handler):
    """Keeps the records a logger emits, extras included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- pure unit -----------------------------------------------------------------


def test_spellings_and_defaults():
    assert EventLog.name == "catalog.events"
    assert catalog.EventLog is EventLog
    flags = [p.opts[0] for p in dask_setup.params]
    assert flags == [
        "--events-file",
        "--events-rotate-bytes",
        "--events-backups",
        "--events-include",
        "--events-exclude",
    ]
    assert (
        ENTRY.env_var(ENTRY.option("rotate-bytes"))
        == "DASK_CATALOG__EVENTS__ROTATE_BYTES"
    )
    assert EventLog().settings.as_dict() == {
        "file": None,
        "rotate_bytes": 0,
        "backups": 5,
        "include": (),
        "exclude": (),
    }


def test_config_and_explicit_values():
    with dask.config.set(
        {"catalog.events.file": "/tmp/x.jsonl", "catalog.events.rotate-bytes": "1MiB"}
    ):
        settings = EventLog(backups=1).settings
    assert (settings.file, settings.rotate_bytes, settings.backups) == (
        "/tmp/x.jsonl",
        2**20,
        1,
    )


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"backups": -1}, ["backups", "-1", ">= 0"]),
        ({"rotate_bytes": "12.5"}, ["rotate_bytes", "unit"]),
        ({"include": [""]}, ["include", "event name"]),
    ],
)
def test_bad_python_values_name_the_option(kwargs, words):
    with pytest.raises(OptionError) as info:
        EventLog(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="unknown option"):
        EventLog(path="x")


def test_pickles_with_plain_settings():
    log = EventLog(file="events.jsonl", include=["task-erred"], rotate_bytes="1MB")
    again = pickle.loads(pickle.dumps(log))
    assert again.settings == log.settings
    assert again.settings.rotate_bytes == 10**6
    assert not again.active


def test_dask_setup_parses_its_options_through_click():
    ctx = dask_setup.make_context(
        "dask_setup",
        [
            "--events-file",
            "f.jsonl",
            "--events-include",
            "worker-added,worker-removed",
            "--events-exclude",
            "worker-event",
            "--events-rotate-bytes",
            "10MiB",
        ],
    )
    given = ENTRY.given_from_params(ctx.params)
    assert given == {
        "file": "f.jsonl",
        "include": ("worker-added,worker-removed",),
        "exclude": ("worker-event",),
        "rotate_bytes": 10 * 2**20,
    }
    assert names(given["include"]) == {"worker-added", "worker-removed"}
    with pytest.raises(click.BadParameter) as info:
        dask_setup.parse_args(click.Context(dask_setup), ["--events-backups", "x"])
    assert "--events-backups" in info.value.format_message()
    assert "'x'" in info.value.format_message()


def test_helpers():
    assert reason_of("handle-worker-cleanup-1795690257.7430317") == (
        "handle-worker-cleanup"
    )
    assert reason_of("worker-close") == "worker-close"
    assert reason_of("") == "unknown"
    assert plain({"a": {3, 1}, 2: (b"xy", None, object)}) == {
        "a": [1, 3],
        "2": ["<2 bytes>", None, str(object)],
    }


# -- in-process cluster --------------------------------------------------------


@gen_cluster(client=True, nthreads=[])
async def test_file_records_workers_clients_graphs_and_failures(c, s):
    path = Path(s.local_directory) / "events.jsonl"
    await c.register_plugin(EventLog(file=str(path)))
    async with Worker(s.address, host=LOOPBACK, nthreads=1, name="alpha") as w:
        addr = w.address
        future = c.submit(fail, 'bad\n"news"', key=NASTY_KEY, retries=1)
        with pytest.raises(ValueError, match="news"):
            await future
    while not of(read_events(path), "worker-removed"):
        await asyncio.sleep(0.05)
    async with Client(s.address, asynchronous=True) as other:
        other_id = other.id
    s.log_event("my-topic", {"note": "line\nbreak", "n": {1, 2}})

    events = read_events(path)
    added = of(events, "worker-added")[0]
    assert added == {
        "ts": added["ts"],
        "event": "worker-added",
        "worker": addr,
        "name": "alpha",
        "nthreads": 1,
        "memory_limit": w.memory_manager.memory_limit,
    }
    assert added["ts"].endswith("+00:00") and "T" in added["ts"]
    assert of(events, "graph-submitted")[0] == {
        "ts": of(events, "graph-submitted")[0]["ts"],
        "event": "graph-submitted",
        "client": c.id,
        "tasks": 1,
        "keys": 1,
        "prefixes": ["fail"],
    }
    retried = of(events, "task-retried")
    assert [(e["key"], e["prefix"], e["retries_left"]) for e in retried] == [
        (NASTY_KEY, "fail", 0)
    ]
    (erred,) = of(events, "task-erred")
    assert erred["key"] == NASTY_KEY
    assert erred["prefix"] == "fail"
    assert erred["worker"] == addr
    assert "ValueError" in erred["exception"] and "news" in erred["exception"]
    (removed,) = of(events, "worker-removed")
    assert removed["worker"] == addr and removed["name"] == "alpha"
    assert removed["reason"] == "worker-close"
    assert {"client": other_id} in [
        {"client": e["client"]} for e in of(events, "client-added")
    ]
    assert other_id in [e["client"] for e in of(events, "client-removed")]
    (mine,) = of(events, "my-topic")
    assert mine["msg"] == {"note": "line\nbreak", "n": [1, 2]}
    # The scheduler's own add/remove events are not recorded twice.
    assert all(
        e.get("msg", {}).get("action") not in ("add-worker", "remove-worker")
        for e in events
    )
    names_in_order = [e["event"] for e in events]
    assert names_in_order.index("worker-added") < names_in_order.index("task-erred")
    assert names_in_order.index("task-retried") < names_in_order.index("task-erred")
    assert names_in_order.index("task-erred") < names_in_order.index("worker-removed")
    assert os.stat(path).st_mode & 0o777 == 0o600


@gen_cluster(client=True)
async def test_dependents_of_a_failed_task_are_not_listed(c, s, a, b):
    path = Path(s.local_directory) / "events.jsonl"
    await c.register_plugin(EventLog(file=str(path), include=["task-erred"]))
    root = c.submit(fail, "root", key="root-1")
    child = c.submit(lambda x: x, root, key="child-1")
    with pytest.raises(ValueError):
        await child
    events = read_events(path)
    assert [e["key"] for e in events] == ["root-1"]


@gen_cluster(client=True)
async def test_without_file_events_go_to_the_logger(c, s, a, b):
    handler = Records()
    logger = logging.getLogger("catalog.events")
    logger.addHandler(handler)
    try:
        await c.register_plugin(EventLog(exclude=["client-event"]))
        with pytest.raises(ValueError):
            await c.submit(fail, "oops", key="oops-1")
    finally:
        logger.removeHandler(handler)
    by_name = {r.event: r for r in handler.records}
    assert "graph-submitted" in by_name and "task-erred" in by_name
    erred = by_name["task-erred"]
    assert erred.levelno == logging.INFO
    # The message says what happened, with the fields (issue #15).
    assert erred.getMessage().startswith('task-erred: key="oops-1" prefix="oops" ')
    assert erred.event == "task-erred"
    assert erred.key == "oops-1" and erred.prefix == "oops"
    assert erred.worker in (a.address, b.address)
    assert "oops" in erred.exception
    assert "client-event" not in by_name


@gen_cluster(client=True, nthreads=[])
async def test_include_and_exclude(c, s):
    path = Path(s.local_directory) / "events.jsonl"
    await c.register_plugin(
        EventLog(
            file=str(path),
            include=["worker-added,worker-removed", "worker-event"],
            exclude=["worker-event"],
        )
    )
    async with Worker(s.address, host=LOOPBACK, nthreads=1):
        pass
    while len(read_events(path)) < 2:
        await asyncio.sleep(0.05)
    assert [e["event"] for e in read_events(path)] == ["worker-added", "worker-removed"]


@gen_cluster(client=True)
async def test_counter_when_metrics_are_active(c, s, a, b):
    fam = _prom.Families("dask_catalog", {}, max_prefixes=10)
    _prom.attach(s, fam)
    try:
        await c.register_plugin(EventLog(file=str(Path(s.local_directory) / "e")))
        with pytest.raises(ValueError):
            await c.submit(fail, "x", key="count-1")
        samples = {
            (m.name, sample.name, sample.labels["event"]): sample.value
            for m in fam.collect()
            for sample in m.samples
        }
    finally:
        _prom.detach(s)
    key = "dask_catalog_scheduler_events"
    assert samples[(key, f"{key}_total", "task-erred")] == 1
    assert samples[(key, f"{key}_total", "graph-submitted")] == 1


@gen_cluster(client=True)
async def test_write_errors_log_one_error_and_the_scheduler_goes_on(c, s, a, b):
    with captured_logger("catalog", level=logging.ERROR) as log:
        await c.register_plugin(EventLog(file="/dev/full"))
        for i in range(3):
            with pytest.raises(ValueError):
                await c.submit(fail, "x", key=f"full-{i}")
    assert await c.submit(lambda: 42, key="still-fine") == 42
    lines = [line for line in log.getvalue().splitlines() if line]
    assert len(lines) == 1
    assert "'events'" in lines[0] and "/dev/full" in lines[0]
    plugin = s.plugins["catalog.events"]
    status = plugin.status()
    # The lines wait (bounded) for the file to become writable again.
    assert status["active"] and status["errors"] >= 3
    assert status["buffered"] + status["dropped"] >= 3 and status["written"] == 0


@gen_cluster(client=True, nthreads=[])
async def test_setup_failure_is_strict(c, s):
    missing = os.path.join(s.local_directory, "no-such-dir", "events.jsonl")
    with captured_logger("catalog", level=logging.ERROR) as log:
        with pytest.raises(Exception, match="no-such-dir"):
            await c.register_plugin(EventLog(file=missing))
    assert "catalog.events" not in s.plugins
    assert "'events' could not set up on scheduler" in log.getvalue()
    with dask.config.set({"catalog.strict": False}):
        with captured_logger("catalog", level=logging.ERROR) as log:
            await c.register_plugin(EventLog(file=s.local_directory))
    assert "going on without it" in log.getvalue()
    assert "IsADirectoryError" in log.getvalue()
    assert not s.plugins["catalog.events"].active


@gen_cluster(client=True)
async def test_client_preload_registers_the_log_on_the_scheduler(c, s, a, b):
    path = Path(s.local_directory) / "from-client.jsonl"
    config = {
        "catalog.events.file": str(path),
        "distributed.client.preload": ["catalog.events"],
    }
    with dask.config.set(config):
        async with Client(s.address, asynchronous=True) as other:
            assert await other.submit(sum, [1, 2], key="sum-1") == 3
    assert isinstance(s.plugins["catalog.events"], EventLog)
    events = read_events(path)
    assert of(events, "graph-submitted")[0]["prefixes"] == ["sum"]
    assert of(events, "client-removed")[-1]["client"] == other.id


def test_scheduler_close_is_the_last_line_and_closes_the_file(tmp_path):
    path = tmp_path / "events.jsonl"
    plugin = EventLog(file=str(path))
    s = asyncio.run(run_and_close(plugin))
    events = read_events(path)
    assert events[-1]["event"] == "scheduler-closing"
    assert events[-1]["scheduler"] == s.address
    assert "restart" in [e["event"] for e in events]
    assert plugin._file is None and not plugin.active


async def run_and_close(plugin):
    async with Scheduler(
        host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0", plugins=[plugin]
    ) as s:
        async with Client(s.address, asynchronous=True) as c:
            await c.restart(timeout=10)
    return s


def test_rotation_keeps_backups(tmp_path):
    path = tmp_path / "events.jsonl"
    plugin = EventLog(file=str(path), rotate_bytes="400B", backups=2)

    async def log_many():
        async with Scheduler(
            host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0", plugins=[plugin]
        ) as s:
            for i in range(30):
                s.log_event("rotation", {"i": i})

    asyncio.run(log_many())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 400
        assert read_events(tmp_path / name)


# -- real processes ------------------------------------------------------------


def hog(mb_per_step=40):
    # Grow until the nanny kills this worker for memory.
    chunks = []
    while True:
        chunks.append(b"x" * (mb_per_step * 2**20))
        time.sleep(0.05)


@pytest.mark.slow
def test_real_cluster_audit_log(procs, tmp_path):
    path = tmp_path / "events.jsonl"
    # One death is enough: the task fails with KilledWorker at once.
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    sched, addr = procs.scheduler(
        "--preload", "catalog.events", "--events-file", str(path), env=env
    )
    procs.worker(addr, "--nthreads", "1", "--name", "big", "--memory-limit", "300MB")
    small = procs.worker(addr, "--nthreads", "1", "--name", "small")
    with Client(addr, timeout=30) as client:
        workers = {
            info["name"]: a for a, info in client.scheduler_info()["workers"].items()
        }
        big_addr, small_addr = workers["big"], workers["small"]
        bad = client.submit(
            by_value(fail), 'bad\n"news"', key=NASTY_KEY, workers=[small_addr]
        )
        with pytest.raises(ValueError, match="news"):
            bad.result(timeout=60)
        # A graceful stop of one worker.
        assert small.stop(signal.SIGTERM) == 0
        # The nanny kills the other one for memory.
        killed = client.submit(by_value(hog), key="hog-1", workers=[big_addr])
        with pytest.raises(Exception, match=r"KilledWorker|died"):
            killed.result(timeout=120)
        client.wait_for_workers(1, timeout=60)
    assert sched.stop(signal.SIGTERM) == 0
    sched.wait_for("catalog entry 'events' active on scheduler")

    events = read_events(path)
    order = [e["event"] for e in events]
    assert order[-1] == "scheduler-closing"
    added = of(events, "worker-added")
    assert {e["name"] for e in added} >= {"big", "small"}
    big_added = next(e for e in added if e["worker"] == big_addr)
    assert big_added["memory_limit"] == 300 * 10**6 and big_added["nthreads"] == 1
    (erred_bad,) = [e for e in of(events, "task-erred") if e["key"] == NASTY_KEY]
    assert erred_bad["worker"] == small_addr and "news" in erred_bad["exception"]
    removed = {e["worker"]: e for e in of(events, "worker-removed")}
    assert removed[small_addr]["name"] == "small"
    # Its nanny closes a worker stopped by a signal and tells the scheduler so.
    assert removed[small_addr]["reason"] == "signal"
    (restart,) = of(events, "worker-restart-memory")
    assert restart["worker"] == big_addr
    assert restart["pid"] > 0 and restart["rss"] > 0.9 * 300 * 10**6
    assert removed[big_addr]["name"] == "big"
    assert removed[big_addr]["reason"] == "worker-restart-memory"
    assert removed[big_addr]["processing_tasks"] == 1
    (erred_hog,) = [e for e in of(events, "task-erred") if e["key"] == "hog-1"]
    assert erred_hog["worker"] == big_addr and "KilledWorker" in erred_hog["exception"]
    # The restarted worker came back under the same name, after the kill.
    assert [e["name"] for e in added].count("big") == 2
    sequence = [
        order.index("client-added"),
        order.index("graph-submitted"),
        events.index(erred_bad),
        events.index(removed[small_addr]),
        order.index("worker-restart-memory"),
        # KilledWorker is decided while the scheduler removes the worker.
        events.index(erred_hog),
        events.index(removed[big_addr]),
        len(events) - 1,
    ]
    assert sequence == sorted(sequence), order
    assert "catalog entry 'events':" not in sched.output  # no run-time error


@pytest.mark.slow
def test_cli_bad_value_exits_2():
    proc = subprocess.run(
        scheduler_command(
            "--preload", "catalog.events", "--events-rotate-bytes", "12.5"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if "Error:" in line]
    assert error and "--events-rotate-bytes" in error[0] and "'12.5'" in error[0]


@pytest.mark.slow
def test_cli_scheduler_refuses_to_start_without_its_file(tmp_path):
    missing = tmp_path / "no-such-dir" / "events.jsonl"
    proc = subprocess.run(
        scheduler_command("--preload", "catalog.events", "--events-file", str(missing)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "'events' could not set up on scheduler" in proc.stderr
    assert "no-such-dir" in proc.stderr and "FileNotFoundError" in proc.stderr


@pytest.mark.slow
def test_real_scheduler_logger_and_metric(procs):
    """Through the umbrella with metrics: no file, events on stderr, a counter."""
    sched, addr = procs.scheduler(
        "--preload",
        "catalog",
        "--enable",
        "metrics,events",
        "--events-include",
        "worker-added,worker-removed",
    )
    dashboard = sched.wait_for(r"dashboard at:\s+(http://[\d.]+:\d+)").group(1)
    procs.worker(addr, "--nthreads", "1").stop(signal.SIGTERM)
    sched.wait_for(r"catalog\.events - INFO - worker-removed")
    with urllib.request.urlopen(f"{dashboard}/metrics", timeout=30) as response:
        text = response.read().decode()
    for event in ("worker-added", "worker-removed"):
        line = f'dask_catalog_scheduler_events_total{{event="{event}"}} 1.0'
        assert line in text.splitlines()
    assert "catalog.events - INFO - worker-added" in sched.output


#: Set when a pickle sent by a "worker" is loaded on the scheduler.
UNPICKLED: list[str] = []


def _ran_on_unpickling() -> Exception:
    UNPICKLED.append("code ran")
    return Exception("unpickled")


class _Payload:
    def __reduce__(self):
        return (_ran_on_unpickling, ())


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_an_exception_without_text_is_never_unpickled(c, s, a):
    from distributed import Event

    await c.register_plugin(EventLog(file=str(Path(s.local_directory) / "e.jsonl")))
    gate = Event()
    future = c.submit(lambda: gate.wait(), key="held-1")
    while "held-1" not in a.state.tasks or s.tasks["held-1"].state != "processing":
        await asyncio.sleep(0.01)
    ts = s.tasks["held-1"]
    # What a worker that leaves out exception_text would send.
    s.handle_task_erred(
        key="held-1",
        worker=a.address,
        stimulus_id="task-erred-test",
        run_id=ts.run_id,
        exception=pickle.dumps(_Payload()),
        traceback=None,
    )
    # Checked before any client asks for the exception (a client may unpickle).
    assert UNPICKLED == []
    assert future.status in ("pending", "error")
    erred = [
        e
        for e in read_events(Path(s.local_directory) / "e.jsonl")
        if e["event"] == "task-erred"
    ]
    assert [e["key"] for e in erred] == ["held-1"]
    assert erred[0]["exception"] == "an exception without its text (not unpickled)"
    await gate.set()
