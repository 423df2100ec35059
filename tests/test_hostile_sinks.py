"""Hostile sinks: unwritable directories, a full disk, a taken port, a dead gateway.

At setup the strict-mode rule applies; at run time the server keeps running
tasks, logs one ERROR per entry (not one per event) and shows the error in
``dask catalog status``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import subprocess
import threading

import dask.config
import pytest
from distributed import Client
from distributed.utils_test import captured_logger

import catalog
from catalog._entry import EntrySetupError
from catalog._status import status
from tests.procs import (
    LOOPBACK,
    Proc,
    dask_command,
    local_cluster,
    scheduler_command,
    worker_command,
)

# -- helpers -------------------------------------------------------------------


EVENTS_LIMIT = 2_000


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def under_a_file(tmp_path) -> str:
    """A directory path that cannot be created, even by root: its parent is a file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    return str(blocker / "sub")


def file_size_limit(limit: int):
    """A preexec_fn: writes past ``limit`` bytes fail with EFBIG, as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def start(procs, args: list[str], name: str, limit: int | None = None, env=None):
    """Like ``procs.start``, with an optional file-size limit on the process."""
    log_path = str(procs.tmp_path / f"{name}-{len(procs.started)}.log")
    # Output goes through a pipe (the size limit does not apply to pipes) and a
    # thread of this process copies it to the log file.
    popen = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=str(procs.tmp_path),
        start_new_session=True,
        preexec_fn=file_size_limit(limit) if limit else None,
    )

    def copy() -> None:
        with open(log_path, "ab", buffering=0) as log:
            for line in popen.stdout:
                log.write(line)

    open(log_path, "wb").close()
    threading.Thread(target=copy, daemon=True).start()
    proc = Proc(args, popen, log_path, env or {})
    procs.started.append(proc)
    return proc


def valid_json_lines(path: str) -> list[dict]:
    """Every complete line parses; only a last line without newline may be cut."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    records = [json.loads(line) for line in complete if line]
    if tail:
        with pytest.raises(ValueError):
            json.loads(tail)
    return records


def catalog_errors(output: str, entry: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if " ERROR " in line and f"catalog entry {entry!r}" in line
    ]


# -- setup: the strict-mode rule --------------------------------------------------


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: catalog.Tracer(dir=d), "'tracer'"),
        (lambda d: catalog.StructuredLogging(file=f"{d}/w.log"), "'logging'"),
        (lambda d: catalog.EventLog(file=f"{d}/events.jsonl"), "'events'"),
        (lambda d: catalog.SchedulerTracer(dir=d), "'tracer'"),
    ],
)
def test_unwritable_directory_is_a_strict_setup_failure(tmp_path, make, words):
    path = under_a_file(tmp_path)
    plugin = make(path)
    with local_cluster() as cluster, Client(cluster) as client:
        with captured_logger("catalog", level=logging.ERROR) as log:
            with pytest.raises(EntrySetupError) as info:
                client.register_plugin(plugin)
        assert words in str(info.value) and "could not set up" in str(info.value)
        assert "blocker" in str(info.value)
        assert "refusing to start" in log.getvalue()
        # The cluster itself is unharmed.
        assert client.submit(sum, [1, 2]).result() == 3


def test_unwritable_directory_without_strict_is_one_error_and_shown(tmp_path):
    path = under_a_file(tmp_path)
    with (
        dask.config.set({"catalog.strict": False}),
        local_cluster(2) as cluster,
        Client(cluster) as client,
        captured_logger("catalog", level=logging.ERROR) as log,
    ):
        client.register_plugin(catalog.Tracer(dir=path))
        assert sum(client.gather(client.map(abs, range(-50, 0)))) == 1275
        data = status(client)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines  # one per worker
    assert all("going on without it" in line for line in lines)
    for info in data["workers"].values():
        tracer = info["entries"]["tracer"]
        assert tracer["active"] is False and "blocker" in tracer["last_error"]


def test_port_in_use_without_strict_is_shown_in_status():
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            dask.config.set({"catalog.strict": False}),
            local_cluster() as cluster,
            Client(cluster) as client,
        ):
            client.register_plugin(catalog.Metrics(port=port))
            assert client.submit(sum, [1, 2]).result() == 3
            (info,) = status(client)["workers"].values()
    metrics = info["entries"]["metrics"]
    assert metrics["active"] is False
    assert f"{LOOPBACK}:{port}" in metrics["last_error"]
    assert "--metrics-port" in metrics["last_error"]


# -- run time: a full disk ---------------------------------------------------------


