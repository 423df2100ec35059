"""`dask catalog` and `python -m catalog`."""

from __future__ import annotations

import subprocess
import sys

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
