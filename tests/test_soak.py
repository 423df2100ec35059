"""Soak: 200,000 tiny tasks through a real cluster with every entry on,
against a bare cluster of the same shape in the same test.

The scheduler and two workers (with nannies) run as ``dask scheduler`` / ``dask
worker`` processes with ``--preload catalog --enable <all>``; the tracer streams
to files and the events entry writes its file. The tasks go in batches; after
each batch the scheduler's and workers' RSS, open files and threads, and the
trace and events file sizes are sampled. A bare cluster (no catalog) of the
same shape runs the same tasks in the same batches at the same time, with a
client of its own, and is sampled the same way.

What must hold:

- **plateau**: from the middle sample to the last one (the second half of the
  tasks) each process's RSS grows by less than ``EXTRA_BYTES`` more than the
  same process of the bare cluster grows over the same tasks (distributed's
  own workers grow ~170 bytes per task over this range with no catalog at all,
  so a bound without the baseline would measure distributed). The tracer ring
  is sized so it is full before the middle (``--tracer-capacity``), so what the
  catalog adds after that is a leak: at 100,000 tasks in the second half,
  8 MiB catches ~84 bytes per task, less than one dict entry per key. Open
  files and threads grow by at most ``SLACK`` (no baseline needed).
- **counts**: the tasks the metrics count (worker and scheduler), the finished
  tasks in the trace files (worker and scheduler) and the tasks the events file
  says were submitted all equal the tasks run.

Marker ``soak``, deselected from the default run and not in CI yet: the
scheduler's second-half growth exceeds the bound by about 1 MiB in one run of
two (docs/reliability.md). The 1-hour variant runs both clusters for an hour
(prints its samples):

    pytest -m soak tests/test_soak.py -s
    CATALOG_SOAK_MINUTES=60 pytest -m soak tests/test_soak.py -s
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from distributed import Client

from tests.procs import by_value
from tests.reliability import (
    Cluster,
    OtlpSink,
    catalog_sizes,
    file_size,
    footprint,
    grown,
    read_json_lines,
    scrape,
    start_cluster,
    total,
    trace_files,
)

TASKS = int(os.environ.get("CATALOG_SOAK_TASKS", "200000"))
MINUTES = float(os.environ.get("CATALOG_SOAK_MINUTES", "0"))
BATCH = 10_000
#: Ring events per server: about 6 per task on a worker, so full within ~20,000
#: tasks, well before the middle of the run.
CAPACITY = 100_000
#: The CI-sized soak: the same assertions on 20,000 tasks in batches of 2,000,
#: with a ring of 20,000 events (full by ~7,000 tasks, before the middle).
CI_TASKS, CI_BATCH, CI_CAPACITY = 20_000, 2_000, 20_000
#: What the catalog may add to a process's second-half RSS growth, over bare.
EXTRA_BYTES = 8 * 2**20
SLACK = 2
PREFIX = "soak_inc"


def soak_inc(x: int) -> int:
    return x + 1


def worker_pid() -> int:
    import os

    return os.getpid()


def run_batches(
    client: Client,
    cluster: Cluster,
    tasks: int,
    batch: int,
    minutes: float = 0,
    structures: bool = False,
) -> list[dict]:
    """Run ``tasks`` tasks (or as many as fit in ``minutes``) in batches; sample
    every process after each batch. Processes are named ``scheduler``, ``w0``...

    With ``structures``, each sample also holds the length of every container
    of the catalog's plugins on each process (``catalog_sizes``), under
    ``"sizes"``."""
    names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    pids = {"scheduler": cluster.scheduler.popen.pid}
    pids.update({names[a]: pid for a, pid in client.run(by_value(worker_pid)).items()})
    samples: list[dict] = []
    done = 0
    started = time.monotonic()
    while (time.monotonic() - started < minutes * 60) if minutes else done < tasks:
        futures = client.map(by_value(soak_inc), range(done, done + batch), pure=False)
        assert client.gather(futures) == list(range(done + 1, done + batch + 1))
        del futures
        done += batch
        sample = {
            "tasks": done,
            "seconds": round(time.monotonic() - started, 1),
            **{who: footprint(pid) for who, pid in pids.items()},
            "trace_bytes": sum(file_size(p) for p in cluster.trace_dir.glob("*.jsonl")),
            "events_bytes": file_size(cluster.events_file),
        }
        if structures:
            sizes = {"scheduler": client.run_on_scheduler(by_value(catalog_sizes))}
            sizes.update(
                {names[a]: v for a, v in client.run(by_value(catalog_sizes)).items()}
            )
            sample["sizes"] = sizes
        samples.append(sample)
        print(json.dumps({k: v for k, v in sample.items() if k != "sizes"}), flush=True)
    # Every process is the one sampled from the start: no worker restarted.
    assert {names[a]: p for a, p in client.run(by_value(worker_pid)).items()} == {
        k: v for k, v in pids.items() if k != "scheduler"
    }
    return samples


def growth(samples: list[dict], who: str, start: int, end: int) -> int:
    return samples[end][who]["rss"] - samples[start][who]["rss"]


def soak(
    procs, tmp_path, tasks: int, batch: int, capacity: int, minutes: float = 0
) -> None:
    """Both clusters side by side, ``tasks`` tasks each; every assertion of the
    module's docstring."""
    # Both clusters run at once, so that they see the same machine; each has
    # its own client. The otel entry exports to a sink on loopback.
    sink = OtlpSink()
    cluster = start_cluster(
        procs,
        tmp_path / "catalog",
        2,
        *("--tracer-capacity", str(capacity), "--tracer-flush-interval", "500ms"),
        *("--otel-endpoint", sink.endpoint),
        # recycle counts every task against a limit the soak never reaches.
        *("--recycle-max-tasks", str(10 * tasks)),
        worker_args=("--nthreads", "1"),
    )
    bare_cluster = start_cluster(
        procs, tmp_path / "bare", 2, worker_args=("--nthreads", "1"), bare=True
    )

    def run(which: Cluster, structures: bool) -> tuple[list[dict], list[dict], dict]:
        with Client(which.address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            samples = run_batches(client, which, tasks, batch, minutes, structures)
            info = client.scheduler_info()
            workers = [
                scrape(w["services"]["dashboard"]) for w in info["workers"].values()
            ]
            return samples, workers, scrape(info["services"]["dashboard"])

    try:
        with ThreadPoolExecutor(2) as pool:
            running = [
                pool.submit(run, cluster, True),
                pool.submit(run, bare_cluster, False),
            ]
            (samples, worker_metrics, scheduler_metrics), (bare, _, _) = [
                f.result() for f in running
            ]
        for proc in [*reversed(cluster.workers), *reversed(bare_cluster.workers)]:
            proc.stop()
        cluster.scheduler.stop()
        bare_cluster.scheduler.stop()
    finally:
        sink.close()
    ran = samples[-1]["tasks"]

    print(
        f"\nsoak: {ran} tasks in {samples[-1]['seconds']} s (bare: "
        f"{bare[-1]['seconds']} s); otel sink: {sink.requests} exports, "
        f"{sink.bytes} bytes"
    )
    roles = [k for k in samples[0] if isinstance(samples[0][k], dict) and k != "sizes"]
    for who in roles:
        for name, run_ in (("catalog", samples), ("bare", bare)):
            rss = " ".join(f"{s[who]['rss'] / 2**20:.0f}" for s in run_)
            print(f"{who} {name} RSS MiB: {rss}")
        largest = {
            k: max(s["sizes"][who].get(k, 0) for s in samples)
            for k in samples[-1]["sizes"][who]
        }
        print(f"{who} catalog structures, largest length: {json.dumps(largest)}")

    # Metrics: every task counted once, on the workers and on the scheduler.
    assert (
        sum(
            total(m, "dask_catalog_tasks_total", prefix=PREFIX, outcome="success")
            for m in worker_metrics
        )
        == ran
    )
    assert (
        total(
            scheduler_metrics,
            "dask_catalog_scheduler_tasks_total",
            prefix=PREFIX,
            outcome="success",
        )
        == ran
    )

    # Traces: each task finished once on a worker and once on the scheduler.
    finished: Counter[str] = Counter()
    for header, events in trace_files(cluster.trace_dir):
        for e in events:
            if e.get("prefix") == PREFIX and e.get("finish") == "memory":
                finished[header["role"]] += 1
    assert finished == {"worker": ran, "scheduler": ran}

    # Events: the submitted graphs add up to the tasks run.
    events = read_json_lines(cluster.events_file)
    submitted = [e for e in events if e["event"] == "graph-submitted"]
    assert sum(e["tasks"] for e in submitted) == ran
    assert len(submitted) == ran // batch

    # otel exported to its sink all along.
    assert sink.requests > 0

    # The catalog's own structures, measured directly: none grows over the
    # second half past twice its first-half largest, beyond a batch in flight
    # (or the otel queue's cap, 10,000 by default).
    floor = max(batch, 10_000)
    for who in roles:
        leaks = grown([s["sizes"][who] for s in samples], floor)
        assert not leaks, f"{who}: catalog structures still growing: {leaks}"

    # Plateau (checked last, so that a leak does not hide the counts): over the
    # second half the catalog adds less than the bound to what bare grows.
    mid, mid_bare = len(samples) // 2, len(bare) // 2
    for who in roles:
        # In the 1-hour variant the two runs may differ by a batch or two: the
        # bare growth is scaled to the catalog's second-half tasks.
        scale = (samples[-1]["tasks"] - samples[mid]["tasks"]) / (
            bare[-1]["tasks"] - bare[mid_bare]["tasks"]
        )
        extra = growth(samples, who, mid, -1) - scale * growth(bare, who, mid_bare, -1)
        assert extra < EXTRA_BYTES, (
            f"{who} RSS grew {extra / 2**20:.1f} MiB more than bare from "
            f"{samples[mid]['tasks']} to {samples[-1]['tasks']} tasks: catalog "
            f"{[s[who] for s in samples]}, bare {[s[who] for s in bare]}"
        )
        last = samples[-1][who]
        for what in ("fds", "threads"):
            assert last[what] <= samples[mid][who][what] + SLACK, (who, what, samples)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_ci_sized(procs, tmp_path):
    """20,000 tasks: the soak's every assertion at a CI size. Not in CI yet: its
    first run, on a machine at load 25, passed the 300 s default timeout."""
    soak(procs, tmp_path, CI_TASKS, CI_BATCH, CI_CAPACITY)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(max(3600, int(MINUTES * 60 * 3)))
def test_soak_plateau_and_counts(procs, tmp_path):
    soak(procs, tmp_path, TASKS, BATCH, CAPACITY, MINUTES)
