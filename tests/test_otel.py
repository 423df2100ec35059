"""The otel entry against a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import gzip
import json
import pickle
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dask
import pytest
from distributed.utils import key_split_group
from distributed.utils_test import gen_cluster

import catalog
from catalog.entry import OptionError
from tests.procs import by_value

pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


class Receiver:
    """An OTLP/HTTP traces receiver: POST /v1/traces, protobuf, gzip or not."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                message = trace_service_pb2.ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver.requests.append(message)
                receiver.headers.append(dict(self.headers))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(
                    trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                )

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[dict[str, Any]]:
        """Every span received, flattened with its resource's attributes."""
        out = []
        for request in list(self.requests):
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            {
                                "name": s.name,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                                "status": s.status.code,
                                "attributes": attributes(s.attributes),
                                "resource": resource,
                            }
                        )
        return out


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [v.string_value for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, kind)
    return out


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(condition: Any, timeout: float = 30) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def inc(x: int) -> int:
    return x + 1


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


# -- options -------------------------------------------------------------------


def test_options_parse_and_refuse():
    plugin = catalog.OpenTelemetry(
        endpoint="http://127.0.0.1:4318",
        headers=["x-token=hunter2"],
        sampling_ratio="0.5",
    )
    assert plugin.settings.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert plugin.settings.sampling_ratio == 0.5
    assert "hunter2" not in repr(plugin)
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.settings == plugin.settings
    with pytest.raises(OptionError, match=r"endpoint.*'ftp://x'.*http"):
        catalog.OpenTelemetry(endpoint="ftp://x")
    with pytest.raises(OptionError, match=r"sampling_ratio.*1.5.*0 to 1"):
        catalog.OpenTelemetry(sampling_ratio=1.5)
    with pytest.raises(OptionError) as info:
        catalog.OpenTelemetry(headers=["bad header=hunter2"])
    assert "hunter2" not in str(info.value)


# -- tasks as spans --------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_every_task_arrives_once_with_its_parent(receiver, monkeypatch, compression):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", compression)

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
    async def run(c, s, a, b):
        kwargs = {"endpoint": receiver.endpoint, "service_name": "etl"}
        # The client span is exported with the entry's config in this process.
        dask.config.set({"catalog.otel.endpoint": receiver.endpoint})
        await c.register_plugin(catalog.SchedulerOpenTelemetry(**kwargs))
        await c.register_plugin(catalog.OpenTelemetry(**kwargs))
        with catalog.otel.span("client-work") as client_span:
            first = c.map(inc, range(10), key=[f"inc-{i}" for i in range(10)])
            second = c.map(inc, first, key=[f"twice-{i}" for i in range(10)])
            await c.gather(second)
        root = client_span.get_span_context()
        # a task outside any span: a trace of its own
        alone = await c.submit(inc, 100, key="alone-1")
        assert alone == 101
        await wait_for(
            lambda: (
                sum(1 for sp in receiver.spans() if sp["name"] == "inc") == 10
                and sum(1 for sp in receiver.spans() if sp["name"] == "twice") == 10
                and any(sp["name"] == "alone" for sp in receiver.spans())
                and any(sp["name"] == "client-work" for sp in receiver.spans())
            )
        )
        return root, a.address, b.address, s.address

    root, wa, wb, sa = run()
    spans = receiver.spans()
    assert receiver.headers[0].get("Content-Encoding", "none") in (compression, "none")
    by_id = {sp["span_id"]: sp for sp in spans}
    tasks = [sp for sp in spans if sp["name"] in ("inc", "twice")]
    keys = [sp["attributes"]["dask.key"] for sp in tasks]
    assert sorted(keys) == sorted(
        [f"inc-{i}" for i in range(10)] + [f"twice-{i}" for i in range(10)]
    ), "every task exactly once"
    client = next(sp for sp in spans if sp["name"] == "client-work")
    assert client["span_id"] == f"{root.span_id:016x}"
    for task in tasks:
        assert task["trace_id"] == f"{root.trace_id:032x}"
        assert task["parent"] == client["span_id"]
        attrs = task["attributes"]
        assert attrs["dask.prefix"] == task["name"]
        assert attrs["dask.group"] == key_split_group(attrs["dask.key"])
        assert attrs["dask.worker"] in (wa, wb)
        assert attrs["dask.outcome"] == "memory"
        assert attrs["dask.nbytes"] > 0
        assert isinstance(attrs["thread.id"], int)
        assert task["resource"]["service.name"] == "etl"
        assert task["resource"]["dask.worker.address"] == attrs["dask.worker"]
        assert task["resource"]["dask.version"] == dask.__version__
        assert task["resource"]["catalog.version"] == catalog.__version__
        assert "distributed.version" in task["resource"]
    phases = [sp for sp in spans if sp["parent"] in {t["span_id"] for t in tasks}]
    computes = [sp for sp in phases if sp["name"] == "compute"]
    assert len(computes) == 20
    for phase in phases:
        parent = by_id[phase["parent"]]
        assert parent["start"] <= phase["start"] <= phase["end"] <= parent["end"] or (
            phase["name"] not in ("compute", "transfer", "disk-read", "disk-write")
        )
    # scheduler spans: children of the task span the worker sent
    waits = [sp for sp in spans if sp["name"] in ("waiting", "queued", "no-worker")]
    assert waits, "the scheduler half sent its spans"
    for wait in waits:
        task = by_id[wait["parent"]]
        assert task["attributes"]["dask.key"] == wait["attributes"]["dask.key"]
        assert wait["resource"]["dask.scheduler.address"] == sa
    alone = next(sp for sp in spans if sp["name"] == "alone")
    assert alone["parent"] == "" and alone["trace_id"] != f"{root.trace_id:032x}"


