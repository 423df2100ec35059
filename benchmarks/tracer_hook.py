"""Cost of the tracer's transition hook, and memory per buffered event.

Run by hand:  python benchmarks/tracer_hook.py [--n 1000000]

The hook is called exactly as distributed calls it (``getattr(plugin,
"transition")(key, start, finish)`` on an installed plugin of a real in-process
worker), so the figures include the catalog's never-raise wrapper.
"""

from __future__ import annotations

import argparse
import sys
import time

from distributed import Client, LocalCluster

import catalog


def per_call(func, args, n: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` seconds per call of ``func(*args)`` over ``n`` calls."""
    loop = range(n)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()  # CPU time: not the time other processes took
        for _ in loop:
            func(*args)
        best = min(best, (time.thread_time() - t0) / n)
    return best


def empty(key, start, finish):
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="calls per timing")
    parser.add_argument("--tasks", type=int, default=5_000, help="tasks for memory")
    ns = parser.parse_args()

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
        client.register_plugin(catalog.Tracer(capacity=ns.n * 2))
        worker = next(iter(cluster.workers.values()))
        plugin = worker.plugins["catalog.tracer"]
        kept = client.submit(sum, [1, 2], key="kept-task")
        kept.result()
        baseline = per_call(empty, ("k", "ready", "executing"), ns.n)
        hook = getattr(plugin, "transition")  # noqa: B009 (as distributed does)
        plain = per_call(hook, ("inc-abc", "ready", "executing"), ns.n)
        plugin.snapshot(clear=True)
        # A finishing transition reads the real TaskState's startstops.
        finish = per_call(hook, ("kept-task", "executing", "memory"), ns.n // 10)
        errors = plugin.errors
        plugin.snapshot(clear=True)
        filtered = catalog.Tracer(states=["memory"])
        client.register_plugin(filtered)
        plugin = worker.plugins["catalog.tracer"]
        hook = getattr(plugin, "transition")  # noqa: B009
        skipped = per_call(hook, ("inc-abc", "ready", "executing"), ns.n)

        # Memory: a real workload, then the ring's traced allocations per event.
        client.register_plugin(catalog.Tracer(capacity=10 * ns.tasks))
        plugin = worker.plugins["catalog.tracer"]
        futures = client.map(lambda x: x + 1, range(ns.tasks), pure=False)
        client.gather(futures)
        del futures
        time.sleep(1)
        recorded = plugin.buffered
        ring_bytes = plugin.memory()
        deep = _ring_bytes(list(plugin._slots)) + sys.getsizeof(plugin._times)
        deep += sys.getsizeof(plugin._slots) - sys.getsizeof(list(plugin._slots))

    ns_ = 1e9
    print(f"python {sys.version.split()[0]}, {ns.n} calls per timing, best of 5")
    print(f"empty function call            {baseline * ns_:7.1f} ns")
    print(f"hook, plain transition         {plain * ns_:7.1f} ns")
    print(f"hook, finishing transition     {finish * ns_:7.1f} ns")
    print(f"hook, filtered out (states)    {skipped * ns_:7.1f} ns")
    print(f"hook errors (must be 0)        {errors}")
    print(f"{ns.tasks} tasks -> {recorded} events")
    print(f"ring, own account per event    {ring_bytes / recorded:7.1f} bytes")
    print(f"ring, deep size per event      {deep / recorded:7.1f} bytes")


def _ring_bytes(ring: list) -> int:
    """Bytes the ring's slots hold on to: pointers, keys, payloads and their floats.

    Counted independently of the entry's own ``memory()``: every object
    reachable from a slot once, except interned short strings (state names).
    """
    seen: set[int] = set()
    total = sys.getsizeof(ring)  # the flat list's pointer slots

    def add(obj) -> None:
        nonlocal total
        if id(obj) in seen or obj is None:
            return
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, tuple | list):
            for item in obj:
                add(item)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                add(k)
                add(v)

    for item in ring:
        if isinstance(item, str) and sys.intern(item) is item and len(item) < 16:
            continue  # state names: interned, shared with distributed
        add(item)
    return total


if __name__ == "__main__":
    main()
