"""Cost of every catalog hook inside a real cluster, against distributed's own.

Run by hand (never as a timed test; the machine is shared and noisy)::

    python benchmarks/hook_costs.py --tasks 4000 --leaves 2000 --repeats 3

CI runs ``--short`` only to show that it still runs; nothing is asserted.

A LocalCluster of worker processes runs a map of tiny tasks and a reduction
tree with every catalog scheduler plugin (metrics, tracer, events) and every
worker plugin registered, plus a no-op plugin on each side. Each plugin's
``transition`` is wrapped, on its server, in a timer: the figures are the time
inside the hook as distributed calls it, minus the no-op plugin's (the timer and
the call itself). distributed's own ``WorkStealing`` is timed alongside on the
scheduler for scale. Per task = total time in the hook / tasks run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from array import array
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from overhead import inc, independent  # the map of tiny tasks, as measured there

#: What each side's no-op plugin is called.
NOOP = "bench.noop"


class NoOpScheduler(SchedulerPlugin):
    name = NOOP

    def transition(self, key: Any, start: str, finish: str, *args, **kwargs) -> None:
        return None


class NoOpWorker(WorkerPlugin):
    name = NOOP

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        return None


def _wrap(plugins: dict[str, Any]) -> dict[str, array]:
    """Put a timer around each plugin's transition: {name: ns of every call}."""
    # CPU time of the calling thread: time the OS gave to other processes (six
    # agents share two cores) is not counted against a hook.
    clock = time.thread_time_ns
    totals: dict[str, array] = {}
    for name, plugin in plugins.items():
        # The instance attribute shadows the class's hook, as distributed calls
        # plugin.transition(...).
        plugin.__dict__.pop("transition", None)
        hook = plugin.transition
        acc = totals[name] = array("q")

        def timed(*args: Any, _hook: Any = hook, _add: Any = acc.append, **kw: Any):
            t0 = clock()
            _hook(*args, **kw)
            _add(clock() - t0)

        plugin.transition = timed
    return totals


def _unwrap(plugins: dict[str, Any]) -> None:
    for plugin in plugins.values():
        plugin.__dict__.pop("transition", None)


def wrap_worker(dask_worker: Any) -> None:
    dask_worker._bench_totals = _wrap(
        {n: p for n, p in dask_worker.plugins.items() if hasattr(p, "transition")}
    )


def read_worker(dask_worker: Any) -> dict[str, array]:
    _unwrap(dask_worker.plugins)
    return dask_worker._bench_totals


def add(*xs: int) -> int:
    return sum(xs)


def run_tree(client: Any, leaves: int) -> int:
    import dask

    layer = [dask.delayed(inc)(i, dask_key_name=f"leaf-{i}") for i in range(leaves)]
    count = leaves
    level = 0
    while len(layer) > 1:
        level += 1
        layer = [
            dask.delayed(add)(*layer[i : i + 4], dask_key_name=f"node{level}-{i}")
            for i in range(0, len(layer), 4)
        ]
        count += len(layer)
    client.compute(layer[0]).result()
    return count


def plugins(tmp: str) -> list[Any]:
    import catalog

    return [
        catalog.SchedulerMetrics(),
        catalog.SchedulerTracer(),
        catalog.EventLog(file=f"{tmp}/events.jsonl"),
        catalog.Metrics(),
        catalog.Tracer(),
        catalog.MemoryGuard(),
        catalog.Watchdog(),
        catalog.StructuredLogging(file=f"{tmp}/logs.jsonl"),
        NoOpScheduler(),
        NoOpWorker(),
    ]


def measure(client: Any, cluster: Any, tasks: int, leaves: int) -> dict[str, Any]:
    scheduler = cluster.scheduler
    on_scheduler = {
        n: p for n, p in scheduler.plugins.items() if hasattr(p, "transition")
    }
    stealing = scheduler.extensions.get("stealing")
    if stealing is not None:
        on_scheduler["WorkStealing"] = stealing
    sched_totals = _wrap(on_scheduler)
    client.run(wrap_worker)
    count = independent(client, tasks) + run_tree(client, leaves)
    _unwrap(on_scheduler)
    worker_totals: dict[str, array] = {}
    for per_worker in client.run(read_worker).values():
        for name, samples in per_worker.items():
            worker_totals.setdefault(name, array("q")).extend(samples)
    return {"tasks": count, "scheduler": sched_totals, "worker": worker_totals}


#: Calls slower than this were interrupted (a GC pass, the OS giving the core
#: to another process): left out of the means and counted.
OUTLIER_NS = 200_000


def rows(side: dict[str, array], tasks: int) -> dict[str, tuple[float, ...]]:
    """name -> (median ns per call, mean ns per call, us per task, outliers).

    The no-op plugin's median is subtracted from the medians and its mean from
    the means (the timer and the call itself).
    """

    def stats(samples: array) -> tuple[float, float, int]:
        kept = [s for s in samples if s < OUTLIER_NS]
        mean = sum(kept) / len(kept) if kept else 0.0
        return statistics.median(samples), mean, len(samples) - len(kept)

    noop = side.get(NOOP)
    base_median, base_mean, _ = stats(noop) if noop else (0.0, 0.0, 0)
    out = {}
    for name, samples in side.items():
        if name == NOOP or not samples:
            continue
        median, mean, outliers = stats(samples)
        mean -= base_mean
        out[name] = (
            median - base_median,
            mean,
            mean * len(samples) / tasks / 1000,
            outliers,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--leaves", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--short", action="store_true", help="a quick run for CI (tiny graphs)"
    )
    args = parser.parse_args()
    if args.short:
        args.tasks, args.leaves, args.repeats = 200, 64, 1

    from distributed import Client, LocalCluster

    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        for plugin in plugins(tmp):
            client.register_plugin(plugin)
        independent(client, min(args.tasks, 500))  # warm up
        for _ in range(args.repeats):
            got = measure(client, cluster, args.tasks, args.leaves)
            for side in ("scheduler", "worker"):
                for name, row in rows(got[side], got["tasks"]).items():
                    results.setdefault((side, name), []).append(row)
        tasks = got["tasks"]

    print(
        f"{tasks} tasks per repeat ({args.tasks} map + tree of {args.leaves} "
        f"leaves), {args.repeats} repeats, medians of repeats; the no-op plugin "
        f"subtracted; calls over {OUTLIER_NS // 1000} us left out of the means"
    )
    print(
        f"{'side':<10} {'plugin':<18} {'median ns':>10} {'mean ns':>9} "
        f"{'us/task':>8} {'outliers':>8}"
    )
    catalog_total = {"scheduler": 0.0, "worker": 0.0}
    for (side, name), values in sorted(results.items()):
        median, mean, per_task, outliers = (
            statistics.median(v[i] for v in values) for i in range(4)
        )
        if name.startswith("catalog."):
            catalog_total[side] += per_task
        print(
            f"{side:<10} {name:<18} {median:>10.0f} {mean:>9.0f} "
            f"{per_task:>8.2f} {outliers:>8.0f}"
        )
    for side, total in catalog_total.items():
        print(f"{side:<10} {'catalog, all':<18} {'':>10} {'':>9} {total:>8.2f}")


if __name__ == "__main__":
    main()