def test_teardown_exports_what_is_queued(receiver):
    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
    async def run(c, s, a):
        await c.register_plugin(catalog.OpenTelemetry(endpoint=receiver.endpoint))
        await c.gather(c.map(inc, range(10), key=[f"last-{i}" for i in range(10)]))
        # the cluster closes now, before the drain thread's next round

    run()
    assert sum(1 for sp in receiver.spans() if sp["name"] == "last") == 10


def test_errors_transfers_and_dask_spans_become_attributes(receiver):
    from distributed import span as dask_span

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
    async def run(c, s, a, b):
        await c.register_plugin(catalog.OpenTelemetry(endpoint=receiver.endpoint))
        x = c.submit(inc, 1, key="left-1", workers=[a.address])
        with dask_span("my workflow"):
            y = c.submit(inc, x, key="right-1", workers=[b.address])
            bad = c.submit(fail, 1, key="fail-1")
            await y
            with pytest.raises(ValueError):
                await bad
        await wait_for(lambda: len({sp["name"] for sp in receiver.spans()}) >= 4)

    run()
    spans = receiver.spans()
    right = next(sp for sp in spans if sp["name"] == "right")
    assert right["attributes"]["dask.span.name"] == ["my workflow"]
    children = [sp for sp in spans if sp["parent"] == right["span_id"]]
    transfer = next(sp for sp in children if sp["name"] == "transfer")
    assert transfer["attributes"]["dask.source"]
    failed = next(sp for sp in spans if sp["name"] == "fail")
    assert failed["attributes"]["dask.outcome"] == "error"
    assert failed["status"] == 2  # STATUS_CODE_ERROR


