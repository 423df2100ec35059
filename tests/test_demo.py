"""`dask catalog demo`, run as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.procs import dask_command

#: Stands in for numpy where the demo runs: a bare `pip install .` has none
#: (numpy is only in the test extra), and neither may the demo need it.
NO_NUMPY = (
    "raise ModuleNotFoundError(\"No module named 'numpy' (blocked: the demo must run "
    "on a bare install)\", name='numpy')\n"
)


def without_numpy(tmp_path) -> dict[str, str]:
    """An environment where `import numpy` fails, in every process started in it."""
    blocker = tmp_path / "no-numpy"
    (blocker / "numpy").mkdir(parents=True)
    (blocker / "numpy" / "__init__.py").write_text(NO_NUMPY)
    path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.slow
def test_demo_runs_every_entry_and_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    env = without_numpy(tmp_path)
    check = subprocess.run(
        [sys.executable, "-c", "import numpy"], env=env, capture_output=True, text=True
    )
    assert "No module named 'numpy'" in check.stderr  # the blocker blocks
    result = subprocess.run(
        [*dask_command(), "catalog", "demo", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    # The guard stopped the hog, the failing task failed, both named.
    assert "memory_hog: TaskMemoryLimitExceeded" in text
    assert "failing_step: ValueError: demo failure number 1" in text
    # The summary table: one row per prefix with tasks, durations, peak, errors.
    header = next(line for line in text.splitlines() if line.startswith("prefix"))
    assert header.split() == [
        "prefix",
        "tasks",
        "mean",
        "p95",
        "peak",
        "memory",
        "errors",
    ]
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["slow_step"][1] == "3"
    assert rows["memory_hog"][-1] == "1" and rows["failing_step"][-1] == "1"

    trace = json.loads((out / "trace.json").read_text())
    assert any(
        e["ph"] == "X" and e["name"] == "slow_step" for e in trace["traceEvents"]
    )
    events = [
        json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()
    ]
    names = [e["event"] for e in events]
    assert "worker-added" in names and "task-erred" in names
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert any(
        r["logger"] == "catalog.watchdog" and r["level"] == "warning" for r in logs
    )
    assert any(r["logger"] == "catalog.memory" for r in logs)
    metrics = (out / "metrics.txt").read_text()
    assert "dask_catalog_tasks_total{" in metrics
    assert "dask_catalog_scheduler_tasks_total{" in metrics
    assert "dask_catalog_memory_actions_total{" in metrics
    for name in ("trace.json", "events.jsonl", "logs.jsonl", "metrics.txt"):
        assert str(out / name) in text


@pytest.mark.slow
def test_demo_keep_alive_prints_urls_until_ctrl_c(tmp_path):
    stderr = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "catalog",
            "demo",
            "--output",
            str(tmp_path / "d"),
            "--workers",
            "1",
            "--enable",
            "metrics,tracer",
            "--keep-alive",
        ],
        stdout=subprocess.PIPE,
        stderr=stderr.open("w"),
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "until Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "Scheduler /metrics: http://127.0.0.1:" in text
        assert "Worker /metrics:    http://127.0.0.1:" in text
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.read_text()[-5000:]
        assert "Stopping." in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_demo_unknown_entry_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "catalog", "demo", "--enable", "tracer,bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "'bogus'" in result.stderr and "--enable" in result.stderr
