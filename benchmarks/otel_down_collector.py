"""Throughput with the otel entry exporting to a down collector, beside a bare cluster.

    python benchmarks/otel_down_collector.py

1,000 small tasks (5 rounds of 200) on a 2-thread in-process worker, bare and with
``catalog.OpenTelemetry`` posting to a closed loopback port (``max-queue`` 50, so
the queue is full and drops most tasks); 3 interleaved repeats, medians printed.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

from distributed import Client, Scheduler, Worker

import catalog

REPEATS = 3


def inc(x: int) -> int:
    return x + 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def once(endpoint: str | None) -> float:
    async with (
        Scheduler(host="127.0.0.1", dashboard_address="127.0.0.1:0") as s,
        Worker(s.address, nthreads=2),
        Client(s.address, asynchronous=True) as c,
    ):
        if endpoint is not None:
            plugin = catalog.OpenTelemetry(endpoint=endpoint, max_queue=50)
            await c.register_plugin(plugin)
        start = time.monotonic()
        for batch in range(5):
            await c.gather(c.map(inc, range(batch * 200, batch * 200 + 200)))
        return time.monotonic() - start


async def main() -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    bare, otel = [], []
    for _ in range(REPEATS):
        bare.append(await once(None))
        otel.append(await once(down))
    b, o = statistics.median(bare), statistics.median(otel)
    print(f"bare {b:.2f} s, otel (collector down) {o:.2f} s, ratio {o / b:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
