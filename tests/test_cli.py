"""`dask catalog` and `python -m catalog`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import catalog
from catalog.cli import main
from tests.procs import dask_command


def test_list_names_every_entry_with_where_it_runs():
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    for name in catalog.ENTRY_MODULES:
        assert f"\n{name} " in result.output
    assert "worker" in result.output and "scheduler" in result.output


def test_show_gives_all_five_spellings():
    result = CliRunner().invoke(main, ["show", "tracer"])
    assert result.exit_code == 0, result.output
    for text in [
        "--tracer-capacity",
        "catalog.Tracer(capacity=...)",
        "catalog.tracer.capacity",
        "DASK_CATALOG__TRACER__CAPACITY",
        "default      1000000",
        "--preload catalog --enable tracer",
        "client.register_plugin(catalog.Tracer())",
    ]:
        assert text in result.output


def test_show_unknown_entry_exits_2_with_the_valid_names():
    result = CliRunner().invoke(main, ["show", "tracr"])
    assert result.exit_code == 2
    assert "'tracr' is not one of" in result.output
    for name in catalog.ENTRY_MODULES:
        assert name in result.output


def test_dask_cli_entry_point_and_python_m_agree():
    via_dask = subprocess.run(
        [*dask_command(), "catalog", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    via_module = subprocess.run(
        [sys.executable, "-m", "catalog", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert via_dask.returncode == 0, via_dask.stderr
    assert via_module.returncode == 0, via_module.stderr
    assert via_dask.stdout == via_module.stdout
    assert "tracer" in via_dask.stdout


def run_catalog(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `python -m catalog ...`, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "catalog", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_usage_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, an `Error:` line with ``words``, and no traceback."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    for word in words:
        assert word in errors[0], out
    assert "Traceback" not in out, out


def test_status_bad_timeout_is_a_usage_error():
    result = run_catalog("status", "tcp://127.0.0.1:1", "--timeout", "foo")
    assert_usage_error(result, "'--timeout'", "'foo'", "duration")


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("foo", "missing port"),
        ("ftp://127.0.0.1:1", "unknown address scheme"),
        ("127.0.0.1:notaport", "notaport"),
        ("tcp://127.0.0.1:99999", "out of range"),
    ],
)
def test_status_malformed_address_is_a_usage_error(address, words):
    result = run_catalog("status", address, "--timeout", "2s")
    assert_usage_error(result, "'ADDRESS'", repr(address), words)


def test_status_unreachable_scheduler_is_one_error_line():
    result = run_catalog("status", "tcp://127.0.0.1:1", "--timeout", "1s")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert out.startswith("Error: cannot reach the scheduler at tcp://127.0.0.1:1")
    assert "Traceback" not in out, out


def test_trace_merge_names_the_file_and_line_of_a_bad_record(tmp_path):
    good = {"type": "span", "kind": "compute", "key": "a-1", "start": 1, "stop": 2}
    lines = [{"type": "process", "role": "worker", "address": "w"}, good]
    lines.append({"type": "span", "kind": "compute", "key": "a-2", "start": 3})
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = run_catalog("trace", "merge", str(tmp_path), "-o", str(tmp_path / "t"))
    assert_usage_error(result, "'DIRECTORY'", "w.jsonl, line 3", "'stop'")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[1, 2]", "traceEvents"),
        ('{"traceEvents": 5}', "traceEvents"),
        ('{"traceEvents": [7]}', "traceEvents[0]"),
        ('{"traceEvents": [{"ph": "X", "cat": "compute", "name": "a"}]}', "'dur'"),
        ("not json", "Expecting value"),
    ],
)
def test_trace_summary_refuses_what_is_not_a_trace(tmp_path, text, words):
    path = tmp_path / "trace.json"
    path.write_text(text)
    result = run_catalog("trace", "summary", str(path))
    assert_usage_error(result, "'FILE'", "not a Chrome trace", words)
