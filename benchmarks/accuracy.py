"""Accuracy of what the catalog measures: trace durations and per-task peak memory.

Run by hand (not in CI):

    python benchmarks/accuracy.py

1. Trace durations: tasks that sleep a known time (50, 100, 200, 500 ms) on real
   worker processes with the tracer on; each compute span against its sleep.
2. Guard peaks: tasks that allocate a known size (50 to 400 MiB), written so it is
   resident, and hold it for 300 ms, one at a time on a one-thread worker with the
   memory guard on; the peak it attributes (catalog.memory.report) against the
   size allocated.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from distributed import Client, LocalCluster

import catalog
import catalog.memory
import catalog.tracer

SLEEPS_MS = (50, 100, 200, 500)
ALLOCATIONS_MIB = (50, 100, 200, 400)
REPEATS = 5


def sleep_for(ms: int, repeat: int) -> int:
    time.sleep(ms / 1000)
    return ms


def hold(mib: int, repeat: int) -> int:
    block = b"x" * (mib * 2**20)  # written, so every page is resident
    time.sleep(0.3)
    return len(block)


def cluster(threads: int) -> LocalCluster:
    return LocalCluster(
        n_workers=1,
        threads_per_worker=threads,
        processes=True,
        memory_limit="4GiB",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    )


def trace_accuracy() -> None:
    with cluster(2) as c, Client(c) as client, tempfile.TemporaryDirectory() as tmp:
        client.register_plugin(catalog.Tracer())
        futures = [
            client.submit(sleep_for, ms, r, key=f"sleep{ms}-{r}")
            for ms in SLEEPS_MS
            for r in range(REPEATS)
        ]
        client.gather(futures)
        summary = catalog.tracer.save(client, f"{tmp}/trace.json")
    print("Trace durations (compute spans against known sleeps)")
    print(f"{'sleep':>8} {'spans':>6} {'mean':>10} {'max error':>10}")
    for ms in SLEEPS_MS:
        stats = summary["prefixes"][f"sleep{ms}"]
        error = max(abs(stats["max"] * 1000 - ms), abs(stats["p50"] * 1000 - ms))
        print(
            f"{ms:>6}ms {stats['count']:>6} {stats['mean'] * 1000:>8.2f}ms "
            f"{error:>8.2f}ms"
        )


def peak_accuracy() -> None:
    with cluster(1) as c, Client(c) as client:
        client.register_plugin(catalog.MemoryGuard(interval="10ms"))
        for mib in ALLOCATIONS_MIB:
            for r in range(REPEATS):
                client.submit(hold, mib, r, key=f"alloc{mib}-{r}").result()
        report = catalog.memory.report(client)
    print("\nGuard peaks (attributed peak against known allocations)")
    print(
        f"{'allocated':>10} {'tasks':>6} {'mean peak':>10} "
        f"{'max peak':>10} {'error':>7}"
    )
    errors = []
    for mib in ALLOCATIONS_MIB:
        stats = report[f"alloc{mib}"]
        mean_mib = stats["mean"] / 2**20
        error = (mean_mib - mib) / mib
        errors.append(abs(error))
        print(
            f"{mib:>7}MiB {stats['count']:>6} {mean_mib:>7.1f}MiB "
            f"{stats['max'] / 2**20:>7.1f}MiB {error:>+6.1%}"
        )
    print(f"median absolute error: {statistics.median(errors):.1%}")


def main() -> None:
    trace_accuracy()
    peak_accuracy()


if __name__ == "__main__":
    main()
