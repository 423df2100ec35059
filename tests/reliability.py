"""What the soak and chaos tests share: a real cluster with every entry on, its
processes' footprint, and the files and metrics the entries leave behind.

Everything runs as a user types it: ``dask scheduler`` and ``dask worker``
processes with ``--preload catalog --enable ...`` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from catalog._registry import builtin_names
from tests.procs import LOOPBACK, Proc, Procs

#: Every built-in entry, on every server: the catalog as an operator would leave
#: it on. Derived from the registry, so a new entry is soaked and chaos-tested
#: the day it is added.
ALL = ",".join(builtin_names())


@dataclass
class Cluster:
    """A scheduler and workers started with every entry enabled."""

    scheduler: Proc
    address: str
    workers: list[Proc]
    trace_dir: Path
    events_file: Path


def start_cluster(
    procs: Procs,
    tmp_path: Path,
    n_workers: int,
    *catalog_args: str,
    worker_args: tuple[str, ...] = (),
    scheduler_env: dict[str, str] | None = None,
    bare: bool = False,
) -> Cluster:
    """``dask scheduler`` and ``n_workers`` ``dask worker`` (with nannies), all
    entries on, the tracer streaming to ``tmp_path/trace``, events to a file.

    ``catalog_args`` (entry options) go to every server, ``worker_args`` to the
    workers only. ``bare`` starts the same shape with no catalog at all (the
    baseline a measurement is compared with; ``catalog_args`` are ignored).
    """
    trace_dir = tmp_path / "trace"
    events_file = tmp_path / "events.jsonl"
    common: tuple[str, ...] = (
        *("--preload", "catalog", "--enable", ALL, "--tracer-dir", str(trace_dir)),
        *catalog_args,
    )
    scheduler_args: tuple[str, ...] = (*common, "--events-file", str(events_file))
    if bare:
        common = scheduler_args = ()
    scheduler, address = procs.scheduler(*scheduler_args, env=scheduler_env)
    workers = [
        procs.worker(address, *common, *worker_args, "--name", f"w{i}")
        for i in range(n_workers)
    ]
    return Cluster(scheduler, address, workers, trace_dir, events_file)


class OtlpSink:
    """An OTLP/HTTP receiver on loopback that accepts and counts, so the otel
    entry exports for real (a down collector would only count failures)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests += 1
                sink.bytes += len(body)
                # An empty ExportTraceServiceResponse is zero bytes of protobuf.
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def footprint(pid: int) -> dict[str, int]:
    """RSS (bytes), open file descriptors and threads of one process."""
    proc = psutil.Process(pid)
    with proc.oneshot():
        return {
            "rss": proc.memory_info().rss,
            "fds": proc.num_fds(),
            "threads": proc.num_threads(),
        }


def own_resources(dask_worker: Any = None, dask_scheduler: Any = None) -> dict:
    """Run on a server: the catalog's threads, files and listening ports there."""
    import threading

    import psutil

    proc = psutil.Process()
    return {
        "threads": sorted(
            t.name for t in threading.enumerate() if t.name.startswith("catalog")
        ),
        "files": sorted(f.path for f in proc.open_files()),
        "listening": sorted(
            c.laddr.port
            for c in proc.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ),
    }


def entry_plugins(dask_worker: Any = None, dask_scheduler: Any = None) -> list:
    """Run on a server (or a nanny): the catalog plugins installed there."""
    server = dask_worker if dask_worker is not None else dask_scheduler
    return sorted(
        str(name)
        for name, plugin in server.plugins.items()
        if type(plugin).__module__.startswith("catalog")
    )


def installed_entries(client: Any) -> set[str]:
    """The entries with a plugin on the scheduler, a worker or a nanny."""
    from tests.procs import by_value

    names = set(client.run_on_scheduler(by_value(entry_plugins)))
    for found in (
        *client.run(by_value(entry_plugins)).values(),
        *client.run(by_value(entry_plugins), nanny=True).values(),
    ):
        names.update(found)
    return {n.removeprefix("catalog.") for n in names}


def read_json_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed: a line that does not parse fails."""
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            assert line.endswith("\n"), f"{path}:{number}: torn line {line!r}"
            out.append(json.loads(line))
    return out


def trace_files(trace_dir: Path) -> Iterator[tuple[dict, list[dict]]]:
    """(header, events) of every ``<server-id>.jsonl`` of the tracer's dir form."""
    for path in sorted(trace_dir.glob("*.jsonl")):
        header, *events = read_json_lines(path)
        assert header["type"] == "process", (path, header)
        yield header, events


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """``/metrics`` of a server's dashboard on loopback, as {(name, labels): value}."""
    url = f"http://{LOOPBACK}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str):
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def file_size(path: Path) -> int:
    return os.path.getsize(path) if path.exists() else 0


def collected(families: Any, name: str, label: str) -> dict[str, float]:
    """``{label value: sample value}`` of the samples ``name`` that a server's
    catalog families (``catalog._prom.Families``) yield at scrape time."""
    return {
        sample.labels[label]: sample.value
        for metric in families.collect()
        for sample in metric.samples
        if sample.name == name
    }


def catalog_sizes(dask_worker: Any = None, dask_scheduler: Any = None) -> dict:
    """Run on a server: the length of every container the catalog's plugins hold
    there, as ``{"<plugin>.<attribute>[.<attribute>]": len}``.

    Containers of the plugins themselves and of the catalog objects they hold
    (one level down: the tracer's file, the metrics' fine-metrics collector, the
    otel pipeline...). A structure kept per key that is never freed shows up
    here as a length that keeps growing once the bounded ones are full. The
    server's own containers that a plugin holds a reference to (its tasks, its
    workers) are distributed's, not the catalog's, and are left out.
    """
    server = dask_worker if dask_worker is not None else dask_scheduler
    owned = {id(v) for v in vars(server).values()}
    state = getattr(server, "state", None)
    if state is not None and hasattr(state, "__dict__"):
        owned.update(id(v) for v in vars(state).values())
    sizes: dict[str, int] = {}

    def walk(prefix: str, obj: Any, depth: int) -> None:
        for name, value in list(vars(obj).items()):
            if isinstance(value, str | bytes) or id(value) in owned:
                continue
            try:
                sizes[f"{prefix}.{name}"] = len(value)
            except TypeError:
                if (
                    depth
                    and hasattr(value, "__dict__")
                    and type(value).__module__.startswith("catalog")
                ):
                    walk(f"{prefix}.{name}", value, depth - 1)
            except Exception:  # a container that cannot say its length now
                continue

    for name, plugin in list(server.plugins.items()):
        if type(plugin).__module__.startswith("catalog"):
            walk(str(name), plugin, 1)
    return sizes


def grown(samples: list[dict[str, int]], floor: int) -> dict[str, tuple[int, int]]:
    """The structures whose length at the last sample is above both twice their
    largest length over the first half of the samples and ``floor``.

    ``floor`` is what a structure may legitimately hold at any moment (a batch
    of tasks in flight, a queue's cap): a per-key leak over the second half of
    a soak grows past it, a bounded buffer that was full at the middle does not.
    Returns ``{name: (largest in the first half, last)}``.
    """
    first = samples[: len(samples) // 2 + 1]
    out = {}
    for name, last in samples[-1].items():
        before = max((s.get(name, 0) for s in first), default=0)
        if last > max(2 * before, floor):
            out[name] = (before, last)
    return out
