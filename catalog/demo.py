"""`dask catalog demo`: every entry at work on an embedded local cluster."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import click
import dask
import dask.config
from dask.utils import format_bytes, key_split

from catalog._registry import demo_names

__all__ = ["DEMO_ENTRIES", "demo_config", "run_demo"]

#: The entries the demo turns on when none is chosen (declared in the registry).
DEMO_ENTRIES = demo_names()

#: The memory hog grows until the guard stops it; the guard's task limit is
#: well below the worker's memory limit, so the nanny never has to step in.
TASK_LIMIT = "200MiB"
WORKER_MEMORY = "1.5GiB"
SLOW_SECONDS = 2.5


def demo_config(output: str, enable: Sequence[str]) -> dict[str, Any]:
    """The dask config a user would write to turn the demo's entries on."""
    return {
        # The umbrella preload on every kind of server, entries chosen by config.
        "distributed.scheduler.preload": ["catalog"],
        "distributed.worker.preload": ["catalog"],
        "distributed.nanny.preload": ["catalog"],
        "catalog.enable": list(enable),
        "catalog.env.threads": "auto",
        "catalog.logging.file": os.path.join(output, "logs.jsonl"),
        "catalog.events.file": os.path.join(output, "events.jsonl"),
        "catalog.memory.task-limit": TASK_LIMIT,
        "catalog.watchdog.warn-after": "1s",
        "catalog.watchdog.interval": "250ms",
    }


# -- the workload: plain functions, pickled to the workers by reference ----------
# Plain Python and dask.bag only: the demo is the README's first command, run on
# a bare `pip install .`, which has no numpy (distributed does not need it).

#: The numbers whose Collatz stopping times the bag computes, and in how many parts.
COLLATZ_NUMBERS = 60_000
COLLATZ_PARTS = 12


def collatz_steps(n: int) -> int:
    """Steps for ``n`` to reach 1: a little pure-Python work per element."""
    steps = 0
    while n > 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def slow_step(i: int, seconds: float = SLOW_SECONDS) -> int:
    """Sleeps longer than the watchdog's warn-after."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return i


def memory_hog(step_mib: int = 20, steps: int = 100) -> int:
    """Grows by ``step_mib`` MiB per step, far past the guard's task limit."""
    held = []
    for _ in range(steps):
        held.append(b"x" * (step_mib * 2**20))  # written, so it is resident
        time.sleep(0.02)
    return sum(len(b) for b in held)


def failing_step(i: int) -> int:
    """Fails on purpose, so the error paths of every entry show."""
    raise ValueError(f"demo failure number {i}")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _metrics_text(client: Any, cluster: Any) -> str:
    info = client.scheduler_info()
    parts = []
    host = "127.0.0.1"
    scheduler_port = cluster.scheduler.http_server.port
    parts.append(f"# scheduler http://{host}:{scheduler_port}/metrics\n")
    parts.append(_scrape(f"http://{host}:{scheduler_port}/metrics"))
    for address, worker in sorted(info["workers"].items()):
        port = worker["services"]["dashboard"]
        parts.append(f"\n# worker {address} http://{host}:{port}/metrics\n")
        parts.append(_scrape(f"http://{host}:{port}/metrics"))
    return "".join(parts)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_rows(
    prefixes: dict[str, dict], peaks: dict[str, dict], errors: dict[str, int]
) -> list[list[str]]:
    """The per-prefix summary: tasks, mean and p95 duration, peak memory, errors."""
    rows = [["prefix", "tasks", "mean", "p95", "peak memory", "errors"]]
    for prefix in sorted(set(prefixes) | set(errors)):
        stats = prefixes.get(prefix, {})
        peak = peaks.get(prefix, {}).get("max")
        rows.append(
            [
                prefix,
                str(stats.get("count", 0)),
                f"{stats['mean'] * 1000:.1f} ms" if stats else "-",
                f"{stats['p95'] * 1000:.1f} ms" if stats else "-",
                format_bytes(peak) if peak else "-",
                str(errors.get(prefix, 0)),
            ]
        )
    return rows