def test_user_span_and_traceparent_annotation(receiver):
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    tracer = provider.get_tracer("user")

    @gen_cluster(client=True)
    async def run(c, s, a, b):
        await c.register_plugin(catalog.OpenTelemetry(endpoint=receiver.endpoint))
        catalog.otel.propagate()
        try:
            with tracer.start_as_current_span("user-span") as user:
                await c.submit(inc, 1, key="auto-1")
        finally:
            catalog.otel.propagate(False)
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        with dask.annotate(traceparent=tp):
            await c.submit(inc, 2, key="manual-1")
        await wait_for(lambda: len(receiver.spans()) >= 4)
        return user.get_span_context()

    user = run()
    spans = receiver.spans()
    auto = next(sp for sp in spans if sp["name"] == "auto")
    assert auto["trace_id"] == f"{user.trace_id:032x}"
    assert auto["parent"] == f"{user.span_id:016x}"
    manual = next(sp for sp in spans if sp["name"] == "manual")
    assert manual["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert manual["parent"] == "b7ad6b7169203331"
    assert dask.get_annotations is catalog.otel._ORIGINAL_ANNOTATIONS or (
        catalog.otel._ORIGINAL_ANNOTATIONS is None
    )


def test_client_preload_registers_the_cluster_and_propagates(receiver):
    from distributed import Client
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("user")
    original = dask.get_annotations

    @gen_cluster(client=False)
    async def run(s, a, b):
        config = {
            "distributed.client.preload": ["catalog.otel"],
            "catalog.otel.endpoint": receiver.endpoint,
        }
        with dask.config.set(config):
            async with Client(s.address, asynchronous=True) as c:
                assert dask.get_annotations is not original
                with tracer.start_as_current_span("preloaded") as user:
                    await c.submit(inc, 1, key="pre-1")
                await wait_for(
                    lambda: (
                        any(sp["name"] == "pre" for sp in receiver.spans())
                        and any(sp["name"] == "waiting" for sp in receiver.spans())
                    )
                )
        assert dask.get_annotations is original, "teardown restores it"
        return user.get_span_context()

    user = run()
    task = next(sp for sp in receiver.spans() if sp["name"] == "pre")
    assert task["parent"] == f"{user.span_id:016x}"
    assert task["trace_id"] == f"{user.trace_id:032x}"


def test_otel_variables_apply_where_options_are_not_set(receiver, monkeypatch):
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint + "/v1/traces"
    )
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-env=1,x-both=env")

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
    async def run(c, s, a):
        await c.register_plugin(catalog.OpenTelemetry(headers=["x-both=option"]))
        await c.submit(inc, 1, key="env-1")
        await wait_for(lambda: any(sp["name"] == "env" for sp in receiver.spans()))

    run()
    task = next(sp for sp in receiver.spans() if sp["name"] == "env")
    assert task["resource"]["service.name"] == "from-env"
    headers = {k.lower(): v for k, v in receiver.headers[0].items()}
    assert headers["x-env"] == "1" and headers["x-both"] == "option"


def test_sampling_ratio_zero_sends_nothing_and_a_sampled_parent_wins(receiver):
    @gen_cluster(client=True)
    async def run(c, s, a, b):
        await c.register_plugin(
            catalog.OpenTelemetry(endpoint=receiver.endpoint, sampling_ratio=0)
        )
        await c.gather(c.map(inc, range(5)))
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        with dask.annotate(traceparent=tp):
            await c.submit(inc, 10, key="kept-1")
        await wait_for(lambda: any(sp["name"] == "kept" for sp in receiver.spans()))

    run()
    assert {sp["name"] for sp in receiver.spans()} == {"kept", "compute"}


# -- a down collector ------------------------------------------------------------


def test_down_collector_bounded_queue_and_the_work_finishes():
    endpoint = f"http://127.0.0.1:{closed_port()}"

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 2)], timeout=180)
    async def run(c, s, a):
        await c.register_plugin(catalog.OpenTelemetry(endpoint=endpoint, max_queue=50))
        plugin = a.plugins["catalog.otel"]
        peak = 0

        def watch() -> None:
            nonlocal peak
            peak = max(peak, len(plugin.pipeline.records))

        results = []
        for batch in range(10):
            futures = c.map(inc, range(batch * 200, batch * 200 + 200))
            results += await c.gather(futures)
            watch()
        assert len(results) == 2000
        status = plugin.status()
        assert peak <= 50
        assert status["queued"] <= 50 * 5
        assert status["dropped"] + status["failed"] + status["queued"] >= 1
        assert status["exported"] == 0
        await wait_for(lambda: plugin.status()["failed"] > 0)
        assert "127.0.0.1" in plugin.status()["last_export_error"]
        return status

    status = run()
    assert status["dropped"] > 0  # 2000 tasks, a queue of 50, nothing leaving


# -- setup without the extra ---------------------------------------------------

BLOCK_OTEL = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"blocked for the test: {name}")
        return None
