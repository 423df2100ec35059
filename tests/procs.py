"""Real `dask scheduler` / `dask worker` processes, started as a user types them.

Everything binds to 127.0.0.1: tests never target any other address.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"

#: The repository root, and the environment that lets `dask` processes unpickle
#: functions defined in the tests (pickled by reference to `tests.<module>`).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ENV = {
    "PYTHONPATH": os.pathsep.join(
        filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])
    )
}


def by_value(func: Callable) -> Callable:
    """A copy of a test function that cloudpickle sends by value.

    Real dask processes run in the test's ``tmp_path`` and cannot import
    ``tests``; cloudpickle sends a function of ``__main__`` by value, with the
    modules it uses by reference.
    """
    copy = types.FunctionType(
        func.__code__,
        func.__globals__,
        func.__name__,
        func.__defaults__,
        func.__closure__,
    )
    copy.__module__ = "__main__"
    copy.__qualname__ = func.__qualname__
    return copy


def local_cluster(n_workers: int = 1, processes: bool = False, **kwargs: Any) -> Any:
    """A LocalCluster on loopback; in-process clusters need the tcp protocol."""
    from distributed import LocalCluster

    if not processes:
        kwargs.setdefault("protocol", "tcp")
    kwargs.setdefault("threads_per_worker", 1)
    return LocalCluster(
        n_workers=n_workers,
        processes=processes,
        host=LOOPBACK,
        dashboard_address=f"{LOOPBACK}:0",
        **kwargs,
    )


def scheduler_command(*extra: str) -> list[str]:
    """`dask scheduler` on loopback with a free port."""
    return [
        *dask_command(),
        "scheduler",
        "--host",
        LOOPBACK,
        "--port",
        "0",
        "--dashboard-address",
        f"{LOOPBACK}:0",
        *extra,
    ]


def worker_command(address: str, *extra: str) -> list[str]:
    """`dask worker ADDRESS` on loopback."""
    return [
        *dask_command(),
        "worker",
        address,
        "--host",
        LOOPBACK,
        "--dashboard-address",
        f"{LOOPBACK}:0",
        *extra,
    ]


def dask_command() -> list[str]:
    """The `dask` CLI of this interpreter's environment."""
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "dask"]


def require_binary(name: str) -> str:
    """Path of an external binary; skip without it, but fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@dataclass
class Proc:
    """A running dask process whose stderr is collected in a file."""

    args: list[str]
    popen: subprocess.Popen
    log_path: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        """Wait until the output matches ``pattern``; fail with the output if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output)
            if found:
                return found
            if self.popen.poll() is not None:
                found = re.search(pattern, self.output)
                if found:
                    return found
                pytest.fail(
                    f"{self.args} exited {self.popen.returncode} "
                    f"before {pattern!r}:\n{self.output}"
                )
            time.sleep(0.1)
        pytest.fail(f"{self.args}: no {pattern!r} within {timeout}s:\n{self.output}")

    def send(self, sig: int) -> None:
        """Send a signal if the process still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the process to end by itself; fail with its output if it does not.

        For a ``--no-nanny`` worker closed through the scheduler: on distributed
        2026.8.0 such a worker sometimes never exits after SIGTERM (``asyncio.run``
        cancels the scheduler-stream task, whose ``finally`` awaits
        ``Worker.close``, which sometimes never finishes; seen about once in 15
        stops, with or without the catalog). Tests that need a clean
        exit status from a ``--no-nanny`` worker therefore close it with
        ``client.retire_workers`` and wait here.
        """
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.args} still runs after {timeout}s:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` and wait; SIGKILL after ``timeout``. Returns the exit status."""
        self.send(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)


class Procs:
    """Starts processes and stops all of them at the end of a test."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proc] = []

    def start(
        self, args: Sequence[str], env: dict[str, str] | None = None, name: str = "proc"
    ) -> Proc:
        log_path = str(self.tmp_path / f"{name}-{len(self.started)}.log")
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=str(self.tmp_path),
                start_new_session=True,
            )
        proc = Proc(list(args), popen, log_path, env or {})
        self.started.append(proc)
        return proc

    def scheduler(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> tuple[Proc, str]:
        """`dask scheduler --host 127.0.0.1 --port 0 ...` and its address."""
        proc = self.start(
            scheduler_command(*extra),
            env=env,
            name="scheduler",
        )
        found = proc.wait_for(r"Scheduler at:\s+(tcp://[\d.]+:\d+)")
        return proc, found.group(1)

    def worker(
        self,
        address: str,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        """`dask worker ADDRESS --host 127.0.0.1 ...`; waits until it registered."""
        proc = self.start(worker_command(address, *extra), env=env, name="worker")
        if wait:
            proc.wait_for(r"Registered to:")
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.started):
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)


@pytest.fixture
def procs(tmp_path) -> Iterator[Procs]:
    """Start real dask processes in a test; all are stopped at its end."""
    p = Procs(tmp_path)
    yield p
    p.stop_all()
