"""Cost of the memory guard's transition hook: one RSS reading at start and at end.

Run by hand:  python benchmarks/memory_hook.py [--n 50000] [--repeats 7]

A task's start (``ready -> executing``) and end (``executing -> memory``) are
called exactly as distributed calls them (``getattr(plugin, "transition")`` on
the guard installed on a real in-process worker), so the figures include the
catalog's never-raise wrapper. Printed: the median over interleaved repeats of
the cost of one start + end pair, of one ``psutil.Process().memory_info()`` call
(the reading each half takes), and of an empty function called the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil
from distributed import Client, LocalCluster

import catalog

KEYS = 1000


def per_pair(hook, keys: list[str], n: int) -> float:
    """Seconds per start + end pair of ``hook`` over ``n`` pairs."""
    t0 = time.perf_counter()
    for i in range(n):
        key = keys[i % KEYS]
        hook(key, "ready", "executing")
        hook(key, "executing", "memory")
    return (time.perf_counter() - t0) / n


def per_call(func, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        func()
    return (time.perf_counter() - t0) / n


def empty(key, start, finish):
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000, help="pairs per timing")
    parser.add_argument("--repeats", type=int, default=7)
    ns = parser.parse_args()
    keys = [f"inc-{i}" for i in range(KEYS)]
    process = psutil.Process()
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            host="127.0.0.1",
            protocol="tcp",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        # A long interval: the sampler stays out of the way of the timing.
        client.register_plugin(catalog.MemoryGuard(interval="1h"))
        worker = next(iter(cluster.workers.values()))
        plugin = worker.plugins["catalog.memory"]
        hook = getattr(plugin, "transition")  # noqa: B009
        reader = getattr(getattr(plugin, "_state", None), "rss", None)
        pairs, reads, fast, empties = [], [], [], []
        for _ in range(ns.repeats):  # interleaved, so noise hits all alike
            pairs.append(per_pair(hook, keys, ns.n))
            reads.append(per_call(process.memory_info, ns.n))
            if reader is not None:
                fast.append(per_call(reader, ns.n))
            empties.append(per_pair(empty, keys, ns.n))
    pair, read, base = map(statistics.median, (pairs, reads, empties))
    print(f"start + end pair of the guard's hook: {pair * 1e6:.2f} us")
    print(f"one memory_info() call:               {read * 1e6:.2f} us")
    if fast:
        quick = statistics.median(fast)
        print(f"one RssReader() call (the hook's):    {quick * 1e6:.2f} us")
    print(f"empty hook, called the same way:      {base * 1e6:.2f} us")
    print(f"hook pair over empty pair:            {(pair - base) * 1e6:.2f} us")


if __name__ == "__main__":
    main()
