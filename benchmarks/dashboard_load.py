"""How fast the dashboard entry's data loads with many prefixes and workers.

    python benchmarks/dashboard_load.py --workers 100 --prefixes 200

One in-process LocalCluster (``--workers`` workers of 1 thread) with the
metrics, memory, watchdog, events and dashboard entries on; ``--prefixes``
task prefixes of 3 tasks each. After the workers' heartbeats carried their
summaries, it times :func:`catalog.dashboard.data` on the scheduler (the work of
one uncached request), and ``GET /catalog/data.json`` and ``GET /catalog`` over
HTTP, and prints medians of ``--repeats`` and the body sizes. Nothing here is a
pass/fail test.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request
from collections.abc import Callable
from typing import Any


def make_task(i: int) -> Callable[[int], int]:
    def task(x: int) -> int:
        return x + i

    return task


def timed_data(dask_scheduler: Any = None) -> list[float]:
    from catalog.dashboard import data

    out = []
    for _ in range(5):
        start = time.perf_counter()
        data(dask_scheduler)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--prefixes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import dask
    from distributed import Client, LocalCluster

    import catalog

    enable = ["metrics", "memory", "watchdog", "events", "dashboard"]
    config = {
        "distributed.scheduler.preload": ["catalog"],
        "distributed.worker.preload": ["catalog"],
        "catalog.enable": enable,
        "catalog.metrics.max-prefixes": args.prefixes + 10,
    }
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=False,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        futures = []
        for i in range(args.prefixes):
            futures += client.map(
                make_task(i), range(3), key=[f"prefix{i:03d}-{j}" for j in range(3)]
            )
        client.gather(futures)
        time.sleep(5)  # a few heartbeats: every worker's summary is there
        port = client.scheduler_info()["services"]["dashboard"]
        base = f"http://127.0.0.1:{port}/catalog"
        in_scheduler = []
        for _ in range(args.repeats):
            in_scheduler += client.run_on_scheduler(timed_data)
        http: dict[str, list[float]] = {"data.json": [], "page": []}
        sizes = {}
        for _ in range(args.repeats):
            time.sleep(2.1)  # past the 2 s cache: each data.json is built anew
            for name, url in (("data.json", f"{base}/data.json"), ("page", base)):
                start = time.perf_counter()
                with urllib.request.urlopen(url, timeout=60) as response:
                    body = response.read()
                http[name].append(time.perf_counter() - start)
                sizes[name] = len(body)
        print(
            f"catalog {catalog.__version__}: {args.workers} workers, "
            f"{args.prefixes} prefixes x 3 tasks"
        )
        print(
            f"data() on the scheduler: median "
            f"{statistics.median(in_scheduler) * 1e3:.1f} ms"
        )
        for name, times in http.items():
            print(
                f"GET {name}: median {statistics.median(times) * 1e3:.1f} ms, "
                f"{sizes[name]:,} bytes"
            )


if __name__ == "__main__":
    main()