def run_demo(
    output: str = "catalog-demo",
    workers: int = 2,
    enable: Sequence[str] = DEMO_ENTRIES,
    keep_alive: bool = False,
    echo: Any = click.echo,
) -> dict[str, Any]:
    """Start the cluster, run the workload, write the files, print the summary.

    Returns:
        ``{"paths": {name: path}, "summary": rows, "errors": {prefix: n}}``.
    """
    import dask.bag as db
    from distributed import Client, LocalCluster, progress, wait

    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    for name in ("logs.jsonl", "events.jsonl"):
        path = os.path.join(output, name)
        if os.path.exists(path):
            os.remove(path)
    paths = {
        "trace": os.path.join(output, "trace.json"),
        "events": os.path.join(output, "events.jsonl"),
        "logs": os.path.join(output, "logs.jsonl"),
        "metrics": os.path.join(output, "metrics.txt"),
    }
    echo(
        f"Starting a local cluster of {workers} worker processes "
        f"with: {', '.join(enable)}"
    )
    # The config stays set while the cluster lives: a worker process that its
    # nanny restarts reads it again.
    config = dask.config.set(demo_config(output, enable))
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=2,
        processes=True,
        memory_limit=WORKER_MEMORY,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    )
    client = Client(cluster)
    try:
        echo(f"Dashboard: {cluster.dashboard_link}")
        steps = db.range(COLLATZ_NUMBERS, npartitions=COLLATZ_PARTS).map(collatz_steps)
        reduction = steps.max()
        succeeding = [
            client.compute(reduction),
            *client.map(slow_step, range(3), pure=False),
        ]
        failing = [client.submit(failing_step, 1, pure=False)]
        if "memory" in enable:
            # Without the guard the hog would only get its worker restarted.
            failing.append(client.submit(memory_hog, pure=False))
        # distributed's bar stops at the first error: show it for the tasks that
        # succeed, then wait for the two that fail on purpose.
        progress(succeeding)
        wait(failing)
        futures = succeeding + failing
        echo("")
        errors: dict[str, int] = {}
        for future in futures:
            if future.status == "error":
                prefix = key_split(future.key)
                errors[prefix] = errors.get(prefix, 0) + 1
                exc = future.exception()
                echo(f"  {prefix}: {type(exc).__name__}: {exc}")
        prefixes: dict[str, dict] = {}
        peaks: dict[str, dict] = {}
        if "tracer" in enable:
            from catalog.tracer import save

            prefixes = save(client, paths["trace"])["prefixes"]
        if "memory" in enable:
            from catalog.memory import report

            peaks = report(client)
        if "metrics" in enable:
            with open(paths["metrics"], "w") as f:
                f.write(_metrics_text(client, cluster))
        rows = summary_rows(prefixes, peaks, errors)
        echo(_table(rows))
        if keep_alive:
            _keep_alive(client, cluster, echo)
    finally:
        client.close()
        cluster.close()
        config.__exit__(None, None, None)
    echo("")
    shown = {k: v for k, v in paths.items() if os.path.exists(v)}
    how = {
        "trace": "open in https://ui.perfetto.dev or chrome://tracing",
        "events": "one JSON object per line: jq . events.jsonl",
        "logs": "one JSON object per line from every server and task",
        "metrics": "a scrape of the scheduler's and every worker's /metrics",
    }
    for name, path in shown.items():
        echo(f"{name:<8} {path}  ({how[name]})")
    return {"paths": shown, "summary": rows, "errors": errors}


def _keep_alive(client: Any, cluster: Any, echo: Any) -> None:
    # Ctrl-C may come as soon as the last line is out, so the lines are printed
    # inside the try: a KeyboardInterrupt anywhere here stops the demo cleanly.
    try:
        info = client.scheduler_info()
        echo(f"\nDashboard:          {cluster.dashboard_link}")
        port = cluster.scheduler.http_server.port
        echo(f"Scheduler /metrics: http://127.0.0.1:{port}/metrics")
        for address, worker in sorted(info["workers"].items()):
            port = worker["services"]["dashboard"]
            echo(f"Worker /metrics:    http://127.0.0.1:{port}/metrics  ({address})")
        echo("The cluster stays up until Ctrl-C.")
        sys.stdout.flush()  # shown at once even when stdout is a pipe
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        echo("Stopping.")
