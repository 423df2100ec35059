"""Tests of catalog.metrics: unit, in-process cluster, real processes and servers."""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import pickle
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import click
import dask.config
import pytest
from distributed import Event
from distributed.utils_test import captured_logger, gen_cluster
from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway
from prometheus_client.parser import text_string_to_metric_families

import catalog
from catalog import _prom
from catalog._entry import EntrySetupError, OptionError
from catalog.metrics import (
    DEFAULT_BUCKETS,
    ENTRY,
    Metrics,
    SchedulerMetrics,
    dask_setup,
)
from tests.procs import LOOPBACK, require_binary, worker_command

DOCS = Path(__file__).resolve().parent.parent / "docs"

# -- helpers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def fetch(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    found = [
        v
        for n, lab, v in samples(text)
        if n == name and all(lab.get(k) == w for k, w in labels.items())
    ]
    return sum(found) if found else None


def label_values(text: str, name: str, label: str) -> set[str]:
    return {lab[label] for n, lab, _ in samples(text) if n == name and label in lab}


def ours(text: str) -> str:
    """Only the catalog's families (distributed's own fail promtool)."""
    keep = ("dask_catalog_", "# HELP dask_catalog_", "# TYPE dask_catalog_")
    return "".join(line + "\n" for line in text.splitlines() if line.startswith(keep))


