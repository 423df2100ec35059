"""Interrupts (catalog._runtime): only at safe points, not swallowed, no wedged worker.

The watchdog drives them here, since it fires at a time the test chooses; the
memory guard uses the same machinery (tests/test_memory.py covers its escalation).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time

import dask
import pytest
from distributed import Client, wait
from distributed.utils_test import gen_cluster

import catalog
from catalog import _runtime
from catalog.watchdog import TaskTimeoutError, Watchdog
from tests.procs import LOOPBACK, REPO_ENV, REPO_ROOT, local_cluster

task_logger = logging.getLogger("tests.interrupts.task")

#: What a hang may cost at most before the test fails (generous: shared machine).
HANG = 120


def spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def logging_loop(i: int, seconds: float = 1.5) -> int:
    """The issue's task: ~1 ms of Python work and one logging call per loop."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        spin(0.001)
        task_logger.warning("task %d still looping", i)
    return i


def swallow_exceptions(seconds: float) -> str:
    """Library-style code: `except Exception` around every step."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            spin(0.01)
        except Exception:  # what the interrupt must get through
            continue
    return "ran to the end"


def executor_threads_alive(dask_worker) -> list[bool]:
    return [t.is_alive() for t in dask_worker.executors["default"]._threads]


def outcomes(futures) -> dict[str, int]:
    """Every future is done or failed with TaskTimeoutError; count each kind."""
    out = {"done": 0, "timeout": 0}
    for fut in futures:
        if fut.status == "finished":
            out["done"] += 1
        else:
            assert fut.status == "error", fut.status
            assert isinstance(fut.exception(), TaskTimeoutError), fut.exception()
            out["timeout"] += 1
    return out


# ---------------------------------------------------------------------------
# Unit
# ---------------------------------------------------------------------------


def test_unsafe_roots_cover_the_modules_named_in_the_issue():
    import concurrent.futures
    import importlib.util

    import distributed.worker

    for module in (logging, threading, queue, concurrent.futures, importlib.util):
        assert _runtime._unsafe_file(module.__file__), module
    assert _runtime._unsafe_file(distributed.worker.__file__)
    assert _runtime._unsafe_file("<frozen importlib._bootstrap>")
    assert not _runtime._unsafe_file(__file__)
    import catalog.demo

    assert not _runtime._unsafe_file(catalog.demo.__file__)  # its tasks are tasks


def test_a_thread_outside_a_task_is_never_at_a_safe_point():
    assert not _runtime.at_safe_point(sys._getframe())
    assert not _runtime.at_safe_point(None)


# ---------------------------------------------------------------------------
# In-process cluster
# ---------------------------------------------------------------------------


class SlowHandler(logging.Handler):
    """A handler that spends a while in emit (inside logging's handler lock)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.emitted = 0

    def emit(self, record: logging.LogRecord) -> None:
        spin(self.seconds)
        self.emitted += 1


def log_then_spin(name: str, seconds: float) -> str:
    logging.getLogger(name).warning("one slow line")
    spin(seconds)
    return "not interrupted"


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_no_interrupt_inside_logging_then_one_right_after(c, s, a):
    """fail-after passes while the task is inside a logging handler: the
    interrupt waits until the task is back in its own code."""
    handler = SlowHandler(1.0)
    log = logging.getLogger("tests.interrupts.slow")
    log.addHandler(handler)
    log.propagate = False
    try:
        await c.register_plugin(
            Watchdog(fail_after="100ms", warn_after=None, interval="10ms")
        )
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError):
            await c.submit(log_then_spin, log.name, 60)
        assert time.monotonic() - start < 30
        # The handler finished its line and released its lock.
        assert handler.emitted == 1
        assert handler.lock.acquire(timeout=5)
        handler.lock.release()
    finally:
        log.removeHandler(handler)
    assert a.plugins["catalog.watchdog"].status()["timeouts"] == 1


@gen_cluster(client=True, nthreads=[(LOOPBACK, 1)])
async def test_except_exception_in_the_task_does_not_swallow_it(c, s, a):
    await c.register_plugin(
        Watchdog(fail_after="200ms", warn_after=None, interval="20ms")
    )
    start = time.monotonic()
    with pytest.raises(TaskTimeoutError, match=r"ran longer than 200\.00 ms"):
        await c.submit(swallow_exceptions, 20)
    assert time.monotonic() - start < 15  # cut short, not run to its end
    # The watchdog thread counts the timeout right after firing it; under load
    # the task's error can reach the client first.
    deadline = time.monotonic() + 10
    status = a.plugins["catalog.watchdog"].status()
    while status["timeouts"] == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status = a.plugins["catalog.watchdog"].status()
    assert (status["timeouts"], status["refires"], status["unstoppable"]) == (1, 0, 0)


