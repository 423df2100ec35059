"""Whole system: a bare cluster against one with every catalog entry on, as run.

Run by hand (never as a timed test; this machine is shared and noisy)::

    python benchmarks/system.py --repeats 7 --tasks 10000
    python benchmarks/system.py --python /work/wt/hot-sched/.venv/bin/python
    python benchmarks/system.py --short      # CI: shows that it runs, nothing more

Two clusters run side by side for the whole benchmark, each a real ``dask
scheduler`` and ``--workers`` real ``dask worker --nanny`` processes started by
``--python``'s ``dask`` (so the same script measures any checkout's install):

- *bare*: no preload;
- *catalog*: ``--preload catalog --enable`` every built-in entry, on the
  scheduler and the workers, with files in a temporary directory; ``recycle``
  with ``--recycle-max-tasks`` far above the run (it never fires); ``otel``
  exporting to a loopback OTLP/HTTP receiver in this process that answers 200 to
  every POST (so the exporter does its full work: encode, send, get a reply).

Each repeat runs the graph on both clusters, in an order that alternates between
repeats, so slow drifts of the machine hit both alike. Per run: wall-clock
throughput, and CPU time (user + system, from psutil) of the scheduler process
and of every worker process (the nannies' children), before and after. The
table prints medians over the repeats of the catalog/bare ratios of the same
repeat. Two graphs: ``--tasks`` independent tiny tasks (a map) and a binary
reduction tree of about ``--tasks`` tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


def inc(x: int) -> int:
    return x + 1


def independent(client: Any, n: int) -> int:
    """A map of ``n`` tiny tasks; returns the task count."""
    futures = client.map(inc, range(n), pure=False)
    client.gather(futures)
    del futures
    return n


def tree(client: Any, n: int) -> int:
    """A binary reduction tree of about ``n`` tasks; returns the task count."""
    token = time.monotonic_ns()  # fresh keys every run: nothing is cached
    leaves = max(2, n // 2)
    graph: dict[Any, Any] = {(f"leaf-{token}", i): (inc, i) for i in range(leaves)}
    level, names = 0, [(f"leaf-{token}", i) for i in range(leaves)]
    while len(names) > 1:
        level += 1
        nxt = []
        for j in range(0, len(names), 2):
            key = (f"add{level}-{token}", j // 2)
            pair = names[j : j + 2]
            graph[key] = (sum, list(pair))
            nxt.append(key)
        names = nxt
    client.get(graph, names[0], sync=True)
    return len(graph)


GRAPHS: dict[str, Callable[[Any, int], int]] = {"map": independent, "tree": tree}


class _Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that reads each export and answers 200 (empty body)."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per export would flood the benchmark's output


@contextlib.contextmanager
def otlp_receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def catalog_argv(python: str, tmp: Path, endpoint: str) -> list[str]:
    """``--preload catalog --enable <every entry>`` and the options they need here."""
    names = subprocess.run(
        [
            python,
            "-c",
            "from catalog import _registry; print(','.join(_registry.builtin_names()))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    options = {
        "enable": names,
        "events-file": tmp / "events.jsonl",
        "tracer-dir": tmp / "traces",
        "logging-file": tmp / "logs.jsonl",
        # Far above any run: the recycler watches, but never retires a worker.
        "recycle-max-tasks": 1_000_000_000,
        "otel-endpoint": endpoint,
    }
    return [
        "--preload",
        "catalog",
        *(a for k, v in options.items() for a in (f"--{k}", str(v))),
    ]


@dataclass
class Cluster:
    """One ``dask scheduler`` and its ``dask worker --nanny`` processes."""

    name: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    address: str
    logs: list[Any] = field(default_factory=list)

    def worker_processes(self) -> list[psutil.Process]:
        found = []
        for nanny in self.workers:
            found.extend(psutil.Process(nanny.pid).children(recursive=True))
        return found

    def cpu(self) -> tuple[float, float]:
        """CPU seconds (user + system) of the scheduler and of all workers."""
        t = psutil.Process(self.scheduler.pid).cpu_times()
        worker = 0.0
        for proc in self.worker_processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                w = proc.cpu_times()
                worker += w.user + w.system
        return t.user + t.system, worker

    def stop(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            proc.terminate()
        for proc in [*self.workers, self.scheduler]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()


def start(name: str, python: str, tmp: Path, workers: int, extra: list[str]) -> Cluster:
    dask = [python, "-m", "dask"]
    tmp.mkdir(parents=True, exist_ok=True)
    sched_file = tmp / "scheduler.json"
    log = open(tmp / "scheduler.log", "wb")
    scheduler = subprocess.Popen(
        [
            *dask,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(sched_file),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not sched_file.exists():
        if scheduler.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{name}: the scheduler did not start; see {tmp}/scheduler.log")
        time.sleep(0.2)
    address = json.loads(sched_file.read_text())["address"]
    logs = [log]
    procs = []
    for i in range(workers):
        wlog = open(tmp / f"worker-{i}.log", "wb")
        logs.append(wlog)
        procs.append(
            subprocess.Popen(
                [
                    *dask,
                    "worker",
                    address,
                    "--nanny",
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    "--name",
                    f"{name}-{i}",
                    "--local-directory",
                    str(tmp / f"w{i}"),
                    *extra,
                ],
                stdout=wlog,
                stderr=subprocess.STDOUT,
            )
        )
    return Cluster(name, scheduler, procs, address, logs)


def wait_for_workers(cluster: Cluster, client: Any, n: int) -> None:
    """Wait for ``n`` workers; stop early when one of them has exited (bad argv)."""
    deadline = time.monotonic() + 180
    while len(client.scheduler_info(n_workers=-1)["workers"]) < n:
        exited = [p.args for p in cluster.workers if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            msg = f"{cluster.name}: workers did not start ({exited or 'timeout'})"
            raise RuntimeError(msg)
        time.sleep(0.2)


def plugins_of(client: Any) -> tuple[list[str], list[str]]:
    """The plugin names on the scheduler and on one worker (what is really on)."""
    sched = client.run_on_scheduler(
        lambda dask_scheduler: sorted(dask_scheduler.plugins)
    )
    worker = next(
        iter(client.run(lambda dask_worker: sorted(dask_worker.plugins)).values())
    )
    return sched, worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter whose dask and catalog run the clusters "
        "(e.g. another worktree's .venv/bin/python)",
    )
    parser.add_argument("--short", action="store_true", help="CI: 1 repeat, 300 tasks")
    args = parser.parse_args()
    if args.short:
        args.repeats, args.tasks = 1, 300

    from distributed import Client

    tmp = Path(tempfile.mkdtemp(prefix="catalog-system-"))
    clusters: dict[str, Cluster] = {}
    clients: dict[str, Any] = {}
    try:
        with otlp_receiver() as endpoint:
            extra = {"bare": [], "catalog": catalog_argv(args.python, tmp, endpoint)}
            for name in ("bare", "catalog"):
                clusters[name] = start(
                    name, args.python, tmp / name, args.workers, extra[name]
                )
            for name, cluster in clusters.items():
                clients[name] = Client(cluster.address, timeout="120s")
                wait_for_workers(cluster, clients[name], args.workers)
            sched, worker = plugins_of(clients["catalog"])
            print(f"python: {args.python}")
            print(f"catalog argv: {' '.join(extra['catalog'])}")
            print(f"scheduler plugins: {', '.join(sched)}")
            print(f"worker plugins: {', '.join(worker)}")
            print(f"load: {os.getloadavg()}")
            results: dict[tuple[str, str], list[dict[str, float]]] = {}
            for graph, run in GRAPHS.items():
                for client in clients.values():
                    run(client, min(args.tasks, 1000))  # warm up
                for repeat in range(args.repeats):
                    order = ["bare", "catalog"]
                    if repeat % 2:
                        order.reverse()
                    for name in order:
                        cluster, client = clusters[name], clients[name]
                        s0, w0 = cluster.cpu()
                        t0 = time.perf_counter()
                        count = run(client, args.tasks)
                        wall = time.perf_counter() - t0
                        s1, w1 = cluster.cpu()
                        results.setdefault((graph, name), []).append(
                            {
                                "rate": count / wall,
                                "sched_us": (s1 - s0) / count * 1e6,
                                "worker_us": (w1 - w0) / count * 1e6,
                            }
                        )
            report(results, args.repeats)
    except BaseException:
        # Show why: the servers' own output is the only record of a failed start.
        for log in sorted(tmp.glob("*/*.log")):
            print(f"--- {log}", *log.read_text().splitlines()[-15:], sep="\n")
        raise
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.close()
        for cluster in clusters.values():
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def report(
    results: dict[tuple[str, str], list[dict[str, float]]], repeats: int
) -> None:
    med = statistics.median
    print(
        f"\n{'graph':<5} {'cluster':<8} {'tasks/s':>8} {'sched us/task':>14} "
        f"{'worker us/task':>15}   (medians of {repeats})"
    )
    for (graph, name), runs in results.items():
        print(
            f"{graph:<5} {name:<8} {med(r['rate'] for r in runs):>8.0f} "
            f"{med(r['sched_us'] for r in runs):>14.0f} "
            f"{med(r['worker_us'] for r in runs):>15.0f}"
        )
    print(
        f"\n{'graph':<5} {'throughput':>11} {'sched CPU':>10} {'worker CPU':>11}"
        "   catalog/bare, median of the per-repeat ratios"
    )
    for graph in GRAPHS:
        bare, cat = results[(graph, "bare")], results[(graph, "catalog")]

        def ratio(field_: str, cat: Any = cat, bare: Any = bare) -> float:
            return med(c[field_] / b[field_] for c, b in zip(cat, bare, strict=True))

        print(
            f"{graph:<5} {ratio('rate'):>11.3f} {ratio('sched_us'):>10.3f} "
            f"{ratio('worker_us'):>11.3f}"
        )


if __name__ == "__main__":
    main()
