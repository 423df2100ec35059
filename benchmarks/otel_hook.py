"""The otel entry's hooks beside the tracer's: microseconds per call, same run.

    python benchmarks/otel_hook.py

Each hook is called directly (``timeit``) on a real in-process worker and
scheduler, interleaved with the tracer's hook on the same transition; medians of
7 repeats. The otel drain thread is told to drop what it drains, so only the
hook's own work (one tuple appended) is timed. On a loaded machine the absolute
numbers move a lot; the ratio to the tracer is the figure to read.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import statistics
import timeit
from typing import Any

from distributed import Client, Scheduler, Worker

import catalog

CALLS = 50_000
REPEATS = 7


def inc(x: int) -> int:
    return x + 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_call(hook: Any, args: tuple[str, str, str]) -> float:
    """Microseconds per call of ``hook(*args)``."""
    return timeit.timeit(functools.partial(hook, *args), number=CALLS) / CALLS * 1e6


async def main() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    async with (
        Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0") as s,
        Worker(s.address, nthreads=1) as w,
        Client(s.address, asynchronous=True) as c,
    ):
        queue = 10**9  # never full: every call does the append
        await c.register_plugin(
            catalog.OpenTelemetry(endpoint=endpoint, max_queue=queue)
        )
        await c.register_plugin(
            catalog.SchedulerOpenTelemetry(endpoint=endpoint, max_queue=queue)
        )
        await c.register_plugin(catalog.Tracer())
        await c.register_plugin(catalog.SchedulerTracer())
        await c.submit(inc, 1, key="inc-1")
        worker_otel, sched_otel = w.plugins["catalog.otel"], s.plugins["catalog.otel"]
        worker_otel.pipeline._abandon = sched_otel.pipeline._abandon = True
        cases = {
            "worker executing->memory": (worker_otel, w.plugins["catalog.tracer"],
                                         ("inc-1", "executing", "memory")),
            "worker ready->executing": (worker_otel, w.plugins["catalog.tracer"],
                                        ("inc-1", "ready", "executing")),
            "scheduler released->waiting": (sched_otel, s.plugins["catalog.tracer"],
                                            ("inc-1", "released", "waiting")),
            "scheduler waiting->processing": (sched_otel, s.plugins["catalog.tracer"],
                                              ("inc-1", "waiting", "processing")),
        }  # fmt: skip
        for name, (otel, tracer, args) in cases.items():
            ours, theirs = [], []
            for _ in range(REPEATS):
                ours.append(per_call(otel.transition, args))
                theirs.append(per_call(tracer.transition, args))
                otel.pipeline.records.clear()
            mine, base = statistics.median(ours), statistics.median(theirs)
            print(
                f"{name}: otel {mine:.2f} us, tracer {base:.2f} us, "
                f"ratio {mine / base:.2f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