sys.meta_path.insert(0, Block())
"""


def run_without_otel(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_OTEL + code],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_the_extra_catalog_and_the_cli_work():
    result = run_without_otel(
        "import catalog, catalog.otel\n"
        "from click.testing import CliRunner\n"
        "from catalog.cli import main\n"
        "r = CliRunner()\n"
        "for args in (['list'], ['show', 'otel'], ['show', 'tracer']):\n"
        "    out = r.invoke(main, args)\n"
        "    assert out.exit_code == 0, (args, out.output)\n"
        "print(catalog.OpenTelemetry(service_name='x').settings.service_name)\n"
        "assert 'opentelemetry' not in ' '.join(sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "x"


def test_without_the_extra_the_command_line_is_a_usage_error():
    result = run_without_otel(
        "from distributed.cli.dask_worker import main\n"
        "import sys\n"
        "sys.argv = ['dask worker', 'tcp://127.0.0.1:1', '--preload', 'catalog',\n"
        "            '--enable', 'otel']\n"
        "main()\n"
    )
    assert result.returncode == 2, result.stderr
    assert 'pip install "dask-catalog[otel]"' in result.stderr
    assert "Traceback" not in result.stderr


def test_without_the_extra_strict_setup_refuses():
    result = run_without_otel(
        "import asyncio, catalog\n"
        "from catalog.entry import EntrySetupError\n"
        "from distributed import Scheduler, Worker\n"
        "async def main():\n"
        "    async with Scheduler(host='127.0.0.1', dashboard_address=':0') as s:\n"
        "        try:\n"
        "            async with Worker(s.address, plugins={catalog.OpenTelemetry()}):\n"
        "                pass\n"
        "        except RuntimeError as exc:  # Worker failed to start, from ...\n"
        "            cause = exc.__cause__\n"
        "            assert isinstance(cause, EntrySetupError), repr(cause)\n"
        "            print('REFUSED', cause)\n"
        "asyncio.run(main())\n"
    )
    assert "REFUSED" in result.stdout, result.stdout + result.stderr
    assert 'pip install "dask-catalog[otel]"' in result.stdout


# -- status and metrics ------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_status_and_metrics_count_exports(c, s, a):
    from prometheus_client import generate_latest

    endpoint = f"http://127.0.0.1:{closed_port()}"
    await c.register_plugin(catalog.Metrics())
    await c.register_plugin(catalog.OpenTelemetry(endpoint=endpoint, headers=["a=b"]))
    await c.gather(c.map(inc, range(5)))
    plugin = a.plugins["catalog.otel"]
    await wait_for(lambda: plugin.status()["failed"] >= 1)
    status = plugin.status()
    assert status["options"]["headers"] == "****"
    text = generate_latest().decode()
    assert "dask_catalog_otel_spans_failed_total" in text
    assert "dask_catalog_otel_dropped_total" in text
    assert "dask_catalog_otel_queued" in text
    json.dumps(status)


# -- real processes --------------------------------------------------------------


@pytest.mark.slow
def test_dask_worker_command_line_exports(procs, receiver):
    from distributed import Client

    _, address = procs.scheduler(
        "--preload", "catalog", "--enable", "otel", "--otel-endpoint", receiver.endpoint
    )
    procs.worker(
        address,
        "--nthreads",
        "1",
        "--preload",
        "catalog",
        "--enable",
        "otel",
        "--otel-endpoint",
        receiver.endpoint,
        "--otel-service-name",
        "cli-test",
    )
    with Client(address) as client:
        keys = [f"cli-{i}" for i in range(5)]
        assert client.gather(client.map(by_value(inc), range(5), key=keys))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = [sp["name"] for sp in receiver.spans()]
        if names.count("cli") == 5 and ("waiting" in names or "queued" in names):
            break
        time.sleep(0.2)
    spans = receiver.spans()
    tasks = [sp for sp in spans if sp["name"] == "cli"]
    assert len(tasks) == 5
    assert {sp["resource"]["service.name"] for sp in tasks} == {"cli-test"}
    assert any(sp["name"] in ("waiting", "queued") for sp in spans)
