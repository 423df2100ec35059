"""The compatibility job's own parts: the outcome plugin, the verdict, its CLI.

The job itself (distributed's tests, bare and with the catalog) runs as a step
of ``.ci/run``; these tests keep its pieces honest without running it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def load_compat():
    spec = importlib.util.spec_from_file_location("compat", BENCHMARKS / "compat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compat = load_compat()

SAMPLE = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup fails")

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown fails")

def test_passes():
    pass

def test_fails():
    assert False

def test_setup_error(broken):
    pass

def test_teardown_error(bad_teardown):
    pass

@pytest.mark.skip(reason="no")
def test_skipped():
    pass

@pytest.mark.xfail(reason="known")
def test_xfails():
    assert False
"""


def test_outcome_plugin_records_every_kind_of_outcome(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(SAMPLE))
    out = tmp_path / "outcomes.json"
    env = {
        **os.environ,
        "CATALOG_COMPAT_OUTCOMES": str(out),
        "PYTHONPATH": str(BENCHMARKS),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "compat_outcomes"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout
    data = json.loads(out.read_text())
    assert data["exitstatus"] == 1
    assert data["outcomes"] == {
        "test_sample.py::test_passes": "passed",
        "test_sample.py::test_fails": "failed",
        "test_sample.py::test_setup_error": "error",
        "test_sample.py::test_teardown_error": "error",
        "test_sample.py::test_skipped": "skipped",
        "test_sample.py::test_xfails": "xfailed",
    }


@pytest.mark.parametrize(
    ("bare", "catalog", "expected"),
    [
        (0, 3, "difference"),
        (0, 2, "difference"),
        (1, 3, "difference"),
        (0, 1, "flaky"),
        (2, 2, "flaky"),
        (3, 3, "flaky"),
        (0, 0, "flaky"),
    ],
)
def test_verdict_needs_two_catalog_failures_more_than_bare(bare, catalog, expected):
    assert compat.verdict(bare, catalog) == expected


def test_catalog_pass_preloads_every_entry_everywhere(tmp_path):
    env = compat.catalog_env(str(tmp_path))
    for server in ("SCHEDULER", "WORKER", "NANNY"):
        assert json.loads(env[f"DASK_DISTRIBUTED__{server}__PRELOAD"]) == ["catalog"]
    import catalog

    assert sorted(json.loads(env["DASK_CATALOG__ENABLE"])) == sorted(
        catalog.ENTRY_MODULES
    )
    assert len(catalog.ENTRY_MODULES) >= 11
    assert env["DASK_CATALOG__TRACER__DIR"] == str(tmp_path)


def test_missing_tests_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compat.main(["--tests", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--tests {tmp_path / 'nowhere'}" in err
    assert "checkout of dask/distributed" in err


def reliability_commands() -> list[list[str]]:
    """``python benchmarks/compat.py ...`` lines of the Reliability page."""
    text = (ROOT / "docs" / "reliability.md").read_text().replace("\\\n", " ")
    return [
        shlex.split(m.group(1))
        for m in re.finditer(r"^\s*python benchmarks/compat\.py(.*)$", text, re.M)
    ]


def test_reliability_page_commands_parse():
    commands = reliability_commands()
    assert len(commands) >= 3, "docs/reliability.md shows its compat.py commands"
    for argv in commands:
        args = compat.build_parser().parse_args(argv)
        assert args.set in compat.SETS


def test_catalog_pass_settings_are_options_that_parse(tmp_path):
    # Each setting the job adds names a real option with a value it accepts: a
    # renamed option would otherwise leave its entry idle without a word.
    import importlib

    import dask.config

    env = compat.catalog_env(str(tmp_path), str(tmp_path / "e.jsonl"), "http://x:1")
    assert env["DASK_CATALOG__EVENTS__FILE"] == str(tmp_path / "e.jsonl")
    assert env["DASK_CATALOG__OTEL__ENDPOINT"] == "http://x:1"
    given = dask.config.collect_env(
        {k: v for k, v in env.items() if k.startswith("DASK_CATALOG__")}
    )["catalog"]
    given.pop("enable")
    assert set(given) == {"tracer", "events", "otel", "recycle"}
    for entry, options in given.items():
        spec = importlib.import_module(f"catalog.{entry}").ENTRY
        for name, value in options.items():
            option = spec.option(name)
            option.parse(value, spec.env_var(option))


def test_otlp_sink_accepts_an_export():
    import urllib.request

    sink = compat.OtlpSink()
    try:
        request = urllib.request.Request(
            f"{sink.endpoint}/v1/traces", data=b"\x0a\x00", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        assert (sink.requests, sink.bytes) == (1, 2)
    finally:
        sink.close()
