"""Tests of catalog.status and `dask catalog status`: unit, in-process, processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import textwrap
import time

import dask.config
import pytest
from click.testing import CliRunner
from distributed import Client
from distributed.utils_test import captured_logger

import catalog
from catalog._status import NOT_INSTALLED, _as_status, local_status, status, status_text
from catalog.cli import main
from tests.procs import LOOPBACK, dask_command, local_cluster

# -- helpers -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


#: A sitecustomize that makes `import catalog` fail, as on a server where the
#: catalog is not installed (the venv's editable install would find it otherwise).
WITHOUT_CATALOG = textwrap.dedent(
    """
    import sys

    class _NoCatalog:
        def find_spec(self, name, path=None, target=None):
            if name == "catalog" or name.startswith("catalog."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoCatalog())
    """
)


def env_without_catalog(tmp_path) -> dict[str, str]:
    site = tmp_path / "no-catalog"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(WITHOUT_CATALOG)
    return {"PYTHONPATH": str(site)}


def assert_stops_quickly(procs) -> None:
    """SIGTERM every process, workers first; each exits within 10 seconds."""
    slow = []
    for proc in reversed(procs.started):
        began = time.monotonic()
        proc.stop(signal.SIGTERM, timeout=10)
        took = time.monotonic() - began
        if took >= 10:
            slow.append((proc.args[1:3], round(took, 1), proc.output[-3000:]))
    assert not slow, slow


# -- unit ----------------------------------------------------------------------


def test_local_status_of_a_server_without_entries():
    class Server:
        pass

    out = local_status(Server())
    assert out == {"catalog": catalog.__version__, "entries": {}}


def test_as_status_names_a_missing_catalog_and_keeps_other_causes():
    missing = _as_status(ModuleNotFoundError("No module named 'catalog'"))
    assert missing == {"catalog": None, "entries": {}, "error": NOT_INSTALLED}
    wrapped = _as_status(
        Exception("ModuleNotFoundError(\"No module named 'catalog'\")")
    )
    assert wrapped["error"] == NOT_INSTALLED
    other = _as_status(RuntimeError("boom"))
    assert other["error"] == "RuntimeError: boom"
    # An error that merely mentions the catalog is shown as it is.
    named = _as_status(RuntimeError("catalog entry 'tracer' is confused"))
    assert named["error"] == "RuntimeError: catalog entry 'tracer' is confused"
    assert _as_status({"catalog": "1", "entries": {}}) == {
        "catalog": "1",
        "entries": {},
    }


def test_status_text_shows_every_state():
    data = {
        "scheduler": {
            "address": "tcp://127.0.0.1:1",
            "catalog": "9.9",
            "entries": {
                "events": {
                    "active": False,
                    "options": {"file": "/x"},
                    "last_error": "writing /x: OSError: [Errno 28]",
                    "errors": 3,
                }
            },
        },
        "workers": {
            "tcp://127.0.0.1:2": {"catalog": "9.9", "entries": {}},
            "tcp://127.0.0.1:3": {"catalog": None, "entries": {}, "error": "gone"},
        },
        "nannies": {},
    }
    text = status_text(data)
    assert "scheduler tcp://127.0.0.1:1  (catalog 9.9)" in text
    assert "events    INACTIVE file='/x'" in text
    assert "last error (3): writing /x: OSError: [Errno 28]" in text
    assert "worker tcp://127.0.0.1:2  (catalog 9.9)\n  no catalog entry active" in text
    assert "worker tcp://127.0.0.1:3  (catalog -)\n  gone" in text


def test_facade_status_is_the_function():
    from catalog import _status

    assert catalog.status is status is _status.status
    assert catalog.status_text is status_text


def test_cli_unreachable_scheduler_is_a_clear_error():
    result = CliRunner().invoke(
        main, ["status", f"tcp://{LOOPBACK}:{closed_port()}", "--timeout", "1s"]
    )
    assert result.exit_code == 1
    assert "cannot reach the scheduler" in result.output


# -- in-process cluster --------------------------------------------------------


def test_status_lists_entries_options_secrets_and_errors(tmp_path):
    with (
        local_cluster(2) as cluster,
        Client(cluster) as client,
        captured_logger("catalog", level=logging.ERROR) as log,
    ):
        client.register_plugin(catalog.EventLog(file=str(tmp_path / "events.jsonl")))
        client.register_plugin(catalog.Tracer(capacity=100))
        client.register_plugin(
            catalog.WorkerEnvironment(set=["PLAIN=1", "API_TOKEN=hunter2"])
        )
        # A run-time sink failure: an unreachable Pushgateway.
        client.register_plugin(
            catalog.Metrics(
                pushgateway=f"http://{LOOPBACK}:{closed_port()}",
                push_interval="50ms",
            )
        )
        assert client.submit(sum, [1, 2]).result() == 3

        def errors_counted(dask_worker):
            plugin = dask_worker.plugins["catalog.metrics"]
            return plugin.errors

        end = time.monotonic() + 60
        while min(client.run(errors_counted).values()) < 2:
            assert time.monotonic() < end
            time.sleep(0.05)

        data = status(client)
        text = status_text(data)
        addresses = set(client.scheduler_info()["workers"])

    # Plain JSON, no objects of distributed.
    assert json.loads(json.dumps(data)) == json.loads(json.dumps(data, default=str))
    sched = data["scheduler"]
    assert sched["catalog"] == catalog.__version__
    assert sched["address"].startswith("tcp://127.0.0.1:")
    assert sched["entries"]["events"]["active"] is True
    assert sched["entries"]["events"]["options"]["file"].endswith("events.jsonl")
    assert set(data["workers"]) == addresses and len(addresses) == 2
    for info in data["workers"].values():
        assert info["catalog"] == catalog.__version__
        assert set(info["entries"]) == {"tracer", "env", "metrics"}
        assert info["entries"]["tracer"]["options"]["capacity"] == 100
        assert info["entries"]["env"]["options"]["set"] == ["PLAIN=1", "API_TOKEN=****"]
        metrics = info["entries"]["metrics"]
        assert metrics["active"] is True
        assert metrics["errors"] >= 2
        assert "push to http://127.0.0.1:" in metrics["last_error"]
    assert data["nannies"] == {}
    assert "hunter2" not in json.dumps(data) and "hunter2" not in text
    assert "last error (" in text and "push to http://127.0.0.1:" in text
    # One ERROR line per entry and server, not one per failed push.
    pushes = [r for r in log.getvalue().splitlines() if "'metrics'" in r]
    assert len(pushes) == 2, log.getvalue()


def test_status_shows_an_entry_that_could_not_set_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with (
        dask.config.set({"catalog.strict": False}),
        local_cluster(1) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(catalog.Tracer(dir=str(blocker / "trace")))
        assert client.submit(sum, [1, 2]).result() == 3
        data = status(client)
    (info,) = data["workers"].values()
    tracer = info["entries"]["tracer"]
    assert tracer["active"] is False
    assert "could not set up" in tracer["last_error"]
    assert "INACTIVE" in status_text(data)


# -- real processes ------------------------------------------------------------


@pytest.mark.slow
def test_cli_status_of_a_mixed_cluster(procs, tmp_path):
    """Scheduler and one worker with entries, one worker without the catalog."""
    _, addr = procs.scheduler(
        "--preload", "catalog.events", "--events-file", str(tmp_path / "ev.jsonl")
    )
    with_catalog = procs.worker(
        addr,
        "--nthreads",
        "1",
        "--name",
        "with",
        "--preload",
        "catalog",
        "--enable",
        "tracer,watchdog",
        "--watchdog-warn-after",
        "1m",
        wait=False,
    )
    without = procs.worker(
        addr,
        "--nthreads",
        "1",
        "--name",
        "without",
        env=env_without_catalog(tmp_path),
        wait=False,
    )
    with_catalog.wait_for("Registered to:", timeout=60)
    without.wait_for("Registered to:", timeout=60)

    run = [*dask_command(), "catalog", "status", addr]
    table = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    as_json = subprocess.run(
        [*run, "--json"], capture_output=True, text=True, timeout=60
    )
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)

    assert data["scheduler"]["entries"]["events"]["active"] is True
    by_state = {
        info.get("error"): info for info in data["workers"].values()
    }  # None for the worker with the catalog
    assert set(by_state) == {None, NOT_INSTALLED}, data["workers"]
    assert set(by_state[None]["entries"]) == {"tracer", "watchdog"}
    assert by_state[None]["entries"]["watchdog"]["options"]["warn_after"] == 60.0
    assert by_state[NOT_INSTALLED]["catalog"] is None
    assert NOT_INSTALLED in table.stdout
    assert "  watchdog  active   " in table.stdout
    assert "  events    active   " in table.stdout
    assert_stops_quickly(procs)


@pytest.mark.slow
def test_cli_status_of_a_scheduler_without_the_catalog(procs, tmp_path):
    env = env_without_catalog(tmp_path)
    _, addr = procs.scheduler(env=env)
    procs.worker(addr, "--nthreads", "1", env=env)
    result = subprocess.run(
        [*dask_command(), "catalog", "status", addr, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["scheduler"]["error"] == NOT_INSTALLED
    (worker,) = data["workers"].values()
    assert worker["error"] == NOT_INSTALLED
    assert_stops_quickly(procs)


def _prefixed(i: int) -> int:
    return i


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_entry_that_grows_with_work_shows_its_memory(tmp_path):
    # Issue #22 point 12: the footprint of each entry, by its own count.
    with local_cluster(1) as cluster, Client(cluster) as client:
        client.register_plugin(catalog.Metrics())
        client.register_plugin(catalog.Tracer())
        client.register_plugin(catalog.MemoryGuard())
        client.register_plugin(catalog.Watchdog())
        client.register_plugin(catalog.EventLog(file=str(tmp_path / "events.jsonl")))
        futures = [
            client.submit(_prefixed, i, key=f"p{i % 50}-{i}") for i in range(500)
        ]
        client.gather(futures)
        data = status(client)
        (worker,) = data["workers"].values()
        memory = {name: entry["memory"] for name, entry in worker["entries"].items()}
        memory["events"] = data["scheduler"]["entries"]["events"]["memory"]
        for name in ("metrics", "tracer", "memory", "watchdog", "events"):
            assert isinstance(memory[name], int) and memory[name] > 0, (name, memory)
        # 50 prefixes of per-prefix figures: more than a handful of bytes each.
        assert memory["memory"] > 50 * 50
        text = status_text(data)
        assert text.count("holds ") >= 5, text
