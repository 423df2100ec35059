"""A non-editable install works: package data, entry points, version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_non_editable_install_ships_yaml_and_cli(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    assert (target / "catalog" / "catalog.yaml").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import catalog, dask.config; "
        f"assert catalog.__file__.startswith({str(target)!r}), catalog.__file__; "
        "assert dask.config.get('catalog.tracer.capacity') == 1000000; "
        "print(catalog.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() != "0.0.0+unknown"
    listing = subprocess.run(
        [sys.executable, "-m", "dask", "catalog", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    assert "watchdog" in listing.stdout
