"""Task throughput of a bare cluster against the same cluster with catalog entries on.

Run by hand (never as a timed test; this machine is shared and noisy):

    python benchmarks/overhead.py --repeats 7 --tasks 10000

One LocalCluster of worker processes serves every variant: each repeat runs the
bare cluster and then each variant with its plugins registered, in an order that
rotates between repeats, so slow drifts of the machine hit every variant alike.
The ratio of a variant is its throughput over the bare run of the same repeat;
the table prints the median ratio per variant and graph.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any


def variants(tmp: str) -> dict[str, Callable[[], list[Any]]]:
    """Name -> factory of the plugins to register for that variant."""
    import catalog

    def all_entries() -> list[Any]:
        return [p for name, make in single.items() for p in make()]

    single: dict[str, Callable[[], list[Any]]] = {
        "metrics": lambda: [catalog.Metrics(), catalog.SchedulerMetrics()],
        "tracer": lambda: [catalog.Tracer(), catalog.SchedulerTracer()],
        "memory": lambda: [catalog.MemoryGuard()],
        "watchdog": lambda: [catalog.Watchdog()],
        "events": lambda: [catalog.EventLog(file=f"{tmp}/events.jsonl")],
        "logging": lambda: [catalog.StructuredLogging(file=f"{tmp}/logs.jsonl")],
    }
    return {**single, "all": all_entries}


def inc(x: int) -> int:
    return x + 1


def independent(client: Any, n: int) -> int:
    futures = client.map(inc, range(n), pure=False)
    client.gather(futures)
    del futures
    return n


def reduction(client: Any, n: int) -> int:
    import dask.array as da

    side = int((n * 100) ** 0.5)  # about n chunks of 10x10
    x = da.random.random((side, side), chunks=(10, 10))
    graph_size = len(x.sum().__dask_graph__())
    x.sum().compute()
    return graph_size


GRAPHS: dict[str, Callable[[Any, int], int]] = {
    "independent": independent,
    "reduction": reduction,
}


def register(client: Any, plugins: list[Any]) -> None:
    for plugin in plugins:
        client.register_plugin(plugin)


def unregister(client: Any, plugins: list[Any]) -> None:
    from distributed.diagnostics.plugin import SchedulerPlugin

    for plugin in plugins:
        if isinstance(plugin, SchedulerPlugin):
            client.unregister_scheduler_plugin(plugin.name)
        else:
            client.unregister_worker_plugin(plugin.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        chosen = variants(tmp)
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only}
        names = ["bare", *chosen]
        rates: dict[tuple[str, str], list[float]] = {}
        ratios: dict[tuple[str, str], list[float]] = {}
        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
            ) as cluster,
            Client(cluster) as client,
        ):
            for graph, run in GRAPHS.items():
                run(client, min(args.tasks, 1000))  # warm up
                for repeat in range(args.repeats):
                    order = names[repeat % len(names) :] + names[: repeat % len(names)]
                    this_round: dict[str, float] = {}
                    for name in order:
                        plugins = chosen[name]() if name != "bare" else []
                        register(client, plugins)
                        start = time.perf_counter()
                        count = run(client, args.tasks)
                        this_round[name] = count / (time.perf_counter() - start)
                        unregister(client, plugins)
                    for name, rate in this_round.items():
                        rates.setdefault((graph, name), []).append(rate)
                        ratios.setdefault((graph, name), []).append(
                            rate / this_round["bare"]
                        )
        print(
            f"{'graph':<12} {'variant':<9} {'median tasks/s':>15} {'median ratio':>13}"
        )
        for (graph, name), values in rates.items():
            ratio = statistics.median(ratios[(graph, name)])
            print(
                f"{graph:<12} {name:<9} "
                f"{statistics.median(values):>15.0f} {ratio:>13.3f}"
            )


if __name__ == "__main__":
    main()
