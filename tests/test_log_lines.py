"""What the catalog logs at INFO and above in a normal run with every entry on.

A log line says what happened, with the numbers; routine bookkeeping goes to
DEBUG (issue #15 point 4: `catalog.events - INFO - all` said nothing, and broke
distributed's own `test_gather_failing_can_recover`, which reads the log).
"""

from __future__ import annotations

import logging
import re

import dask
import pytest
from distributed import Client
from distributed.utils_test import gen_cluster

import catalog
from catalog.events import EVENTS
from tests.procs import local_cluster
from tests.test_events import Records

#: The only INFO lines a normal run emits, each saying what happened.
INFO_LINES = {
    "entry active": re.compile(
        r"catalog entry '\w+' active on (scheduler|worker|nanny|client) \S+: \{.+\}"
    ),
    # The audit log's own events, with their fields (no file: the logger).
    "event": re.compile(
        r"(worker-added|worker-removed|client-added|client-removed|graph-submitted"
        r"|task-erred|task-retried|worker-restart-memory|restart|scheduler-closing)"
        r": \w[\w-]*=.+"
    ),
    # Where the dashboard entry serves its page (an operator's first question).
    "dashboard page": re.compile(r"catalog\.dashboard: the catalog page is at /\S*"),
}


def inc(x: int) -> int:
    return x + 1


def fail(x: int) -> int:
    raise ValueError(f"failing on purpose: {x}")


@pytest.fixture
def catalog_records():
    """Every record of the ``catalog`` loggers, DEBUG included."""
    ours = logging.getLogger("catalog")
    handler, level = Records(), ours.level
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)


def normal_run(**extra: object) -> None:
    """Every entry on, through the umbrella preload from config; a small workload."""
    config = {
        "distributed.scheduler.preload": ["catalog"],
        "distributed.worker.preload": ["catalog"],
        "catalog.enable": list(catalog.ENTRY_MODULES),
        # No OTLP collector here: the otel entry samples nothing, so sends nothing.
        "catalog.otel.sampling-ratio": 0,
        **extra,
    }
    with (
        dask.config.set(config),
        local_cluster(n_workers=2) as cluster,
        Client(cluster) as client,
    ):
        assert client.gather(client.map(inc, range(10))) == list(range(1, 11))
        with pytest.raises(ValueError):
            client.submit(fail, 1).result()
        # scatter and gather: events on distributed's own "all" topic.
        assert client.gather(client.scatter([1, 2])) == [1, 2]
        assert client.run(inc, 1)


def test_every_info_line_of_a_normal_run_says_what_happened(catalog_records):
    normal_run()
    loud = [r for r in catalog_records if r.levelno >= logging.INFO]
    said = [r.getMessage() for r in loud]
    assert not [r for r in loud if r.levelno >= logging.WARNING], said
    unknown = [m for m in said if not any(p.fullmatch(m) for p in INFO_LINES.values())]
    assert not unknown, unknown
    # The run did log: each entry on each server, and the audit log's events.
    active = {m.split("'")[1] for m in said if INFO_LINES["entry active"].fullmatch(m)}
    assert active == set(catalog.ENTRY_MODULES)
    events = {m.split(":")[0] for m in said if INFO_LINES["event"].fullmatch(m)}
    assert {"worker-added", "graph-submitted", "task-erred"} <= events
    assert "task-erred: " in "\n".join(said) and "failing on purpose: 1" in "\n".join(
        said
    )


def test_bookkeeping_goes_to_debug(catalog_records):
    # The logging entry sets the catalog's level; its own option lowers it here.
    normal_run(**{"catalog.logging.logger": ["catalog=DEBUG"]})
    quiet = [r.getMessage() for r in catalog_records if r.levelno == logging.DEBUG]
    loud = [r.getMessage() for r in catalog_records if r.levelno >= logging.INFO]
    # distributed's own event topics ("all" has gather, scatter, run-function):
    assert "all" not in loud
    assert not [
        m for m in loud if m.startswith(("all", "worker-event", "client-event"))
    ]
    assert any(m.startswith("all: ") and '"gather"' in m for m in quiet), quiet
    # Entries with nothing to do on a server, and an env entry that set nothing.
    assert not [m for m in loud if "nothing to do" in m or "set nothing" in m]
    assert any("has nothing to do on a scheduler" in m for m in quiet)
    assert set(EVENTS) >= {"worker-event", "client-event"}


@gen_cluster(client=True, nthreads=[])
async def test_a_topic_of_your_own_is_news_and_distributeds_is_bookkeeping(
    c, s, catalog_records
):
    # gen_cluster puts the loggers back as they were when distributed.utils_test
    # was imported (after catalog, which sets INFO): DEBUG again, inside.
    logging.getLogger("catalog").setLevel(logging.DEBUG)
    await c.register_plugin(catalog.EventLog())
    await c.log_event("my-topic", {"rows": 12})
    s.log_event("all", {"action": "gather", "count": 3})
    said = {r.getMessage(): r.levelno for r in catalog_records}
    assert said['my-topic: topic="my-topic" msg={"rows": 12}'] == logging.INFO
    assert said['all: topic="all" msg={"action": "gather", "count": 3}'] == (
        logging.DEBUG
    )