def test_full_disk_at_run_time_is_one_error_and_work_goes_on(tmp_path):
    """/dev/full accepts the open and fails every write with ENOSPC."""
    with (
        local_cluster() as cluster,
        Client(cluster) as client,
        captured_logger("catalog", level=logging.ERROR) as log,
    ):
        client.register_plugin(catalog.EventLog(file="/dev/full"))
        client.register_plugin(catalog.Tracer(dir=str(tmp_path)))
        # The tracer's file is swapped for /dev/full after a good setup.
        fd = os.open("/dev/full", os.O_WRONLY)

        def fill_up(dask_worker, fd=fd):
            trace_file = dask_worker.plugins["catalog.tracer"]._file
            os.dup2(fd, trace_file._fd)

        client.run(fill_up)
        os.close(fd)
        for batch in range(5):
            futures = client.map(lambda x: x * 2, range(40), key=f"double-{batch}")
            assert client.gather(futures) == [x * 2 for x in range(40)]
        client.run(
            lambda dask_worker: dask_worker.plugins["catalog.tracer"]._file.flush()
        )
        data = status(client)
    events = data["scheduler"]["entries"]["events"]
    (worker,) = data["workers"].values()
    tracer = worker["entries"]["tracer"]
    assert events["errors"] >= 5 and "No space left on device" in events["last_error"]
    assert tracer["errors"] >= 1 and "No space left on device" in tracer["last_error"]
    lines = log.getvalue().splitlines()
    assert len([line for line in lines if "'events'" in line]) == 1, lines
    assert len([line for line in lines if "'tracer'" in line]) == 1, lines


@pytest.mark.slow
def test_real_processes_with_full_disk_taken_port_and_dead_gateway(procs, tmp_path):
    """A file-size limit on the scheduler and a worker; a worker that goes on.

    scheduler: events file, 2 kB file-size limit;
    worker A: tracer dir + Pushgateway on a closed port, 200 kB file-size limit;
    worker B: catalog.strict false, metrics port taken, tracer dir unwritable;
    worker C: the same tracer dir with catalog.strict true: it refuses to start.
    """
    events = tmp_path / "events.jsonl"
    trace = tmp_path / "trace"
    scheduler = start(
        procs,
        scheduler_command("--preload", "catalog.events", "--events-file", str(events)),
        "scheduler",
        limit=EVENTS_LIMIT,
    )
    addr = scheduler.wait_for(r"Scheduler at:\s+(tcp://[\d.]+:\d+)").group(1)
    worker = worker_command(addr, "--nthreads", "1")
    full = start(
        procs,
        [
            *worker,
            "--name",
            "full",
            "--preload",
            "catalog",
            "--enable",
            "tracer,metrics",
            "--tracer-dir",
            str(trace),
            "--tracer-flush-interval",
            "100ms",
            "--metrics-pushgateway",
            f"http://{LOOPBACK}:{closed_port()}",
            "--metrics-push-interval",
            "100ms",
        ],
        "worker-full",
        limit=200_000,
    )
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        lax = start(
            procs,
            [
                *worker,
                "--name",
                "lax",
                "--preload",
                "catalog",
                "--enable",
                "tracer,metrics",
                "--metrics-port",
                str(taken.getsockname()[1]),
                "--tracer-dir",
                under_a_file(tmp_path),
            ],
            "worker-lax",
            env={"DASK_CATALOG__STRICT": "false"},
        )
        strict = start(
            procs,
            [
                *(*worker, "--name", "strict", "--preload", "catalog.tracer"),
                *("--tracer-dir", under_a_file(tmp_path)),
            ],
            "worker-strict",
        )
        full.wait_for("Registered to:", timeout=60)
        lax.wait_for("Registered to:", timeout=60)
        # The same sink failure with catalog.strict true (the default): refused.
        assert strict.popen.wait(60) != 0, strict.output
        assert "Registered to:" not in strict.output
        assert "catalog entry 'tracer' could not set up" in strict.output
        assert "refusing to start" in strict.output
        with Client(addr, timeout="30s") as client:
            for batch in range(10):
                # Each graph is an event; each task a few trace lines.
                futures = client.map(
                    lambda x: x + 1,
                    range(400),
                    key=[f"inc-{batch}-{i}" for i in range(400)],
                )
                assert sum(client.gather(futures)) == sum(range(1, 401))
            assert len(client.scheduler_info()["workers"]) == 2
        result = subprocess.run(
            [*dask_command(), "catalog", "status", addr, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_name = {}
    for info in data["workers"].values():
        by_name["lax" if not info["entries"]["tracer"]["active"] else "full"] = info
    ev = data["scheduler"]["entries"]["events"]
    assert ev["active"] and ev["errors"] >= 1 and "File too large" in ev["last_error"]
    tracer = by_name["full"]["entries"]["tracer"]
    assert tracer["errors"] >= 1 and "File too large" in tracer["last_error"]
    metrics = by_name["full"]["entries"]["metrics"]
    assert metrics["errors"] >= 2 and "push to" in metrics["last_error"]
    for entry in ("tracer", "metrics"):
        assert by_name["lax"]["entries"][entry]["active"] is False
        assert "could not set up" in by_name["lax"]["entries"][entry]["last_error"]

    # One ERROR line per entry and process, however many writes failed.
    assert len(catalog_errors(full.output, "tracer")) == 1, full.output
    assert len(catalog_errors(full.output, "metrics")) == 1, full.output
    assert len(catalog_errors(scheduler.output, "events")) == 1, scheduler.output
    assert len(catalog_errors(lax.output, "metrics")) == 1, lax.output
    assert "going on without it" in lax.output

    # The files stop at the limit, valid up to their last complete line.
    assert 0 < events.stat().st_size <= EVENTS_LIMIT
    assert valid_json_lines(str(events))
    (trace_file,) = trace.iterdir()
    assert 0 < trace_file.stat().st_size <= 200_000
    assert valid_json_lines(str(trace_file))