# ---------------------------------------------------------------------------
# The issue's repro and a stress test, each in a child process: a wedged
# process cannot be cleaned up from inside, so a hang must fail the test only.
# ---------------------------------------------------------------------------


def in_child(scenario: str, *args: str) -> dict:
    """Run ``scenario(*args)`` of this module in a fresh interpreter.

    Returns:
        The JSON the scenario printed; fails the test when the child hangs.
    """
    code = (
        "import json, sys, tests.test_runtime_interrupts as t; "
        f"print('RESULT', json.dumps(t.{scenario}(*sys.argv[1:])), flush=True)"
    )
    env = {**os.environ, **REPO_ENV}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=HANG,
            cwd=REPO_ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        pytest.fail(f"{scenario} hung for {HANG} s (the worker wedged): {tail!r}")
    assert done.returncode == 0, done.stderr[-5000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def issue_repro(log_file: str) -> dict:
    with (
        local_cluster(1, threads_per_worker=8) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(catalog.StructuredLogging(file=log_file))
        client.register_plugin(Watchdog(fail_after="200ms", interval="20ms"))
        futures = client.map(logging_loop, range(80))
        wait(futures, timeout=HANG - 30)
        counts = outcomes(futures)
        (threads,) = client.run(executor_threads_alive).values()
        with dask.annotate(catalog_timeout="none"):
            after = client.submit(logging_loop, 99, 0.05).result(timeout=30)
    return {**counts, "threads": threads, "after": after}


@pytest.mark.slow
def test_issue_repro_8_threads_logging_on_never_wedges(tmp_path):
    """#22: LocalCluster(processes=False, threads_per_worker=8), StructuredLogging
    to a file, Watchdog(fail_after=200ms, interval=20ms), 80 tasks that log in a
    loop for 1.5 s. On main the interrupt landed inside logging.Handler.handle
    with the handler lock held and the whole process froze."""
    log_file = tmp_path / "w.log"
    result = in_child("issue_repro", str(log_file))
    # Every task is accounted for: done, or failed with TaskTimeoutError.
    # How many are interrupted depends on how often a thread stands outside
    # logging at a check (rarely, in this loop): the point is that none wedges.
    assert result["done"] + result["timeout"] == 80, result
    # The worker lives: its threads, its event loop, and a new task.
    assert result["threads"] == [True] * 8
    assert result["after"] == 99
    assert "still looping" in log_file.read_text()


STRESS_QUEUE: queue.Queue = queue.Queue()
STRESS_LOCK = threading.Lock()
STRESS_LOG = logging.getLogger("tests.interrupts.stress")


def mixed_work(i: int) -> int:
    """Logging, queue and lock work in a loop until interrupted (or 0.3 s)."""
    deadline = time.perf_counter() + 0.3
    n = 0
    while time.perf_counter() < deadline:
        STRESS_LOG.info("work %d %d", i, n)
        STRESS_QUEUE.put(n)
        STRESS_QUEUE.get()
        STRESS_QUEUE.task_done()
        with STRESS_LOCK:
            n += 1
        spin(0.0005)
    return n


def watchdog_status(dask_worker) -> dict:
    return dask_worker.plugins["catalog.watchdog"].status()


def stress() -> dict:
    handler = logging.StreamHandler(io.StringIO())
    STRESS_LOG.addHandler(handler)
    STRESS_LOG.setLevel(logging.INFO)
    STRESS_LOG.propagate = False
    sys.setswitchinterval(1e-5)  # many more thread switches: many more races
    with (
        local_cluster(1, threads_per_worker=4) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(
            Watchdog(fail_after="20ms", warn_after=None, interval="5ms")
        )
        futures = client.map(mixed_work, range(400), pure=False)
        wait(futures, timeout=HANG - 30)
        counts = outcomes(futures)
        (status,) = client.run(watchdog_status).values()
        (threads,) = client.run(executor_threads_alive).values()
        after = client.submit(sum, [1, 2], pure=False).result(timeout=30)
    # No lock was left held: logging's, the queue's, the task's own.
    free = []
    for lock in (handler.lock, STRESS_QUEUE.mutex, STRESS_LOCK, logging._lock):
        free.append(lock.acquire(timeout=5))
        if free[-1]:
            lock.release()
    return {
        **counts,
        "counted": status["timeouts"],
        "threads": threads,
        "after": after,
        "free": free,
    }


@pytest.mark.slow
def test_hundreds_of_interrupts_into_logging_queue_and_lock_work():
    """A few hundred interrupts into tasks that log, use a queue and take a lock:
    no hang, every task accounted for, no lock left held, no thread lost."""
    result = in_child("stress")
    assert result["done"] + result["timeout"] == 400, result
    assert result["timeout"] >= 200, result
    assert result["counted"] == result["timeout"], result
    assert result["threads"] == [True] * 4
    assert result["after"] == 3
    assert result["free"] == [True] * 4
