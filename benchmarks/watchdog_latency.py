"""Watchdog benchmark: detection latency against ``interval``, throughput against bare.

Run by hand (not in CI)::

    python benchmarks/watchdog_latency.py [--tasks 4000] [--repeats 5]

Latency: a pure-Python task spins until TaskTimeoutError lands and returns how long it
ran; latency is that minus ``fail-after``. Throughput: many short tasks on one worker
with and without the watchdog (fail-after set, so every task is tracked), alternating
runs, best of ``--repeats``; the target ratio is >= 0.98.
"""

from __future__ import annotations

import argparse
import statistics
import time

from distributed import Client, LocalCluster

import catalog
from catalog.watchdog import TaskTimeoutError

FAIL_AFTER = 0.2


def spin_until_interrupted(limit: float = 30.0) -> float:
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < limit:
            pass
    except TaskTimeoutError:
        pass
    return time.perf_counter() - start


def short_task(i: int) -> int:
    end = time.perf_counter() + 0.001
    while time.perf_counter() < end:
        pass
    return i


def latency(client: Client, interval: float, samples: int) -> list[float]:
    client.register_plugin(
        catalog.Watchdog(fail_after=FAIL_AFTER, warn_after=None, interval=interval)
    )
    out = []
    for _ in range(samples):
        ran = client.submit(spin_until_interrupted, pure=False).result()
        out.append(ran - FAIL_AFTER)
    client.unregister_worker_plugin("catalog.watchdog")
    return out


def throughput(client: Client, tasks: int) -> float:
    start = time.perf_counter()
    client.gather(client.map(short_task, range(tasks), pure=False))
    return tasks / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        print(f"detection latency (fail-after {FAIL_AFTER}s), seconds after fail-after")
        print(f"{'interval':>10} {'median':>8} {'max':>8}")
        for interval in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
            lat = latency(client, interval, args.samples)
            print(f"{interval:>10} {statistics.median(lat):>8.3f} {max(lat):>8.3f}")

        throughput(client, args.tasks // 4)  # warm up
        bare, watched = [], []
        for _ in range(args.repeats):
            bare.append(throughput(client, args.tasks))
            client.register_plugin(
                catalog.Watchdog(fail_after="1h", warn_after="5m", interval="1s")
            )
            watched.append(throughput(client, args.tasks))
            client.unregister_worker_plugin("catalog.watchdog")
        ratio = max(watched) / max(bare)
        print(f"throughput bare    {max(bare):8.0f} tasks/s (best of {args.repeats})")
        print(
            f"throughput watched {max(watched):8.0f} tasks/s (best of {args.repeats})"
        )
        print(f"ratio {ratio:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
