"""How long before the removal of a memory-killed worker its nanny's report comes.

Run by hand (not in CI):

    python benchmarks/oom_report_lead.py

The oom entry fails a task with its own ``OOMKilledWorker`` only when the nanny's
``worker-restart-memory`` report reaches the scheduler before ``remove_worker``
(which raises distributed's bare ``KilledWorker``). A two-worker LocalCluster with
nannies and a 400 MiB limit runs a task that allocates without end, so the nanny
kills ``allowed-failures + 1`` workers in a row; for each kill this prints the time
from the report to the scheduler's removal of that worker (positive: report first).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin


class _Order(SchedulerPlugin):
    name = "oom-report-lead"

    def __init__(self) -> None:
        self.reported: dict[str, float] = {}
        self.removed: dict[str, float] = {}

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == "worker-restart-memory":
            self.reported[msg["worker"]] = time.monotonic()

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.removed[worker] = time.monotonic()


def hog() -> None:
    chunks = []
    while True:
        chunks.append(bytearray(20 * 2**20))
        time.sleep(0.01)


def _leads(dask_scheduler: Any) -> list[float]:
    plugin = dask_scheduler.plugins["oom-report-lead"]
    return [
        plugin.removed[w] - t for w, t in plugin.reported.items() if w in plugin.removed
    ]


def main() -> None:
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit="400MiB",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(_Order())
        leads: list[float] = []
        for _ in range(2):
            try:
                client.submit(hog, pure=False).result(timeout=300)
            except Exception as exc:
                print(type(exc).__name__)
            leads = client.run_on_scheduler(_leads)
    ms = sorted(round(lead * 1000, 1) for lead in leads)
    print(f"kills: {len(ms)}; report before removal by (ms): {ms}")
    print(f"median {statistics.median(ms)} ms, min {ms[0]} ms")


if __name__ == "__main__":
    main()
