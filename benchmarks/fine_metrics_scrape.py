"""Scrape cost of the fine performance metrics on the scheduler, with and without.

Run by hand (not in CI)::

    python benchmarks/fine_metrics_scrape.py --prefixes 200 --spans 20 --repeats 15

One LocalCluster (the scheduler in this process, ``--workers`` worker processes)
with ``catalog.SchedulerMetrics`` on. ``--prefixes`` distinct task prefixes run
spread over ``--spans`` spans, and every worker's metrics reach the scheduler.
Each repeat then times ``--scrapes`` scrapes with the fine-metrics collector
attached and as many without it (the same scheduler, the same state: the
collector is detached and attached again), in alternating order; the medians of
the per-repeat medians are reported, for the catalog's scheduler families alone
and for the whole registry the scheduler's dashboard ``/metrics`` serves
(distributed's own families too). Times are CPU seconds of the scraping thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from distributed import Client, LocalCluster, span
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import catalog
from catalog import _prom


def inc(x: int) -> int:
    return x + 1


async def heartbeat(dask_worker) -> None:
    await dask_worker.heartbeat()


def scrape_once(registry: CollectorRegistry) -> tuple[float, int]:
    start = time.thread_time()
    size = len(generate_latest(registry))
    return time.thread_time() - start, size


def median_scrape(registry: CollectorRegistry, scrapes: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(scrapes):
        elapsed, size = scrape_once(registry)
        times.append(elapsed)
    return statistics.median(times), size


def fill(client: Client, prefixes: int, spans: int) -> None:
    """Tasks of ``prefixes`` prefixes, spread evenly over ``spans`` spans."""
    futures = []
    for i in range(prefixes):
        with span(f"job-{i % spans:02d}"):
            futures += [
                client.submit(inc, j, key=f"prefix{i:03d}-{j}", pure=False)
                for j in range(3)
            ]
    client.gather(futures)
    # Every worker's metrics so far reach the scheduler with its next heartbeat.
    client.run(heartbeat)


def measure(client: Client, args: argparse.Namespace) -> dict:
    scheduler = client.cluster.scheduler
    plugin = scheduler.plugins[catalog.SchedulerMetrics.name]
    fine = plugin._fine
    assert fine is not None, "fine-metrics is off"
    catalog_only = CollectorRegistry(auto_describe=False)
    catalog_only.register(_prom.ProcessCollector(only=scheduler))
    out: dict = {}
    for label, registry in (("catalog", catalog_only), ("dashboard", REGISTRY)):
        with_fine, without, added = [], [], []
        sizes = {}
        median_scrape(registry, 3)  # warm up
        for i in range(args.repeats):
            order = (True, False) if i % 2 == 0 else (False, True)
            result = {}
            for on in order:
                if not on:
                    _prom.remove_collector(scheduler, fine)
                result[on] = median_scrape(registry, args.scrapes)
                if not on:
                    _prom.add_collector(scheduler, fine)
            with_fine.append(result[True][0])
            without.append(result[False][0])
            added.append(result[True][0] - result[False][0])
            sizes = {on: size for on, (_, size) in result.items()}
        out[label] = {
            "with_fine_ms_median": round(statistics.median(with_fine) * 1e3, 3),
            "without_fine_ms_median": round(statistics.median(without) * 1e3, 3),
            "added_ms_median": round(statistics.median(added) * 1e3, 3),
            "ratio_median": round(
                statistics.median(
                    w / o for w, o in zip(with_fine, without, strict=True)
                ),
                3,
            ),
            "with_fine_bytes": sizes[True],
            "without_fine_bytes": sizes[False],
        }
    text = generate_latest(catalog_only).decode()
    out["fine_series"] = sum(
        1
        for line in text.splitlines()
        if line.startswith("dask_catalog_fine_") and not line.startswith("#")
    )
    out["cumulative_worker_metrics_keys"] = len(scheduler.cumulative_worker_metrics)
    out["spans_on_scheduler"] = len(scheduler.extensions["spans"].spans)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=200)
    parser.add_argument("--spans", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(catalog.SchedulerMetrics())
        fill(client, args.prefixes, args.spans)
        result = {
            "prefixes": args.prefixes,
            "spans": args.spans,
            "repeats": args.repeats,
            "scrapes_per_repeat": args.scrapes,
            **measure(client, args),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
