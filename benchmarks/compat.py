"""Compatibility job: distributed's own tests, bare and with every catalog entry on.

distributed's wheel and sdist do not ship its tests; get them from a checkout of
dask/distributed at the tag matching the installed version (the folder holding
``conftest.py`` and ``distributed/tests/``), then:

    python benchmarks/compat.py --set short              # a few minutes (CI)
    python benchmarks/compat.py --set full --out /tmp/compat-full   # ~40 min, 2 cores
    python benchmarks/compat.py --tests ~/src/distributed \
        distributed/tests/test_nanny.py

The folder is copied to a temporary directory first (it may be read-only), and the
suite's TLS certificates are copied next to the installed ``distributed`` package,
where ``distributed.utils_test.get_cert`` looks for them.

Each chosen test runs twice: bare, and with the umbrella preload ``catalog`` on the
scheduler, the workers and the nannies, every entry of the registry enabled (all
11: env, logging, metrics, tracer, memory, watchdog, events, recycle, oom,
dashboard, otel), each doing real work (``SETTINGS``: the tracer and events
entries write files, otel exports to a sink on loopback, recycle counts tasks
against a limit no test reaches). A test that passed
bare and failed (or errored) with the catalog is a candidate; each candidate is run
again 3 times each way, interleaved. It is a *difference* when at least 2 of its 3
catalog reruns fail and the catalog reruns fail more often than the bare ones;
otherwise it is reported as flaky. The exit status is 1 when there is a difference,
when a pass ran no test, or when the catalog pass wrote no trace file (the preload
did not run); 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = REPO.parent / "shared" / "upstream" / "distributed-tests"
sys.path.insert(0, str(REPO))
from catalog._registry import builtin_names  # noqa: E402
from tests.reliability import OtlpSink  # noqa: E402

#: Every built-in entry, from the registry: a new entry is in the job the day it
#: is added.
ENTRIES = list(builtin_names())
#: Options (beyond the defaults) that make an entry do real work in every test
#: without changing what the test sees. The defaults already do for env,
#: logging, metrics (fine metrics included), memory (process-limit 0.9),
#: watchdog (samples every second), oom (the nanny half) and dashboard (fed by
#: heartbeats); the tracer writes a file per server (``DASK_CATALOG__TRACER__DIR``)
#: and the OTLP endpoint is set where the job runs its sink (see ``OtlpSink``).
#: recycle with no limit is idle, so it counts tasks against a limit no test
#: reaches; the events entry writes its file.
SETTINGS = {
    "DASK_CATALOG__RECYCLE__MAX_TASKS": "1000000000",
    "DASK_CATALOG__TRACER__FLUSH_INTERVAL": "500ms",
}
BAD = {"failed", "error"}
RERUNS = 3
#: Seconds a pytest run may take to exit after writing its outcomes.
EXIT_GRACE = 60

# The files of issue 21's first experiment: plugins, preloads, restarts, memory,
# failures, stealing, spans, and the scheduler / worker / client at large.
FULL = [
    f"distributed/tests/{name}.py"
    for name in (
        "test_worker_memory",
        "test_cancelled_state",
        "test_resources",
        "test_nanny",
        "test_steal",
        "test_failed_workers",
        "test_spans",
        "test_priorities",
        "test_preload",
        "test_scheduler",
        "test_worker",
        "test_client",
    )
]

# A few minutes on 2 cores: preloads of every kind, plugins (register, replace,
# teardown), nanny and worker restarts, memory-driven pauses and kills, and the
# test known to differ with version 1's events INFO line.
SHORT = [
    "distributed/tests/test_preload.py",
    "distributed/tests/test_nanny.py::test_nanny_restart",
    "distributed/tests/test_nanny.py::test_repeated_restarts",
    "distributed/tests/test_nanny.py::test_restart_memory",
    "distributed/tests/test_nanny.py::test_environ_plugin",
    "distributed/tests/test_nanny.py::test_nanny_plugin_simple",
    "distributed/tests/test_nanny.py::test_num_fds",
    "distributed/tests/test_nanny.py::test_scheduler_file",
    "distributed/tests/test_worker_memory.py::test_pause_executor_manual",
    "distributed/tests/test_worker_memory.py::test_pause_executor_with_memory_monitor",
    "distributed/tests/test_worker_memory.py::test_override_data_vs_memory_monitor",
    "distributed/tests/test_worker_memory.py::test_fail_to_pickle_execute_1",
    "distributed/tests/test_worker_memory.py::test_spill_constrained",
    "distributed/tests/test_worker.py::test_plugin_exception",
    "distributed/tests/test_worker.py::test_plugin_multiple_exceptions",
    "distributed/tests/test_worker.py::test_plugin_internal_exception",
    "distributed/tests/test_worker.py::test_worker_running_before_running_plugins",
    "distributed/tests/test_scheduler.py::test_gather_failing_can_recover",
    "distributed/tests/test_scheduler.py::test_restart",
    "distributed/tests/test_scheduler.py::test_retire_workers",
    "distributed/tests/test_failed_workers.py::test_restart",
    "distributed/tests/test_failed_workers.py::"
    "test_worker_who_has_clears_after_failed_connection",
]
SETS = {"short": SHORT, "full": FULL}

#: Differences that are an entry's purpose, not a fault: reported under
#: "expected" with the reason, and not failing the job. Keep this list short.
EXPECTED = {
    "distributed/tests/test_scheduler.py::test_gather_failing_can_recover": (
        "asserts distributed's own plain-text log format on the 'distributed' "
        "logger's first handler; the logging entry replaces that handler with "
        "its structured one by design (passes with every other entry on)"
    ),
    "distributed/tests/test_client.py::test_forward_logging": (
        "expects the root logger at Python's default WARNING; the logging entry "
        "sets the root logger to its documented `level` option (INFO by default), "
        "so the INFO record the test expects to be dropped is forwarded"
    ),
    "distributed/tests/test_client.py::test_upload_directory": (
        "asserts that a nanny holds exactly one plugin (`[name] = a.plugins`); "
        "the env and logging entries' nanny halves are NannyPlugins there, by "
        "design (the preload and register_plugin install the same plugin)"
    ),
}


def catalog_env(
    trace_dir: str, events_file: str | None = None, otel_endpoint: str | None = None
) -> dict[str, str]:
    """The environment of the catalog pass: every entry on every kind of server.

    Args:
        trace_dir: the tracer's folder (a file per server).
        events_file: the events entry's file, or None for none.
        otel_endpoint: the otel entry's OTLP/HTTP endpoint, or None for its
            default (a collector that is down: spans are counted as failed).
    """
    preload = json.dumps(["catalog"])
    env = {
        "DASK_DISTRIBUTED__SCHEDULER__PRELOAD": preload,
        "DASK_DISTRIBUTED__WORKER__PRELOAD": preload,
        "DASK_DISTRIBUTED__NANNY__PRELOAD": preload,
        "DASK_CATALOG__ENABLE": json.dumps(ENTRIES),
        "DASK_CATALOG__TRACER__DIR": trace_dir,
        **SETTINGS,
    }
    if events_file:
        env["DASK_CATALOG__EVENTS__FILE"] = events_file
    if otel_endpoint:
        env["DASK_CATALOG__OTEL__ENDPOINT"] = otel_endpoint
    return env


def install_certs(tests: Path) -> None:
    """Copy the suite's certificates where ``distributed.utils_test`` expects them."""
    import distributed

    target = Path(distributed.__file__).parent / "tests"
    target.mkdir(exist_ok=True)
    for pattern in ("*.pem", "*.pyz"):
        for src in (tests / "distributed" / "tests").glob(pattern):
            if not (target / src.name).exists():
                shutil.copy2(src, target / src.name)


