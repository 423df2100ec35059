"""What the soak and chaos tests share: a real cluster with every entry on, its
processes' footprint, and the files and metrics the entries leave behind.

Everything runs as a user types it: ``dask scheduler`` and ``dask worker``
processes with ``--preload catalog --enable ...`` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
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
