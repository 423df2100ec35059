"""Memory guard benchmark: reaction (overshoot past a limit) and cost (throughput).

Reaction: a task grows at a steady rate (default 500 MiB/s) in a real worker
process; a thread here polls the worker's RSS every 2 ms. The overshoot is the
peak RSS minus the RSS the limit allows (the worker's RSS before the task plus
``task-limit``, or ``process-limit`` itself), as a share of the limit.
Target: under 10%.

Cost: many short tasks on a one-worker, two-thread cluster, with and without
the guard, alternating runs; the ratio is guarded throughput / bare throughput.
Target: >= 0.97.

Run by hand (not in CI)::

    python benchmarks/memory_reaction.py            # both
    python benchmarks/memory_reaction.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

MiB = 2**20
HOST = "127.0.0.1"


def grow_at(rate_mib_s: float, chunk_mib: int, total_mib: int) -> int:
    """Touch ``chunk_mib`` MiB at a time, paced to ``rate_mib_s``."""
    held = []
    start = time.perf_counter()
    for i in range(total_mib // chunk_mib):
        held.append(b"x" * (chunk_mib * MiB))
        due = start + (i + 1) * chunk_mib / rate_mib_s
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return len(held) * chunk_mib


def busy(i: int) -> int:
    """About a millisecond of pure-Python work."""
    return sum(range(20_000)) + i


def worker_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker_pid() -> int:
    import os

    return os.getpid()


class PeakWatcher(threading.Thread):
    """Polls one process's RSS and keeps the peak."""

    def __init__(self, pid: int, period: float = 0.002) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.period = period
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.period)


def cluster(threads: int, memory_limit: str):
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=1,
        threads_per_worker=threads,
        processes=True,
        memory_limit=memory_limit,
        host=HOST,
        dashboard_address=f"{HOST}:0",
    )


def reaction(mode: str, limit_mib: int, interval: str, rate: float, repeats: int):
    """Overshoots (fraction of the limit) of ``repeats`` runs."""
    from distributed import Client

    from catalog.memory import MemoryGuard, TaskMemoryLimitExceeded

    out = []
    with cluster(1, "8GiB") as c, Client(c) as client:
        if mode == "task-limit":
            guard = MemoryGuard(task_limit=f"{limit_mib}MiB", interval=interval)
        else:
            guard = MemoryGuard(process_limit=f"{limit_mib}MiB", interval=interval)
        client.register_plugin(guard)
        pid = client.submit(worker_pid, pure=False).result()
        for _ in range(repeats):
            time.sleep(0.3)
            (base,) = client.run(worker_rss).values()
            allowed = (
                base + limit_mib * MiB if mode == "task-limit" else limit_mib * MiB
            )
            watcher = PeakWatcher(pid)
            watcher.start()
            fut = client.submit(grow_at, rate, 5, 4 * limit_mib, pure=False)
            try:
                fut.result()
                failed = False
            except TaskMemoryLimitExceeded:
                failed = True
            time.sleep(0.1)
            watcher.done.set()
            watcher.join()
            del fut
            over = max(watcher.peak - allowed, 0)
            out.append((failed, over / (limit_mib * MiB), over))
    return out


def sampler_cpu() -> float:
    """CPU seconds the guard's sampler thread has used so far."""
    import threading

    import psutil

    (native,) = [
        t.native_id for t in threading.enumerate() if t.name == "catalog-memory"
    ]
    for t in psutil.Process().threads():
        if t.id == native:
            return t.user_time + t.system_time
    return 0.0


def throughput(guarded: bool, n: int) -> tuple[float, float]:
    """Tasks per second, and the sampler's CPU share of one core meanwhile."""
    from distributed import Client

    from catalog.memory import MemoryGuard

    with cluster(2, "4GiB") as c, Client(c) as client:
        if guarded:
            client.register_plugin(MemoryGuard(task_limit="1GiB"))
        client.gather(client.map(busy, range(200), pure=False))  # warm up
        cpu0 = sum(client.run(sampler_cpu).values()) if guarded else 0.0
        start = time.perf_counter()
        client.gather(client.map(busy, range(n), pure=False))
        elapsed = time.perf_counter() - start
        cpu1 = sum(client.run(sampler_cpu).values()) if guarded else 0.0
        return n / elapsed, (cpu1 - cpu0) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=float, default=500.0, help="MiB/s")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5

    print(f"reaction: a task growing at {args.rate:.0f} MiB/s (5 MiB chunks)")
    print(
        f"{'mode':<14}{'limit':>8}{'interval':>10}{'failed':>8}"
        f"{'overshoot median':>18}{'max':>8}"
    )
    for mode in ("task-limit", "process-limit"):
        for limit in (512, 1024):
            for interval in ("50ms", "20ms"):
                runs = reaction(mode, limit, interval, args.rate, repeats)
                shares = [share for _, share, _ in runs]
                print(
                    f"{mode:<14}{limit:>6}Mi{interval:>10}"
                    f"{sum(f for f, _, _ in runs):>5}/{len(runs):<2}"
                    f"{statistics.median(shares):>17.1%}{max(shares):>8.1%}"
                )

    n = 2_000 if args.quick else 5_000
    bare, guarded, cpu = [], [], []
    for _ in range(repeats):
        bare.append(throughput(False, n)[0])
        rate, share = throughput(True, n)
        guarded.append(rate)
        cpu.append(share)
    ratio = statistics.median(guarded) / statistics.median(bare)
    print(
        f"cost: {n} tasks of ~1 ms, 1 worker x 2 threads, {repeats} alternating runs: "
        f"bare {statistics.median(bare):.0f} tasks/s, guarded "
        f"{statistics.median(guarded):.0f} tasks/s, ratio {ratio:.3f}; "
        f"sampler thread CPU {statistics.median(cpu):.2%} of a core"
    )


if __name__ == "__main__":
    main()