def scrape_of(server) -> str:
    """What a registry holding only ``server``'s families exposes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_prom.ProcessCollector(only=server))
    return generate_latest(registry).decode()


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def boom(x):
    raise ValueError(x)


# -- unit ------------------------------------------------------------------------


def test_entry_shape():
    assert ENTRY.name == "metrics"
    assert catalog.Metrics is Metrics
    assert catalog.SchedulerMetrics is SchedulerMetrics
    assert Metrics.name == SchedulerMetrics.name == "catalog.metrics"
    assert [o.name for o in ENTRY.options] == [
        "namespace",
        "buckets",
        "max-prefixes",
        "prefix-buckets",
        "fine-metrics",
        "port",
        "host",
        "port-certfile",
        "port-keyfile",
        "port-username",
        "port-password",
        "pushgateway",
        "pushgateway-username",
        "pushgateway-password",
        "pushgateway-cafile",
        "push-interval",
    ]
    assert dask_setup.entry is ENTRY
    assert set(dask_setup.plugins) == {"worker", "scheduler"}


def test_defaults():
    s = Metrics().settings
    assert s.namespace == "dask_catalog"
    assert s.buckets == DEFAULT_BUCKETS
    assert s.buckets[0] == 0.001 and s.buckets[-1] == 3600.0
    assert s.max_prefixes == 200
    assert s.port is None and s.host == "127.0.0.1"
    assert s.pushgateway is None and s.push_interval == 15.0


def test_config_then_explicit_precedence():
    with dask.config.set(
        {"catalog.metrics.max-prefixes": 7, "catalog.metrics.push-interval": "2s"}
    ):
        s = Metrics().settings
        assert (s.max_prefixes, s.push_interval) == (7, 2.0)
        assert Metrics(max_prefixes=3).settings.max_prefixes == 3


@pytest.mark.parametrize(
    ("keyword", "bad", "flag"),
    [
        ("namespace", "9lives", "--metrics-namespace"),
        ("namespace", "dask-catalog", "--metrics-namespace"),
        ("buckets", "1,0.5", "--metrics-buckets"),
        ("max_prefixes", 0, "--metrics-max-prefixes"),
        ("port", 70000, "--metrics-port"),
        ("port", "http", "--metrics-port"),
        ("pushgateway", "ftp://gateway:9091", "--metrics-pushgateway"),
        ("pushgateway", "gateway:9091", "--metrics-pushgateway"),
        ("push_interval", "0s", "--metrics-push-interval"),
    ],
)
def test_bad_values_name_the_option(keyword, bad, flag):
    with pytest.raises(OptionError) as info:
        Metrics(**{keyword: bad})
    assert flag in str(info.value)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_bad_config_value_names_the_key():
    with dask.config.set({"catalog.metrics.port": "nope"}):
        with pytest.raises(OptionError, match=r"config catalog\.metrics\.port"):
            SchedulerMetrics()


def test_pickle_keeps_only_settings():
    plugin = Metrics(max_prefixes=5, port=0, pushgateway="http://127.0.0.1:9091")
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.settings == plugin.settings
    assert clone.settings.max_prefixes == 5
    assert not clone.active
    sched = pickle.loads(pickle.dumps(SchedulerMetrics(buckets="0.1,1")))
    assert sched.settings.buckets == (0.1, 1.0)


def test_dask_setup_parses_cli_options():
    ctx = click.Context(dask_setup)
    dask_setup.parse_args(
        ctx,
        [
            *("--metrics-max-prefixes", "50", "--metrics-port", "9100"),
            *("--metrics-buckets", "0.5,5", "--metrics-push-interval", "500ms"),
        ],
    )
    given = ENTRY.given_from_params(ctx.params)
    assert given == {
        "max_prefixes": 50,
        "port": 9100,
        "buckets": (0.5, 5.0),
        "push_interval": 0.5,
    }
    assert Metrics(**given).settings.port == 9100
    with pytest.raises(click.BadParameter) as info:
        dask_setup.parse_args(click.Context(dask_setup), ["--metrics-port", "x"])
    assert "--metrics-port" in info.value.format_message()
    assert "'x'" in info.value.format_message()


# -- in-process cluster ----------------------------------------------------------


@gen_cluster(client=True)
async def test_two_workers_in_one_process(c, s, a, b):
    with captured_logger("distributed.worker", level=logging.INFO) as wlog:
        await c.register_plugin(SchedulerMetrics())
        await c.register_plugin(Metrics())
    assert "DuplicateTimeseries" not in wlog.getvalue()
    assert _prom.families_for(a) is not None and _prom.families_for(b) is not None
    await c.gather(c.map(inc, range(10), workers=[a.address]))
    await c.gather(c.map(double, range(4), workers=[b.address]))
    with pytest.raises(ValueError):
        await c.submit(boom, 1, workers=[a.address])

    # The worker's own dashboard /metrics (the global default registry).
    text = await asyncio.to_thread(
        fetch, f"http://127.0.0.1:{a.http_server.port}/metrics"
    )
    A, B = a.address, b.address
    assert value(text, "dask_catalog_tasks_total", worker=A, prefix="inc") == 10
    assert (
        value(
            text, "dask_catalog_tasks_total", worker=A, prefix="boom", outcome="error"
        )
        == 1
    )
    assert value(text, "dask_catalog_tasks_total", worker=B, prefix="double") == 4
    assert value(text, "dask_catalog_tasks_total", worker=B, prefix="inc") is None
    assert (
        value(
            text,
            "dask_catalog_task_errors_total",
            worker=A,
            prefix="boom",
            exception="ValueError",
        )
        == 1
    )
    assert (
        value(text, "dask_catalog_task_duration_seconds_count", worker=A, prefix="inc")
        == 10
    )
    assert (
        value(text, "dask_catalog_task_output_bytes_count", worker=B, prefix="double")
        == 4
    )
    assert (
        value(text, "dask_catalog_task_compute_seconds_total", worker=A, prefix="inc")
        > 0
    )
    assert value(text, "dask_catalog_tasks_executing", worker=A, prefix="inc") == 0
    assert value(text, "dask_catalog_worker_memory_limit_bytes", worker=A) == (
        a.memory_manager.memory_limit or None
    )
    assert label_values(text, "dask_catalog_tasks_total", "worker") == {A, B}
    # Scheduler half: no server label.
    assert (
        value(
            text, "dask_catalog_scheduler_tasks_total", prefix="inc", outcome="success"
        )
        == 10
    )
    assert (
        value(
            text, "dask_catalog_scheduler_tasks_total", prefix="boom", outcome="error"
        )
        == 1
    )
    assert (
        value(text, "dask_catalog_scheduler_task_wait_seconds_count", prefix="double")
        == 4
    )
    assert label_values(text, "dask_catalog_scheduler_tasks_total", "worker") == set()

    # Teardown removes that worker's series and collectors, and only those.
    await c.unregister_worker_plugin(Metrics.name)
    assert _prom.families_for(a) is None and _prom.families_for(b) is None
    text = generate_latest().decode()
    assert value(text, "dask_catalog_tasks_total") is None
    assert value(text, "dask_catalog_worker_memory_limit_bytes") is None
    assert value(text, "dask_catalog_scheduler_tasks_total", prefix="inc") == 10


def test_preload_from_config_on_an_in_process_cluster():
    """Two workers and the scheduler in one process, preloaded from dask config."""
    from distributed import Client, LocalCluster

    preloads = {
        "distributed.worker.preload": ["catalog.metrics"],
        "distributed.scheduler.preload": ["catalog.metrics"],
    }
    with (
        dask.config.set(preloads),
        captured_logger("distributed", level=logging.INFO) as log,
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
            silence_logs=False,
        ) as cluster,
        Client(cluster) as client,
    ):
        workers = list(cluster.workers.values())
        futures = client.map(inc, range(6), workers=[workers[0].address])
        assert client.gather(futures) == list(range(1, 7))
        for worker in workers:
            assert _prom.families_for(worker) is not None
        first = f"http://127.0.0.1:{workers[0].http_server.port}/metrics"
        text = fetch(first)
        assert label_values(
            text, "dask_catalog_worker_memory_limit_bytes", "worker"
        ) == {w.address for w in workers}
        assert (
            value(
                text,
                "dask_catalog_tasks_total",
                worker=workers[0].address,
                prefix="inc",
            )
            == 6
        )
        assert (
            value(text, "dask_catalog_tasks_total", worker=workers[1].address) is None
        )
        assert value(text, "dask_catalog_scheduler_tasks_total", prefix="inc") == 6
    assert "Run preload setup: catalog.metrics" in log.getvalue()
    assert "Failed to start preload" not in log.getvalue()
    assert "DuplicateTimeseries" not in log.getvalue()
    for worker in workers:
        assert _prom.families_for(worker) is None
    assert "dask_catalog_tasks_total" not in generate_latest().decode()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2)])
async def test_running_tasks_count_at_scrape_time(c, s, a):
    await c.register_plugin(Metrics())
    event = Event()

    def wait_for(ev):
        ev.wait(60)
        return 1

    future = c.submit(wait_for, event, key="slow-1")
    while not a.state.executing:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    first = scrape_of(a)
    assert value(first, "dask_catalog_tasks_executing", prefix="slow") == 1
    running = value(first, "dask_catalog_task_compute_seconds_total", prefix="slow")
    assert running >= 0.2
    assert value(first, "dask_catalog_tasks_total", prefix="slow") is None
    await asyncio.sleep(0.2)
    second = scrape_of(a)
    assert (
        value(second, "dask_catalog_task_compute_seconds_total", prefix="slow")
        > running
    )
    await event.set()
    assert await future == 1
    done = scrape_of(a)
    assert value(done, "dask_catalog_tasks_executing", prefix="slow") == 0
    total = value(done, "dask_catalog_task_compute_seconds_total", prefix="slow")
    assert total >= value(
        second, "dask_catalog_task_compute_seconds_total", prefix="slow"
    )
    assert (
        value(done, "dask_catalog_tasks_total", prefix="slow", outcome="success") == 1
    )


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_max_prefixes_folds_into_other(c, s, a):
    await c.register_plugin(Metrics(max_prefixes=2))
    for prefix in ("alpha", "beta", "gamma", "delta"):
        await c.submit(inc, 1, key=f"{prefix}-1")
    text = scrape_of(a)
    assert label_values(text, "dask_catalog_tasks_total", "prefix") == {
        "alpha",
        "beta",
        "other",
    }
    assert (
        value(text, "dask_catalog_tasks_total", prefix="other", outcome="success") == 2
    )


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_other_entries_add_families_through_families_for(c, s, a):
    assert _prom.families_for(a) is None
    await c.register_plugin(Metrics(namespace="myns"))
    fam = _prom.families_for(a)
    assert fam is not None and fam.labels == {"worker": a.address}
    fam.counter("watchdog_warnings", "Warnings.", ["prefix"]).labels(
        fam.prefix("x")
    ).inc()
    text = scrape_of(a)
    assert (
        value(text, "myns_watchdog_warnings_total", prefix="x", worker=a.address) == 1
    )
    await c.unregister_worker_plugin(Metrics.name)
    assert _prom.families_for(a) is None
    assert "myns_" not in scrape_of(a)


@gen_cluster(client=True)
async def test_standalone_port_serves_only_its_worker(c, s, a, b):
    await c.register_plugin(Metrics(port=0))
    await c.gather(c.map(inc, range(3), workers=[a.address]))
    status = a.plugins[Metrics.name].status()
    assert status["active"] and status["url"].startswith("http://127.0.0.1:")
    text = await asyncio.to_thread(fetch, status["url"])
    assert label_values(text, "dask_catalog_tasks_total", "worker") == {a.address}
    assert value(text, "dask_catalog_tasks_total", prefix="inc", outcome="success") == 3
    url = status["url"]
    await c.unregister_worker_plugin(Metrics.name)
    with pytest.raises(OSError):
        await asyncio.to_thread(fetch, url, 2)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_port_in_use_is_a_setup_failure(c, s, a):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with captured_logger("catalog", level=logging.ERROR) as log:
            with pytest.raises(EntrySetupError, match=f"127.0.0.1:{port}"):
                await c.register_plugin(Metrics(port=port))
        assert "metrics" in log.getvalue() and "refusing to start" in log.getvalue()
        assert _prom.families_for(a) is None
        with dask.config.set({"catalog.strict": False}):
            with captured_logger("catalog", level=logging.ERROR) as log:
                await c.register_plugin(Metrics(port=port), name="catalog.metrics")
        assert "going on without it" in log.getvalue()
        assert not a.plugins[Metrics.name].active
        assert _prom.families_for(a) is None


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_unreachable_pushgateway_is_one_error(c, s, a):
    gateway = f"http://127.0.0.1:{free_port()}"
    with captured_logger("catalog", level=logging.ERROR) as log:
        await c.register_plugin(Metrics(pushgateway=gateway, push_interval="50ms"))
        plugin = a.plugins[Metrics.name]
        deadline = time.monotonic() + 30
        while plugin.errors < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert plugin.errors >= 3
        await c.submit(inc, 1)  # work goes on
    lines = [line for line in log.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and gateway in lines[0]
    assert plugin.status()["last_error"].startswith(f"push to {gateway}")
    await c.unregister_worker_plugin(Metrics.name)


# -- real processes and servers ----------------------------------------------------


def dashboard_port(proc) -> int:
    return int(proc.wait_for(r"dashboard at:\s+(?:http://)?[\d.]+:(\d+)").group(1))


def run_work(address: str) -> None:
    """20 ``inc`` tasks and one failing ``boom`` task, from a real client.

    Built-in functions with explicit keys: the subprocesses cannot import this
    test module.
    """
    from distributed import Client

    with Client(address, timeout=30) as client:
        futures = [client.submit(operator.add, i, 1, key=f"inc-{i}") for i in range(20)]
        assert client.gather(futures) == list(range(1, 21))
        with pytest.raises(ZeroDivisionError):
            client.submit(operator.truediv, 1, 0, key="boom-1").result(timeout=30)


def wait_until(func, timeout: float = 60, interval: float = 0.5, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = func()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s\n{why()}")
        time.sleep(interval)


@pytest.mark.slow
def test_cli_worker_and_scheduler_expose_families(procs):
    sched, address = procs.scheduler("--preload", "catalog.metrics")
    worker = procs.worker(
        address,
        "--nthreads",
        "2",
        "--preload",
        "catalog.metrics",
        "--metrics-max-prefixes",
        "50",
    )
    run_work(address)
    text = fetch(f"http://127.0.0.1:{dashboard_port(worker)}/metrics")
    workers = label_values(text, "dask_catalog_tasks_total", "worker")
    assert len(workers) == 1 and workers.pop().startswith("tcp://127.0.0.1:")
    assert (
        value(text, "dask_catalog_tasks_total", prefix="inc", outcome="success") == 20
    )
    assert (
        value(
            text,
            "dask_catalog_task_errors_total",
            prefix="boom",
            exception="ZeroDivisionError",
        )
        == 1
    )
    assert value(text, "dask_catalog_task_duration_seconds_count", prefix="inc") == 20
    assert value(text, "dask_catalog_worker_memory_limit_bytes") > 0
    stext = fetch(f"http://127.0.0.1:{dashboard_port(sched)}/metrics")
    assert (
        value(stext, "dask_catalog_scheduler_task_wait_seconds_count", prefix="inc")
        == 20
    )
    assert (
        value(
            stext, "dask_catalog_scheduler_tasks_total", prefix="boom", outcome="error"
        )
        == 1
    )
    promtool = require_binary("promtool")
    for exposition in (text, stext):
        check = subprocess.run(
            [promtool, "check", "metrics"],
            input=ours(exposition),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == "" and check.stderr.strip() == ""
    assert "Failed to start preload" not in worker.output + sched.output


@pytest.mark.slow
def test_prometheus_server_scrapes_the_worker(procs, tmp_path):
    binary = require_binary("prometheus")
    _, address = procs.scheduler()
    worker = procs.worker(address, "--preload", "catalog.metrics")
    run_work(address)
    target = f"127.0.0.1:{dashboard_port(worker)}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: dask\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    procs.start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        name="prometheus",
    )
    query = urllib.parse.urlencode(
        {"query": 'dask_catalog_tasks_total{prefix="inc",outcome="success"}'}
    )

    def result():
        answer = json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/query?{query}"))
        return answer["data"]["result"]

    found = wait_until(result, timeout=90)
    assert len(found) == 1
    assert found[0]["metric"]["job"] == "dask"
    assert found[0]["metric"]["worker"].startswith("tcp://127.0.0.1:")
    assert float(found[0]["value"][1]) == 20

    # Every query of the shipped Grafana dashboard is valid PromQL for this server,
    # and the per-prefix throughput panel has data once two scrapes are in.
    dashboard = json.loads((DOCS / "assets" / "grafana-dashboard.json").read_text())
    variables = {"$__rate_interval": "1m", "$__range": "1h"}
    variables |= {"$prefix": ".*", "$worker": ".*", "$span": ".*"}

    def ask(expr: str) -> dict:
        for name, text in variables.items():
            expr = expr.replace(name, text)
        query = urllib.parse.urlencode({"query": expr})
        return json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/query?{query}"))

    exprs = {
        panel["title"]: [target["expr"] for target in panel["targets"]]
        for panel in dashboard["panels"]
    }
    for title, targets in exprs.items():
        for expr in targets:
            answer = ask(expr)
            assert answer["status"] == "success", (title, answer)
    (throughput,) = exprs["Tasks finished per second"]
    rows = wait_until(lambda: ask(throughput)["data"]["result"], timeout=60)
    assert {r["metric"].get("prefix") for r in rows} >= {"inc"}


def test_how_to_alert_rules_pass_promtool(tmp_path):
    promtool = require_binary("promtool")
    text = (DOCS / "how-to" / "prometheus-grafana.md").read_text()
    rules = re.search(r"```yaml\n(# dask-alerts\.yml\n.*?)```", text, re.DOTALL)
    assert rules is not None
    path = tmp_path / "dask-alerts.yml"
    path.write_text(rules.group(1))
    check = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "3 rules found" in check.stdout


@pytest.mark.slow
def test_pushgateway_receives_pushes_and_the_final_push(procs):
    binary = require_binary("prometheus-pushgateway")
    port = free_port()
    gateway = procs.start(
        # Debian's default persistence file is shared by every gateway on the host.
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        name="pushgateway",
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: fetch(f"{url}/-/ready"), timeout=30, interval=0.2)
    _, address = procs.scheduler()
    # A long interval: only the first push (at setup) and the final push happen,
    # so the task counts at the gateway can only come from the final push.
    worker = procs.worker(
        address,
        "--preload",
        "catalog.metrics",
        "--metrics-pushgateway",
        url,
        "--metrics-push-interval",
        "1h",
    )
    text = wait_until(
        lambda: (t := fetch(f"{url}/metrics")) and "dask_catalog_" in t and t,
        why=lambda: worker.output + fetch(f"{url}/api/v1/metrics"),
    )
    instances = label_values(text, "dask_catalog_worker_memory_limit_bytes", "instance")
    assert len(instances) == 1 and instances.pop().startswith("tcp://127.0.0.1:")
    assert value(text, "dask_catalog_worker_memory_limit_bytes", job="dask") > 0
    assert value(text, "dask_catalog_tasks_total", job="dask") is None
    run_work(address)
    assert worker.stop() == 0
    text = fetch(f"{url}/metrics")
    assert (
        value(text, "dask_catalog_tasks_total", prefix="inc", outcome="success") == 20
    )
    assert (
        value(text, "dask_catalog_task_errors_total", exception="ZeroDivisionError")
        == 1
    )
    assert gateway.popen.poll() is None


@pytest.mark.slow
def test_cli_port_in_use_refuses_to_start(procs):
    _, address = procs.scheduler()
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = procs.worker(
            address,
            "--preload",
            "catalog.metrics",
            "--metrics-port",
            str(port),
            wait=False,
        )
        status = worker.popen.wait(60)
    assert status != 0
    assert f"127.0.0.1:{port}" in worker.output
    assert "catalog entry 'metrics' could not set up" in worker.output
    assert "Registered to:" not in worker.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "bad"),
    [("--metrics-port", "notaport"), ("--metrics-pushgateway", "ftp://x")],
)
def test_cli_bad_value_exits_2(flag, bad):
    result = subprocess.run(
        [
            *worker_command(f"tcp://{LOOPBACK}:1"),
            *("--preload", "catalog.metrics", flag, bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors and flag in errors[0] and bad in result.stderr


# -- basic auth and TLS, against the real servers ---------------------------------


def https_get(url: str, cafile: str, auth: tuple[str, str] | None = None) -> str:
    from tests.test_http import get

    return get(url, cafile=cafile, auth=auth)


@pytest.mark.slow
def test_pushgateway_with_basic_auth_and_tls(procs, tmp_path, tls_files):
    import bcrypt

    from catalog.metrics import _PushHandler

    binary = require_binary("prometheus-pushgateway")
    password = "push-s3cret-pw"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(
        "tls_server_config:\n"
        f"  cert_file: {tls_files.cert}\n"
        f"  key_file: {tls_files.key}\n"
        "basic_auth_users:\n"
        f"  pusher: '{hashed}'\n"
    )
    port = free_port()
    gateway = procs.start(
        [
            binary,
            f"--web.listen-address=127.0.0.1:{port}",
            "--persistence.file=",
            f"--web.config.file={web}",
        ],
        name="pushgateway",
    )
    url = f"https://127.0.0.1:{port}"
    auth = ("pusher", password)
    wait_until(
        lambda: https_get(f"{url}/-/ready", tls_files.ca, auth),
        timeout=30,
        interval=0.2,
        why=lambda: gateway.output,
    )
    with pytest.raises(urllib.error.HTTPError, match="401"):
        https_get(f"{url}/metrics", tls_files.ca)  # the gateway does check
    # Our push handler against the real gateway: a wrong password is refused.
    registry = CollectorRegistry()
    with pytest.raises(urllib.error.HTTPError, match="401"):
        push_to_gateway(
            url,
            job="probe",
            registry=registry,
            handler=_PushHandler("pusher", "wrong", tls_files.ca),
        )

    # The scheduler has its credentials in the URL, the worker has options and
    # the password in an environment variable (not on its command line).
    sched, address = procs.scheduler(
        "--preload",
        "catalog.metrics",
        "--metrics-pushgateway",
        f"https://pusher:{password}@127.0.0.1:{port}",
        "--metrics-pushgateway-cafile",
        tls_files.ca,
        "--metrics-push-interval",
        "1h",
    )
    worker = procs.worker(
        address,
        "--preload",
        "catalog.metrics",
        "--metrics-pushgateway",
        url,
        "--metrics-pushgateway-username",
        "pusher",
        "--metrics-pushgateway-cafile",
        tls_files.ca,
        "--metrics-push-interval",
        "1h",
        env={"DASK_CATALOG__METRICS__PUSHGATEWAY_PASSWORD": password},
    )
    run_work(address)
    assert worker.stop() == 0  # the final push
    text = https_get(f"{url}/metrics", tls_files.ca, auth)
    assert (
        value(text, "dask_catalog_tasks_total", prefix="inc", outcome="success") == 20
    )
    instances = label_values(text, "push_time_seconds", "instance")
    assert address in instances and len(instances) == 2, instances
    for proc in (worker, sched):
        assert password not in proc.output
        assert "push to" not in proc.output, proc.output
    assert gateway.popen.poll() is None


@pytest.mark.slow
def test_prometheus_scrapes_the_port_with_basic_auth_and_tls(
    procs, tmp_path, tls_files
):
    binary = require_binary("prometheus")
    password = "scrape-s3cret-pw"
    _, address = procs.scheduler()
    port = free_port()
    worker = procs.worker(
        address,
        "--no-dashboard",
        "--preload",
        "catalog.metrics",
        "--metrics-port",
        str(port),
        "--metrics-port-certfile",
        tls_files.cert,
        "--metrics-port-keyfile",
        tls_files.key,
        "--metrics-port-username",
        "scraper",
        env={"DASK_CATALOG__METRICS__PORT_PASSWORD": password},
    )
    run_work(address)
    target = f"127.0.0.1:{port}"
    tls = f"tls_config: {{ca_file: '{tls_files.ca}'}}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: dask\n"
        "    scheme: https\n"
        f"    {tls}\n"
        f"    basic_auth: {{username: scraper, password: '{password}'}}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
        "  - job_name: anonymous\n"
        "    scheme: https\n"
        f"    {tls}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    web_port = free_port()
    prometheus = procs.start(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        name="prometheus",
    )
    api = f"http://127.0.0.1:{web_port}/api/v1"
    query = urllib.parse.urlencode(
        {"query": 'dask_catalog_tasks_total{prefix="inc",outcome="success"}'}
    )

    def result():
        return json.loads(fetch(f"{api}/query?{query}"))["data"]["result"]

    found = wait_until(result, timeout=90, why=lambda: prometheus.output)
    assert [r["metric"]["job"] for r in found] == ["dask"]
    assert float(found[0]["value"][1]) == 20

    def anonymous():
        targets = json.loads(fetch(f"{api}/targets"))["data"]["activeTargets"]
        (job,) = [t for t in targets if t["labels"]["job"] == "anonymous"]
        return job["health"] == "down" and job

    refused = wait_until(anonymous, timeout=60)
    assert "401" in refused["lastError"]
    assert password not in worker.output


# -- the scrape an operator pays for ---------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], timeout=120)
async def test_a_scrape_of_200_prefixes_with_every_entry_stays_small(c, s, a):
    # Issue #16: 840 kB on v1 (every histogram bucket of every prefix).
    await c.register_plugin(Metrics())
    await c.register_plugin(catalog.MemoryGuard())
    await c.register_plugin(catalog.Tracer())
    await c.register_plugin(catalog.Watchdog())
    futures = [
        c.submit(inc, j, key=f"prefix{i:03d}-{j}") for i in range(200) for j in range(3)
    ]
    await c.gather(futures)
    text = scrape_of(a)
    assert len(label_values(text, "dask_catalog_tasks_total", "prefix")) == 200
    assert value(text, "dask_catalog_tasks_total", outcome="success") == 600
    assert value(text, "dask_catalog_task_duration_seconds_count") == 600
    # Issue #16 asks for <= 150 kB; since the memory entry counts every task
    # (issue #15) the peak-memory summary covers all 200 prefixes and this
    # scrape is ~178 kB. The target stays open on #16; this bound guards
    # against a return to v1's per-bucket exposition.
    assert len(text.encode()) <= 200_000, len(text.encode())


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_prefix_buckets_keeps_the_same_families_with_every_bucket(c, s, a):
    def families(text):
        return {f.name: f.type for f in text_string_to_metric_families(text)}

    await c.register_plugin(Metrics())
    await c.register_plugin(SchedulerMetrics())
    await c.gather(c.map(inc, range(5)))
    off, off_s = scrape_of(a), scrape_of(s)
    # Off (the default): a count and a sum per prefix, exact.
    assert families(off)["dask_catalog_task_duration_seconds"] == "summary"
    assert "dask_catalog_task_duration_seconds_bucket" not in off
    assert value(off, "dask_catalog_task_duration_seconds_count", prefix="inc") == 5
    assert value(off, "dask_catalog_task_output_bytes_count", prefix="inc") == 5
    assert (
        value(off_s, "dask_catalog_scheduler_task_wait_seconds_count", prefix="inc")
        == 5
    )
    await c.register_plugin(Metrics(prefix_buckets=True))
    await c.register_plugin(SchedulerMetrics(prefix_buckets=True))
    await c.gather(c.map(inc, range(10, 15)))
    on, on_s = scrape_of(a), scrape_of(s)
    assert families(on)["dask_catalog_task_duration_seconds"] == "histogram"
    assert families(on_s)["dask_catalog_scheduler_task_wait_seconds"] == "histogram"
    buckets = [
        lab["le"]
        for n, lab, _ in samples(on)
        if n == "dask_catalog_task_duration_seconds_bucket" and lab["prefix"] == "inc"
    ]
    assert len(buckets) == len(DEFAULT_BUCKETS) + 1
    assert (
        value(on, "dask_catalog_task_duration_seconds_bucket", prefix="inc", le="+Inf")
        == 5
    )
    assert value(on, "dask_catalog_task_duration_seconds_count", prefix="inc") == 5


def nap(x: float) -> float:
    time.sleep(x)
    return x


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_scheduler_snapshot_has_wait_and_compute_times(c, s, a):
    """The dashboard's data: every task in both histograms, compute from the
    worker's report (each nap sleeps 50 ms)."""
    await c.register_plugin(SchedulerMetrics())
    futures = c.map(nap, [0.05] * 5, key=[f"nap-{i}" for i in range(5)])
    assert await c.gather(futures) == [0.05] * 5
    (plugin,) = [p for p in s.plugins.values() if isinstance(p, SchedulerMetrics)]
    snap = plugin.snapshot()["nap"]
    assert (snap["success"], snap["error"]) == (5, 0)
    for h in (snap["wait"], snap["compute"]):
        assert h["count"] == sum(h["counts"]) == 5
        assert len(h["counts"]) == len(h["bounds"]) + 1
    assert 0.25 <= snap["compute"]["sum"] < 5
    json.dumps(plugin.snapshot())
