"""Per-call cost of the guard entries' transition hooks, replayed from a real run.

Run by hand (never as a timed test; the machine is shared and noisy)::

    python benchmarks/guard_hooks.py [--tasks 2000] [--repeats 7]

An in-process scheduler and one single-threaded worker run ``--tasks`` tiny
tasks with memory, watchdog, recycle and otel (both halves) registered, and a
recorder plugin on each side keeps every ``transition`` call as distributed
made it. The futures are kept, so the worker still holds each task's state.
The recorded calls are then replayed into each guard's hook (``getattr(plugin,
"transition")``, the catalog's never-raise wrapper included) and into an empty
function, interleaved, ``--repeats`` times. Printed: the median over repeats of
the thread's CPU nanoseconds per call with the empty function's subtracted, and
per task. The otel exporters point at a closed port and drop what they drain.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
from typing import Any

from distributed import Client, Scheduler, Worker
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

import catalog

Call = tuple[tuple[Any, ...], dict[str, Any]]


class WorkerRecorder(WorkerPlugin):
    name = "bench.recorder"

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def transition(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


class SchedulerRecorder(SchedulerPlugin):
    name = "bench.recorder"

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def transition(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


def empty(*args: Any, **kwargs: Any) -> None:
    return None


def replay(hook: Any, calls: list[Call]) -> float:
    """CPU seconds of this thread per call of ``hook`` over ``calls``.

    Thread CPU time: what the OS gave other processes on the shared machine is
    not counted, nor what a guard's own thread does later (memory's sampler).
    """
    t0 = time.thread_time()
    for args, kwargs in calls:
        hook(*args, **kwargs)
    return (time.thread_time() - t0) / len(calls)


def inc(x: int) -> int:
    return x + 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(side: str, hooks: dict[str, Any], calls: list[Call], ns: Any) -> None:
    times: dict[str, list[float]] = {name: [] for name in hooks}
    base: list[float] = []
    for _ in range(ns.repeats):  # interleaved, so noise hits all alike
        for name, hook in hooks.items():
            times[name].append(replay(hook, calls))
        base.append(replay(empty, calls))
    empty_ns = statistics.median(base) * 1e9
    per_task = len(calls) / ns.tasks
    print(f"{side}: {len(calls)} calls ({per_task:.1f} per task); empty {empty_ns:.0f}")
    for name, samples in times.items():
        over = statistics.median(samples) * 1e9 - empty_ns
        print(f"  {name:<28} {over:7.0f} ns/call {over * per_task / 1e3:7.2f} us/task")


async def main(ns: Any) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    queue = 10**9  # never full: every call does its append
    async with (
        Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0") as s,
        Worker(s.address, nthreads=1) as w,
        Client(s.address, asynchronous=True) as c,
    ):
        worker_rec, scheduler_rec = WorkerRecorder(), SchedulerRecorder()
        await c.register_plugin(catalog.MemoryGuard())
        await c.register_plugin(catalog.Watchdog())
        await c.register_plugin(catalog.Recycler())
        await c.register_plugin(catalog.SchedulerRecycler())
        await c.register_plugin(
            catalog.OpenTelemetry(endpoint=endpoint, max_queue=queue)
        )
        await c.register_plugin(
            catalog.SchedulerOpenTelemetry(endpoint=endpoint, max_queue=queue)
        )
        await c.register_plugin(worker_rec)
        await c.register_plugin(scheduler_rec)
        futures = c.map(inc, range(ns.tasks))
        await c.gather(futures)
        worker_hooks = {
            name: getattr(w.plugins[name], "transition")  # noqa: B009
            for name in ("catalog.memory", "catalog.watchdog", "catalog.recycle")
        }
        worker_hooks["catalog.otel"] = getattr(  # noqa: B009
            w.plugins["catalog.otel"], "transition"
        )
        scheduler_hooks = {
            "catalog.otel": getattr(  # noqa: B009
                s.plugins["catalog.otel"], "transition"
            )
        }
        # The servers hold copies of the recorders (plugins travel pickled).
        worker_calls = list(w.plugins[worker_rec.name].calls)
        scheduler_calls = list(s.plugins[scheduler_rec.name].calls)
        report("worker", worker_hooks, worker_calls, ns)
        report("scheduler", scheduler_hooks, scheduler_calls, ns)
        del futures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    asyncio.run(main(parser.parse_args()))
