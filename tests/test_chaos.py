"""Chaos: workers killed during a computation with every entry on.

A ``dask scheduler`` and three ``dask worker`` processes (with nannies) run with
``--preload catalog --enable <all>`` (every entry of the registry: all 11, otel
exporting to a sink on loopback, recycle counting tasks), the tracer streaming
to files every ``FLUSH`` seconds and the events entry writing its file. While a
two-layer computation runs, workers ``w0`` and ``w1`` are killed three times, at random
moments: SIGKILL of the worker process, then distributed's own chaos plugin
``distributed.chaos.KillWorker`` (``segfault`` mode, then ``sys.exit``), each
time added to one worker only, so that the nanny's restart ends that chaos.
The scheduler and ``w2`` survive.

What must hold:

- the computation finishes with the right result;
- every file (trace files of the killed workers included) parses, line by line;
- **loss bound**: every task the scheduler saw finish on a worker more than
  ``FLUSH + SLACK`` seconds before that worker's last finished task is in the
  worker's own trace file: only the last unflushed interval may be lost;
- the events file records each kill (``worker-removed``) and restart;
- on the survivors, the catalog's threads, open files and listening ports are
  the same before and after the chaos.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict

import pytest
from distributed import Client
from distributed.chaos import KillWorker

from catalog._registry import builtin_names
from tests.procs import by_value
from tests.reliability import (
    OtlpSink,
    installed_entries,
    own_resources,
    read_json_lines,
    start_cluster,
    trace_files,
)

#: The tracer's flush interval in this test, and the slack allowed on top of it
#: for a flush thread that a loaded machine runs late.
FLUSH = 0.5
SLACK = 1.5
TASKS = 3000


def chaos_work(x: int) -> int:
    import time

    time.sleep(0.01)
    return x + 1


def chaos_sum(xs: list[int]) -> int:
    return sum(xs)


def worker_pid() -> int:
    import os

    return os.getpid()


async def add_chaos(dask_worker, plugin) -> None:
    await dask_worker.plugin_add(plugin=plugin, name="chaos")


def by_name(client: Client) -> dict[str, str]:
    return {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}


def wait_for_worker(
    client: Client, name: str, old: str, restarts: bool, timeout: float = 60
) -> None:
    """Wait until worker ``name`` left ``old``: restarted elsewhere, or gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        address = by_name(client).get(name)
        if address != old and (address is not None) == restarts:
            return
        time.sleep(0.1)
    pytest.fail(f"{name} did not leave {old} within {timeout}s: {by_name(client)}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_kills_lose_at_most_the_last_interval(procs, tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    # otel exports to a sink on loopback, so that its export thread and
    # connections are live when the kills come; recycle counts every task.
    sink = OtlpSink()
    cluster = start_cluster(
        procs,
        tmp_path,
        3,
        *("--tracer-flush-interval", f"{FLUSH}s"),
        *("--otel-endpoint", sink.endpoint, "--recycle-max-tasks", "1000000000"),
        worker_args=("--nthreads", "2"),
        # Kills must not turn the computation into KilledWorker errors.
        scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "100"},
    )
    with Client(cluster.address, timeout=60) as client:
        client.wait_for_workers(3, timeout=60)
        assert client.submit(by_value(chaos_work), 0).result() == 1
        # Every entry of the registry is installed somewhere (scheduler,
        # workers or nannies): the chaos hits the catalog as a whole.
        assert set(builtin_names()) <= installed_entries(client)
        names = by_name(client)
        survivor = names["w2"]
        before = {
            "scheduler": client.run_on_scheduler(by_value(own_resources)),
            "w2": client.run(by_value(own_resources), workers=[survivor])[survivor],
        }

        parts = client.map(by_value(chaos_work), range(TASKS), pure=False)
        sums = [
            client.submit(by_value(chaos_sum), parts[i : i + 50], pure=False)
            for i in range(0, TASKS, 50)
        ]
        result = client.submit(by_value(chaos_sum), sums, pure=False)

        # (worker, how, restarted by its nanny?). KillWorker's sys.exit mode
        # makes distributed close the worker *and* its nanny ("Closing Nanny
        # gracefully ... worker-handle-scheduler-connection-broken"): that
        # worker is gone for good, so it is the last kill.
        kills = [
            ("w0", "SIGKILL", True),
            ("w1", KillWorker(delay="10ms", mode="segfault"), True),
            ("w0", KillWorker(delay="10ms", mode="sys.exit"), False),
        ]
        killed: set[str] = set()
        for name, how, restarts in kills:
            time.sleep(rng.uniform(0.5, 2.0))
            old = by_name(client)[name]
            if how == "SIGKILL":
                pid = client.run(by_value(worker_pid), workers=[old])[old]
                os.kill(pid, signal.SIGKILL)
            else:
                client.run(by_value(add_chaos), plugin=how, workers=[old])
            wait_for_worker(client, name, old, restarts)
            killed.add(old)
            label = how if isinstance(how, str) else f"KillWorker({how.mode})"
            print(f"killed {name} at {old} with {label}")

        assert result.result(timeout=300) == sum(range(1, TASKS + 1))
        after = {
            "scheduler": client.run_on_scheduler(by_value(own_resources)),
            "w2": client.run(by_value(own_resources), workers=[survivor])[survivor],
        }
        del parts, sums, result
    for proc in reversed(cluster.workers):
        proc.stop()
    cluster.scheduler.stop()
    sink.close()
    assert sink.requests > 0

    # No catalog thread, file or port was left behind (or lost) on a survivor.
    assert after == before

    # Every file parses, line by line (read_json_lines fails on a torn line).
    files = list(trace_files(cluster.trace_dir))
    finished_on: dict[str, dict[str, float]] = defaultdict(dict)  # scheduler's view
    in_file: dict[str, set[str]] = {}  # each worker's own file
    for header, events in files:
        if header["role"] == "scheduler":
            for e in events:
                if e.get("finish") == "memory" and e.get("worker"):
                    finished_on[e["worker"]].setdefault(e["key"], e["time"])
        else:
            in_file[header["address"]] = {
                e["key"] for e in events if e.get("finish") == "memory"
            }
    assert len(killed) == 3 and killed <= set(in_file), (killed, sorted(in_file))

    # The loss bound: only what finished in the last FLUSH + SLACK before the
    # kill may be missing from a killed worker's file.
    checked = lost = 0
    oldest_lost = 0.0
    for address in killed:
        finished = finished_on[address]
        last = max(finished.values())
        old = {k for k, t in finished.items() if t < last - FLUSH - SLACK}
        missing = old - in_file[address]
        assert not missing, (address, len(missing), sorted(missing)[:5])
        checked += len(old)
        gone = set(finished) - in_file[address]
        lost += len(gone)
        oldest_lost = max([oldest_lost, *(last - finished[k] for k in gone)])
    assert checked > 0  # the killed workers had finished tasks to lose
    print(
        f"checked {checked} tasks on killed workers; {lost} lost, the oldest "
        f"{oldest_lost:.2f} s before its worker's last finished task"
    )

    events = read_json_lines(cluster.events_file)
    removed = {e["worker"] for e in events if e["event"] == "worker-removed"}
    added = [e["name"] for e in events if e["event"] == "worker-added"]
    assert killed <= removed
    assert sorted(added) == ["w0", "w0", "w1", "w1", "w2"]
    assert not [e for e in events if e["event"] == "task-erred"]
