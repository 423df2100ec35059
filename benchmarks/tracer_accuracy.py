"""Accuracy and cost of the tracer on real worker processes.

Run by hand:  python benchmarks/tracer_accuracy.py [--rounds 7] [--tasks 2000]

1. Accuracy: tasks that sleep 200 ms show compute spans of 200 ms (within 5 ms),
   and span counts equal task counts exactly.
2. Throughput: a bare cluster and a traced one, side by side in one run,
   alternating rounds of tiny tasks; the ratio of median throughputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from distributed import Client, LocalCluster

import catalog
import catalog.tracer


def sleep_200ms(i: int) -> int:
    time.sleep(0.2)
    return i


def inc(x: int) -> int:
    return x + 1


def cluster() -> LocalCluster:
    return LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    )


def accuracy(tasks: int) -> dict:
    with cluster() as c, Client(c) as client:
        client.register_plugin(catalog.Tracer())
        client.register_plugin(catalog.SchedulerTracer())
        client.gather(client.map(sleep_200ms, range(8)))
        client.gather(client.map(inc, range(tasks)))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            summary = catalog.tracer.save(client, path)
            with open(path) as f:
                trace = json.load(f)
    sleeps = [
        e["dur"] / 1e3
        for e in trace["traceEvents"]
        if e.get("cat") == "compute" and e["name"] == "sleep_200ms"
    ]
    errors = [abs(ms - 200.0) for ms in sleeps]
    return {
        "sleep_spans": len(sleeps),
        "sleep_span_ms": [round(ms, 2) for ms in sleeps],
        "max_error_ms": round(max(errors), 2),
        "inc_spans": summary["prefixes"]["inc"]["count"],
        "inc_tasks": tasks,
        "dropped": summary["dropped"],
    }


def throughput(rounds: int, tasks: int) -> dict:
    times: dict[str, list[float]] = {"bare": [], "traced": []}
    with cluster() as bare_c, cluster() as traced_c:
        with Client(bare_c) as bare, Client(traced_c) as traced:
            traced.register_plugin(catalog.Tracer())
            traced.register_plugin(catalog.SchedulerTracer())
            clients = {"bare": bare, "traced": traced}
            for client in clients.values():  # warm up
                client.gather(client.map(inc, range(200), pure=False))
            for r in range(rounds):
                order = ("bare", "traced") if r % 2 == 0 else ("traced", "bare")
                for name in order:
                    client = clients[name]
                    t0 = time.perf_counter()
                    client.gather(client.map(inc, range(tasks), pure=False))
                    times[name].append(time.perf_counter() - t0)
            recorded = sum(
                s["recorded"] for s in catalog.tracer.fetch(traced)["workers"].values()
            )
    bare_rate = tasks / statistics.median(times["bare"])
    traced_rate = tasks / statistics.median(times["traced"])
    return {
        "tasks_per_round": tasks,
        "rounds": rounds,
        "bare_tasks_per_s": round(bare_rate),
        "traced_tasks_per_s": round(traced_rate),
        "ratio": round(traced_rate / bare_rate, 3),
        "worker_events_recorded": recorded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=2000)
    ns = parser.parse_args()
    result = {
        "accuracy": accuracy(ns.tasks),
        "throughput": throughput(ns.rounds, ns.tasks),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