def run_pass(
    copy: Path,
    selection: list[str],
    env: dict[str, str],
    out: Path,
    label: str,
    *pytest_args: str,
) -> tuple[dict[str, str], float, int]:
    """One pytest run of ``selection``; returns outcomes, seconds, exit status."""
    result = out / f"{label}.json"
    result.unlink(missing_ok=True)
    full_env = {**os.environ, **env}
    full_env["CATALOG_COMPAT_OUTCOMES"] = str(result)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent), full_env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    cmd = [
        *(sys.executable, "-m", "pytest", "-p", "compat_outcomes"),
        *pytest_args,
        *selection,
    ]
    start = time.monotonic()
    with open(out / f"{label}.log", "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=copy,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # distributed's suite sometimes never exits after its summary (seen
        # once in a bare run of 9 files: 6 threads idle for minutes). The
        # outcomes are written at session finish, so past a grace period the
        # run is over and its process group is ended.
        while proc.poll() is None:
            if result.exists():
                try:
                    proc.wait(EXIT_GRACE)
                except subprocess.TimeoutExpired:
                    print(f"   {label}: pytest hung after its summary; ended")
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            time.sleep(1)
    seconds = time.monotonic() - start
    if not result.exists():
        return {}, seconds, proc.returncode
    data = json.loads(result.read_text())
    return data["outcomes"], seconds, proc.returncode


def verdict(bare_fails: int, catalog_fails: int) -> str:
    """``difference`` or ``flaky`` for a candidate, from its reruns (see module doc)."""
    if catalog_fails >= 2 and catalog_fails > bare_fails:
        return "difference"
    return "flaky"


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The command line: selection, ``--tests``, ``--set``, ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "selection",
        nargs="*",
        help="test files or node ids relative to --tests (default: the --set)",
    )
    parser.add_argument(
        "--tests",
        type=Path,
        default=DEFAULT_TESTS,
        help="folder with distributed's conftest.py and distributed/tests/ "
        f"(default: {DEFAULT_TESTS})",
    )
    parser.add_argument("--set", choices=sorted(SETS), default="short")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for logs and the summary"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    tests = args.tests.resolve()
    if (
        not (tests / "conftest.py").is_file()
        or not (tests / "distributed" / "tests").is_dir()
    ):
        parser.error(
            f"--tests {args.tests}: not a folder with conftest.py and "
            "distributed/tests/ (a checkout of dask/distributed at the tag of the "
            "installed version)"
        )
    selection = args.selection or SETS[args.set]
    out = (args.out or Path(tempfile.mkdtemp(prefix="catalog-compat-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import dask
    import distributed

    summary: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "commit": git_commit(),
        "distributed": distributed.__version__,
        "dask": dask.__version__,
        "python": sys.version.split()[0],
        "selection": selection,
        "entries": ENTRIES,
        "settings": SETTINGS,
    }
    sink = OtlpSink()
    with tempfile.TemporaryDirectory(prefix="catalog-compat-") as tmp:
        copy = Path(tmp) / "suite"
        shutil.copytree(tests, copy)
        install_certs(copy)
        trace_dir = Path(tmp) / "traces"
        trace_dir.mkdir()
        events_file = Path(tmp) / "events.jsonl"
        envs = {
            "bare": {},
            "catalog": catalog_env(str(trace_dir), str(events_file), sink.endpoint),
        }

        outcomes: dict[str, dict[str, str]] = {}
        for label, env in envs.items():
            print(f"== {label} pass: {len(selection)} selections", flush=True)
            # A failing test's captured logs can run to hundreds of MB (gen_cluster
            # retrying); the reruns of the candidates keep them.
            got, seconds, status = run_pass(
                copy, selection, env, out, label, "--show-capture=no"
            )
            outcomes[label] = got
            counts = Counter(got.values())
            summary[label] = {
                "seconds": round(seconds),
                "exitstatus": status,
                "tests": len(got),
                **dict(sorted(counts.items())),
            }
            print(f"   {summary[label]}", flush=True)
        summary["trace_files"] = len(list(trace_dir.iterdir()))
        summary["events_lines"] = (
            len(events_file.read_bytes().splitlines()) if events_file.exists() else 0
        )
        summary["otel_exports"] = sink.requests

        bare, cat = outcomes["bare"], outcomes["catalog"]
        candidates = sorted(
            t for t, o in bare.items() if o == "passed" and cat.get(t, "error") in BAD
        )
        summary["only_bare_failed"] = sorted(
            t for t, o in cat.items() if o == "passed" and bare.get(t) in BAD
        )
        reruns: dict[str, dict[str, int]] = {t: Counter() for t in candidates}
        if candidates:
            print(f"== rerunning {len(candidates)} candidates x{RERUNS}", flush=True)
        for i in range(RERUNS if candidates else 0):
            for label, env in envs.items():
                got, _, _ = run_pass(copy, candidates, env, out, f"{label}-rerun{i}")
                for t in candidates:
                    reruns[t][label] += got.get(t, "error") in BAD
        summary["differences"] = {}
        summary["expected"] = {}
        summary["flaky"] = {}
        for t in candidates:
            fails = {"bare": reruns[t]["bare"], "catalog": reruns[t]["catalog"]}
            kind = verdict(fails["bare"], fails["catalog"])
            if kind == "difference" and t in EXPECTED:
                summary["expected"][t] = {**fails, "reason": EXPECTED[t]}
            else:
                summary["differences" if kind == "difference" else "flaky"][t] = fails

    sink.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"logs and summary.json in {out}")
    ran = all(summary[label]["tests"] for label in ("bare", "catalog"))
    if not ran:
        print("FAILED: a pass ran no test (see its log)")
        return 1
    if not summary["trace_files"]:
        # Without trace files the catalog never set up: "no difference" would
        # prove nothing.
        print("FAILED: the catalog pass wrote no trace file: the preload did not run")
        return 1
    if summary["differences"]:
        print(
            f"FAILED: {len(summary['differences'])} test(s) fail only with the "
            f"catalog (failures in {RERUNS} reruns each way):"
        )
        for t, fails in summary["differences"].items():
            print(
                f"  {t}  bare {fails['bare']}/{RERUNS}, catalog "
                f"{fails['catalog']}/{RERUNS}"
            )
        return 1
    for t, info in summary.get("expected", {}).items():
        print(f"expected difference: {t}: {info['reason']}")
    print("OK: no test fails only with the catalog, beyond the expected ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
