"""A pytest plugin that writes each test's outcome to a JSON file, for compat.py.

Loaded into distributed's own test run with ``-p compat_outcomes``; the file is
named by the ``CATALOG_COMPAT_OUTCOMES`` environment variable. One outcome per
node id: ``passed``, ``failed`` (the test body), ``error`` (setup, teardown or
collection), ``skipped``, ``xfailed``.
"""

from __future__ import annotations

import json
import os
from typing import Any

_outcomes: dict[str, str] = {}


def _record(nodeid: str, outcome: str) -> None:
    # The worst phase wins: a test whose body passed but whose teardown
    # (distributed's leak checks live there) failed is an error.
    rank = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 3}
    if rank[outcome] >= rank[_outcomes.get(nodeid, "passed")]:
        _outcomes[nodeid] = outcome


def pytest_runtest_logreport(report: Any) -> None:
    if report.failed:
        _record(report.nodeid, "failed" if report.when == "call" else "error")
    elif report.skipped:
        _record(report.nodeid, "xfailed" if hasattr(report, "wasxfail") else "skipped")
    else:
        _record(report.nodeid, "passed")


def pytest_collectreport(report: Any) -> None:
    if report.failed:
        _record(report.nodeid or "<collection>", "error")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("CATALOG_COMPAT_OUTCOMES")
    if path:
        with open(path, "w") as f:
            json.dump({"exitstatus": int(exitstatus), "outcomes": _outcomes}, f)
