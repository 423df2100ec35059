"""Overhead of catalog.metrics: task throughput with and without it, and scrape time.

Run by hand (not in CI)::

    python benchmarks/metrics_scrape.py --tasks 2000 --repeats 9 --prefixes 200

Throughput: one in-process cluster; each repeat runs the same batch of tiny tasks
bare and with the entry on (both halves), in alternating order, and the ratio
(with / bare) of each pair is taken; the median ratio is reported (target >= 0.97).
Scrape: a worker that has seen ``--prefixes`` distinct prefixes, timed through the
registry the worker's /metrics serves (median of ``--scrapes`` scrapes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

from distributed import Client, LocalCluster
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import catalog
from catalog import _prom


def inc(x: int) -> int:
    return x + 1


def run_batch(client: Client, tasks: int) -> float:
    """Tasks per second of one batch of independent tiny tasks."""
    start = time.perf_counter()
    futures = client.map(inc, range(tasks), pure=False)
    client.gather(futures)
    elapsed = time.perf_counter() - start
    del futures
    return tasks / elapsed


def set_metrics(client: Client, on: bool) -> None:
    if on:
        client.register_plugin(catalog.SchedulerMetrics())
        client.register_plugin(catalog.Metrics())
    else:
        client.unregister_worker_plugin(catalog.Metrics.name)
        client.unregister_scheduler_plugin(catalog.SchedulerMetrics.name)


def throughput(client: Client, tasks: int, repeats: int) -> dict:
    run_batch(client, tasks)  # warm up imports, pools and caches
    bare, metrics, ratios = [], [], []
    for i in range(repeats):
        # Alternate which side goes first, so drift favours neither.
        order = (False, True) if i % 2 == 0 else (True, False)
        rates = {}
        for on in order:
            if on:
                set_metrics(client, True)
            rates[on] = run_batch(client, tasks)
            if on:
                set_metrics(client, False)
        bare.append(rates[False])
        metrics.append(rates[True])
        ratios.append(rates[True] / rates[False])
    return {
        "tasks_per_batch": tasks,
        "repeats": repeats,
        "bare_tasks_per_s_median": round(statistics.median(bare), 1),
        "metrics_tasks_per_s_median": round(statistics.median(metrics), 1),
        "ratio_median": round(statistics.median(ratios), 4),
        "ratios": [round(r, 4) for r in ratios],
    }


def timed(registry: CollectorRegistry, scrapes: int) -> tuple[float, int]:
    """Median seconds (CPU time of this thread) and bytes of one scrape."""
    times, size = [], 0
    for _ in range(scrapes):
        start = time.thread_time()
        size = len(generate_latest(registry))
        times.append(time.thread_time() - start)
    return statistics.median(times), size


def by_family(registry: CollectorRegistry) -> dict[str, int]:
    """Bytes of each family's lines in one scrape (largest first)."""
    sizes: dict[str, int] = {}
    family = ""
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# HELP "):
            family = line.split()[2]
        sizes[family] = sizes.get(family, 0) + len(line) + 1
    return dict(sorted(sizes.items(), key=lambda item: -item[1]))


def scrape(client: Client, prefixes: int, scrapes: int) -> dict:
    """Worker and scheduler /metrics, bare and with every entry's families."""
    cluster = client.cluster
    worker = next(iter(cluster.workers.values()))
    scheduler = cluster.scheduler
    set_metrics(client, True)
    for plugin in (catalog.MemoryGuard(), catalog.Tracer(), catalog.Watchdog()):
        client.register_plugin(plugin)
    client.register_plugin(catalog.SchedulerTracer())
    client.register_plugin(catalog.EventLog())
    futures = [
        client.submit(inc, j, key=f"prefix{i:03d}-{j}")
        for i in range(prefixes)
        for j in range(3)
    ]
    client.gather(futures)
    del futures

    plugin = worker.plugins[catalog.Metrics.name]
    keys = [f"synthetic-{i}" for i in range(20_000)]
    start = time.thread_time()
    for key in keys:  # the worker hook's cost per task: start and finish
        plugin.transition(key, "ready", "executing")
        plugin.transition(key, "executing", "memory")
    hot_path_us = (time.thread_time() - start) / len(keys) * 1e6
    out: dict = {"worker_hot_path_us_per_task": round(hot_path_us, 2)}
    for name, server in (("worker", worker), ("scheduler", scheduler)):
        only = CollectorRegistry(auto_describe=False)
        only.register(_prom.ProcessCollector(only=server))
        ours_s, ours_bytes = timed(only, scrapes)
        out[f"{name}_catalog_ms"] = round(ours_s * 1000, 2)
        out[f"{name}_catalog_bytes"] = ours_bytes
        out[f"{name}_bytes_by_family"] = by_family(only)
    # The scheduler's dashboard /metrics: distributed's own families plus the
    # catalog's of every server in this process; bare = that minus the latter.
    everything = CollectorRegistry(auto_describe=False)
    everything.register(_prom.ProcessCollector())
    _, catalog_bytes = timed(everything, 1)
    url = f"http://127.0.0.1:{scheduler.http_server.port}/metrics"
    dashboard = [len(urllib.request.urlopen(url, timeout=30).read()) for _ in range(3)]
    out["scheduler_dashboard_bytes"] = dashboard[-1]
    bare = out["scheduler_dashboard_bare_bytes"] = dashboard[-1] - catalog_bytes
    # This process also holds the worker: its families are on the same /metrics
    # here, not on a scheduler of its own. A scheduler process serves its bare
    # families plus the scheduler's catalog families.
    out["scheduler_own_process_vs_bare"] = round(
        (bare + out["scheduler_catalog_bytes"]) / bare, 2
    )
    full_s, full_bytes = timed(REGISTRY, scrapes)
    out["whole_process_registry_ms"] = round(full_s * 1000, 2)
    out["whole_process_registry_bytes"] = full_bytes
    out["prefixes"] = prefixes
    out["scrapes"] = scrapes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prefixes", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        result = {
            "throughput": throughput(client, args.tasks, args.repeats),
            "scrape": scrape(client, args.prefixes, args.scrapes),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
