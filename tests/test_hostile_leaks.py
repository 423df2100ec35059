"""Hostile lifecycles: re-registration, restart, many workers and clusters a process.

Leaks are counted, not guessed: threads (``threading.enumerate``), logging
handlers over every logger, ``prometheus_client.REGISTRY`` collectors, open file
descriptors (``/proc/self/fd``) and signal handlers (``signal.getsignal``).
"""

from __future__ import annotations

import gc
import logging
import socket
import time
from collections import Counter

import dask.config
import pytest
from distributed import Client
from distributed.utils_test import captured_logger
from prometheus_client import REGISTRY, generate_latest

import catalog
from catalog import _prom
from catalog._entry import active_plugins
from tests.procs import LOOPBACK, local_cluster


def census(dask_worker=None) -> dict:
    """What an entry could leak in this process, counted."""
    import logging as logging_
    import os
    import re
    import signal as signal_
    import threading

    import psutil
    from prometheus_client import REGISTRY as registry

    loggers = [logging_.getLogger()] + [
        lg
        for lg in logging_.Logger.manager.loggerDict.values()
        if isinstance(lg, logging_.Logger)
    ]
    threads = [t.name for t in threading.enumerate()]
    handlers = {}
    for sig in sorted(signal_.valid_signals()):
        try:
            handler = signal_.getsignal(sig)
        except (OSError, ValueError):
            continue
        handlers[int(sig)] = re.sub(r"0x[0-9a-f]+", "0x", repr(handler))
    files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor
            continue
        # /proc targets are the listing's own descriptor, or another thread's
        # that took its number meanwhile: not something an entry holds.
        if target.startswith("/") and not target.startswith("/proc/"):
            files.append(target)
    listening = [
        c.laddr
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    return {
        "threads": len(threads),
        # Digits (addresses, pids) vary across restarts: kept out of the names.
        "catalog_threads": sorted(
            re.sub(r"\d+", "N", t) for t in threads if t.startswith("catalog")
        ),
        # distributed's own DequeHandlers (one per in-process server) are its
        # business, not the catalog's: they are counted apart.
        "handlers": sum(
            not type(h).__module__.startswith("distributed.")
            for lg in loggers
            for h in lg.handlers
        ),
        "filters": sum(len(lg.filters) for lg in loggers),
        "collectors": len(registry._collector_to_names),
        "fds": len(os.listdir("/proc/self/fd")),
        "files": sorted(files),
        "listening": len(listening),
        "signals": handlers,
    }


class ErrorRecords(logging.Handler):
    """ERROR records, whatever level the logging entry gives the loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def worker_plugins(tmp_path, pushgateway: str) -> list:
    """Every worker-side entry, configured to build every resource it can."""
    return [
        catalog.WorkerEnvironment(set=["CATALOG_HOSTILE=1"]),
        catalog.StructuredLogging(file=str(tmp_path / "log-{role}-{pid}.jsonl")),
        catalog.Metrics(port=0, pushgateway=pushgateway, push_interval="50ms"),
        catalog.Tracer(dir=str(tmp_path / "trace"), flush_interval="50ms"),
        catalog.MemoryGuard(interval="20ms"),
        catalog.Watchdog(warn_after="1m", interval="20ms"),
    ]


def scheduler_plugins(tmp_path) -> list:
    return [
        catalog.SchedulerEnvironment(set=["CATALOG_HOSTILE=1"]),
        catalog.SchedulerStructuredLogging(file=str(tmp_path / "slog-{pid}.jsonl")),
        catalog.SchedulerMetrics(port=0),
        catalog.SchedulerTracer(dir=str(tmp_path / "strace"), flush_interval="50ms"),
        catalog.EventLog(file=str(tmp_path / "events.jsonl")),
    ]


def work(client: Client) -> None:
    futures = client.map(lambda x: x + 1, range(20), pure=False)
    assert sum(client.gather(futures)) == sum(range(1, 21))


def settle(client: Client | None = None) -> None:
    # Closed sockets and finished threads go away asynchronously.
    time.sleep(0.3)
    gc.collect()


#: Counted exactly; the total of fds also holds distributed's own connections.
EXACT = ("catalog_threads", "handlers", "filters", "collectors", "signals")
EXACT_FDS = (*EXACT, "files", "listening")


def same(before: dict, after: dict, what: str) -> None:
    for key in EXACT_FDS:
        assert after[key] == before[key], (what, key, before[key], after[key])


# -- one process, several workers -----------------------------------------------


def test_reregistering_every_entry_five_times_leaks_nothing(tmp_path):
    """Two workers and a scheduler in this process; every entry registered 5x."""
    pushgateway = f"http://{LOOPBACK}:{closed_port()}"
    # The one collector the catalog adds to a process, whatever runs in it.
    _prom.register_process_collector()
    start = census()
    errors = ErrorRecords()
    logging.getLogger("catalog").addHandler(errors)
    with (
        local_cluster(2) as cluster,
        Client(cluster) as client,
    ):
        names = set()
        counts = []
        for _ in range(5):
            for plugin in scheduler_plugins(tmp_path) + worker_plugins(
                tmp_path, pushgateway
            ):
                client.register_plugin(plugin)
                names.add(plugin.name)
            work(client)
            settle()
            counts.append(census())

        # The first registration built things; the four others built nothing more.
        # Files: those the entries of this test write (other tests' threads may
        # open and close files of their own while this one counts).
        def own(count: dict) -> dict:
            return {**count, "files": [f for f in count["files"] if str(tmp_path) in f]}

        for later in counts[1:]:
            same(own(counts[0]), own(later), "after re-registration")
        # One flush thread per tracer file, one guard and one watchdog per worker.
        threads = Counter(name.split(" ")[0] for name in counts[-1]["catalog_threads"])
        assert threads["catalog-memory"] == 2
        assert threads["catalog-watchdog"] == 2
        # The pushers of the two workers, the standalone servers of all three.
        kinds = Counter(
            " ".join(n.split(" ")[:2]) for n in counts[-1]["catalog_threads"]
        )
        assert kinds["catalog.metrics pusher"] == 2
        assert kinds["catalog.metrics http"] == 3
        assert threads["catalog.metrics"] == 5
        servers = [cluster.scheduler, *(w for w in cluster.workers.values())]
        for server in servers:
            active = active_plugins(server)
            assert all(p.active for p in active.values())
            for name, plugin in active.items():
                assert server.plugins[name] is plugin  # exactly one instance
        assert set(active_plugins(cluster.scheduler)) == {
            p.name for p in scheduler_plugins(tmp_path)
        }
        assert set().union(*(active_plugins(srv) for srv in servers)) == names
        # Unregister every worker-side entry: its resources are gone.
        for plugin in worker_plugins(tmp_path, pushgateway):
            client.unregister_worker_plugin(plugin.name)
        settle()
        after_workers = census()
        assert not [
            t for t in after_workers["catalog_threads"] if "scheduler" not in t
        ], after_workers["catalog_threads"]
        for worker in cluster.workers.values():
            assert active_plugins(worker) == {}
        work(client)
    logging.getLogger("catalog").removeHandler(errors)
    settle()
    end = census()
    # Nothing of the catalog outlives the cluster.
    assert end["catalog_threads"] == []
    for key in ("handlers", "filters", "collectors", "signals", "listening"):
        assert end[key] == start[key], (key, start[key], end[key])
    assert not [f for f in end["files"] if f.startswith(str(tmp_path))], end["files"]
    # The only error is the unreachable Pushgateway: one line per plugin
    # instance (2 workers x 5 registrations), however many pushes failed.
    lines = [r.getMessage() for r in errors.records]
    assert len(lines) == 10 and all("push to" in line for line in lines), lines
    # No catalog metric of the closed cluster stays on the shared registry.
    exposition = generate_latest(REGISTRY).decode()
    for address in (w.address for w in cluster.workers.values()):
        assert address not in exposition


def test_an_unregistered_scheduler_entry_is_released_at_close(tmp_path):
    start = census()
    cluster = local_cluster(0)
    try:
        with Client(cluster) as client:
            for plugin in scheduler_plugins(tmp_path):
                client.register_plugin(plugin)
                client.unregister_scheduler_plugin(plugin.name)
        cluster.close()
        settle()
        leaked = active_plugins(cluster.scheduler)
        assert leaked == {}
        assert census()["files"] == start["files"]
    finally:
        # Release them by hand, or they spoil the tests that follow.
        for plugin in active_plugins(cluster.scheduler).values():
            plugin._teardown(cluster.scheduler)
        cluster.close()


def test_clusters_one_after_another_and_a_py_preload(tmp_path):
    """Three clusters in a row, configured by preload, each with two workers."""
    preload = tmp_path / "my_preload.py"
    # A user's own preload file that re-exports an entry: the body runs again
    # from a copy in each worker's directory.
    preload.write_text("from catalog.metrics import dask_setup, dask_teardown\n")
    config = {
        "distributed.worker.preload": ["catalog", str(preload)],
        "distributed.worker.preload-argv": [
            ["--enable", "tracer,memory,watchdog,env", "--env-set", "X=1"],
            [],
        ],
        "distributed.scheduler.preload": ["catalog"],
        "catalog.enable": ["events", "metrics", "tracer"],
        "catalog.events.file": str(tmp_path / "events.jsonl"),
    }
    seen = []
    with (
        dask.config.set(config),
        captured_logger("distributed", level=logging.INFO) as dlog,
        captured_logger("catalog", level=logging.WARNING) as clog,
    ):
        for _ in range(3):
            with (
                local_cluster(2) as cluster,
                Client(cluster) as client,
            ):
                work(client)
                addresses = [w.address for w in cluster.workers.values()]
                seen.append((addresses, census()))
                for worker in cluster.workers.values():
                    assert set(active_plugins(worker)) == {
                        "catalog.env",
                        "catalog.metrics",
                        "catalog.tracer",
                        "catalog.memory",
                        "catalog.watchdog",
                    }
                assert set(active_plugins(cluster.scheduler)) == {
                    "catalog.events",
                    "catalog.metrics",
                    "catalog.tracer",
                }
                exposition = generate_latest(REGISTRY).decode()
                live = [
                    line
                    for line in exposition.splitlines()
                    if line.startswith("dask_catalog_tasks_total{")
                ]
                assert live and all(
                    any(a in line for a in addresses) for line in live
                ), live
    logs = dlog.getvalue() + clog.getvalue()
    assert "Failed to start preload" not in logs
    assert "Duplicated timeseries" not in logs
    assert "DuplicateTimeseries" not in logs
    assert "could not set up" not in logs
    # The three clusters leave the same footprint.
    counts = [c for _, c in seen]
    for key in ("catalog_threads", "handlers", "collectors", "signals"):
        assert counts[0][key] == counts[1][key] == counts[2][key], key


# -- real processes: across client.restart() ------------------------------------


@pytest.mark.slow
def test_reregistering_across_restart_leaks_nothing(tmp_path):
    """A nanny and its worker process; every entry 5x, restart, 5x again."""
    pushgateway = f"http://{LOOPBACK}:{closed_port()}"

    def register_all(client: Client) -> None:
        for _ in range(5):
            for plugin in [
                *worker_plugins(tmp_path, pushgateway),
                catalog.Environment(set=["CATALOG_HOSTILE=1"]),
                catalog.NannyStructuredLogging(file=str(tmp_path / "nlog-{pid}.jsonl")),
            ]:
                client.register_plugin(plugin)

    def measure(client: Client) -> tuple[dict, dict]:
        work(client)
        time.sleep(0.3)
        (worker,) = client.run(census).values()
        (nanny,) = client.run(census, nanny=True).values()
        return worker, nanny

    def one_each(dask_worker):
        from catalog._entry import active_plugins as active

        return {
            name: dask_worker.plugins.get(name) is plugin
            for name, plugin in active(dask_worker).items()
        }

    with (
        local_cluster(1, processes=True) as cluster,
        Client(cluster) as client,
    ):
        register_all(client)
        worker1, nanny1 = measure(client)
        register_all(client)
        worker2, nanny2 = measure(client)
        client.restart()
        worker3, nanny3 = measure(client)
        register_all(client)
        worker4, nanny4 = measure(client)
        (flags,) = client.run(one_each).values()
        (env_value,) = client.run(
            lambda: __import__("os").environ.get("CATALOG_HOSTILE")
        ).values()
    assert env_value == "1"
    assert len(flags) == 6 and all(flags.values()), flags
    for label, worker, nanny in (
        ("re-registered", worker2, nanny2),
        ("restarted", worker3, nanny3),
        ("restarted, re-registered", worker4, nanny4),
    ):
        for key in (*EXACT, "listening"):
            assert worker[key] == worker1[key], (label, "worker", key)
            assert nanny[key] == nanny1[key], (label, "nanny", key)
        # The worker's files are named after its address, which a restart changes.
        assert len(worker["files"]) == len(worker1["files"]), (label, worker["files"])
        assert nanny["files"] == nanny1["files"], (label, nanny["files"])
        # fds and threads of distributed itself vary a little (connections).
        assert abs(worker["fds"] - worker1["fds"]) <= 2, (label, worker, worker1)
        assert nanny["fds"] <= nanny1["fds"] + 2, (label, nanny, nanny1)
    threads = worker4["catalog_threads"]
    for prefix in ("catalog-memory", "catalog-watchdog", "catalog.metrics pusher"):
        assert sum(t.startswith(prefix) for t in threads) == 1, threads
    assert sum(t.startswith("catalog-flush-") for t in threads) == 1, threads


@pytest.mark.slow
def test_py_path_preload_on_a_real_worker(procs, tmp_path):
    """The worker runs a copy of the file's body again; nothing registers twice."""
    preload = tmp_path / "team_preload.py"
    preload.write_text(
        "from catalog.metrics import dask_setup, dask_teardown  # noqa: F401\n"
    )

    def _preloaded(dask_worker) -> tuple[list[str], list[str], int]:
        # Pickled by value (a local function): the worker cannot import this module.
        from prometheus_client import REGISTRY as registry
        from prometheus_client import generate_latest as latest

        from catalog._entry import active_plugins as active

        text = latest(registry).decode()
        return (
            sorted(active(dask_worker)),
            [
                line.split()[2]
                for line in text.splitlines()
                if line.startswith("# TYPE dask_catalog_")
            ],
            dask_worker.plugins["catalog.metrics"].settings.max_prefixes,
        )

    _, addr = procs.scheduler()
    worker = procs.worker(
        addr,
        "--nthreads",
        "1",
        "--preload",
        str(preload),
        "--metrics-max-prefixes",
        "7",
    )
    with Client(addr, timeout="30s") as client:
        work(client)
        (found,) = client.run(_preloaded).values()
    plugins, families, limit = found
    assert plugins == ["catalog.metrics"]
    assert "dask_catalog_tasks_total" in families
    assert len(families) == len(set(families)), families  # each family once
    assert limit == 7
    out = worker.output
    assert "Failed to start preload" not in out
    assert "Duplicated timeseries" not in out and "Traceback" not in out


@pytest.mark.xfail(
    reason="open (stop 26): after merging the guards stream's otel hook changes the "
    "scheduler pipeline's queue is not drained while the collector is down; "
    "the leak fix and this test came from the proof stream; see the closing note",
    strict=False,
)
def test_otel_scheduler_forgets_every_key_while_its_collector_is_down():
    # The scheduler half follows each key through its waits in _since/_stints;
    # a full queue (collector down, max-queue 5) used to drop the record that
    # ends a wait, and the key stayed there for good (the soak found ~1 KB per
    # key). Every followed key must be let go once the tasks are done.
    pytest.importorskip("opentelemetry.sdk.trace")
    import asyncio

    from distributed.utils_test import gen_cluster

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        endpoint = f"http://{LOOPBACK}:{sock.getsockname()[1]}"  # closed

    @gen_cluster(client=True, nthreads=[(LOOPBACK, 2)], timeout=120)
    async def run(c, s, a):
        plugin = catalog.SchedulerOpenTelemetry(endpoint=endpoint, max_queue=5)
        await c.register_plugin(plugin)
        plugin = s.plugins["catalog.otel"]
        for batch in range(5):
            futures = c.map(lambda x: x + 1, range(batch * 400, batch * 400 + 400))
            assert len(await c.gather(futures)) == 400
            del futures
        # The drain thread converts what is queued every INTERVAL.
        deadline = time.monotonic() + 60
        while plugin.pipeline.records and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not plugin.pipeline.records
        assert plugin.status()["dropped"] > 0  # the queue was full: records dropped
        return len(plugin._since), len(plugin._stints)

    assert run() == (0, 0)
