"""catalog._fine_metrics: distributed's fine performance metrics on /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import dask
import dask.array as da
import pytest
from distributed import span
from distributed.metrics import context_meter
from distributed.utils_test import gen_cluster
from prometheus_client.parser import text_string_to_metric_families

import catalog
from catalog import _fine_metrics, _prom
from catalog.metrics import ENTRY
from tests.procs import require_binary
from tests.test_metrics import (
    dashboard_port,
    fetch,
    ours,
    run_work,
    samples,
    scrape_of,
    wait_until,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Family stem and label names of each group, as the docs page lists them.
STEMS = {
    "execute": ("fine_execute", ("prefix", "activity")),
    "p2p": ("fine_p2p", ("where", "activity")),
    "worker": ("fine_worker", ("context", "activity")),
    "span_execute": ("fine_span_execute", ("span", "activity")),
    "span_p2p": ("fine_span_p2p", ("span", "where", "activity")),
}

Series = dict[tuple[str, frozenset], float]


def inc(x):
    return x + 1


def family_of(group: str, unit: str, labels: dict[str, str]) -> tuple[str, dict]:
    """The family name and labels one of distributed's keys belongs in."""
    stem = f"dask_catalog_{STEMS[group][0]}"
    if unit in ("seconds", "bytes"):
        return f"{stem}_{unit}_total", labels
    return f"{stem}_total", {**labels, "unit": unit}


def expected(scheduler) -> Series:
    """The series the docs promise, computed straight from distributed's dicts."""
    out: Series = defaultdict(float)

    def add(group: str, unit: str, labels: dict[str, str], value: float) -> None:
        name, labels = family_of(group, unit, labels)
        out[name, frozenset(labels.items())] += value

    for key, value in scheduler.cumulative_worker_metrics.items():
        if not isinstance(key, tuple):
            continue
        context, *middle, activity, unit = key
        if context == "execute":
            add("execute", unit, {"prefix": middle[0], "activity": activity}, value)
        elif context == "p2p":
            add("p2p", unit, {"where": middle[0], "activity": activity}, value)
        else:
            add("worker", unit, {"context": context, "activity": activity}, value)
    for sp in scheduler.extensions["spans"].spans.values():
        name = "/".join(sp.name)
        for key, value in sp._cumulative_worker_metrics.items():
            context, scope, activity, unit = key
            if context == "execute":
                add("span_execute", unit, {"span": name, "activity": activity}, value)
            else:
                labels = {"span": name, "where": scope, "activity": activity}
                add("span_p2p", unit, labels, value)
    return dict(out)


def exported(text: str) -> Series:
    return {
        (name, frozenset(labels.items())): value
        for name, labels, value in samples(text)
        if name.startswith("dask_catalog_fine_")
    }


def label_values(series: Series, family: str, label: str) -> set[str]:
    return {dict(labels)[label] for name, labels in series if name == family}


def total(series: Series, family: str, **where: str) -> float:
    return sum(
        value
        for (name, labels), value in series.items()
        if name == family and where.items() <= dict(labels).items()
    )


async def heartbeats(*workers) -> None:
    """Every worker's metrics so far reach the scheduler (as a heartbeat does)."""
    await asyncio.gather(*(w.heartbeat() for w in workers))


def check_with_promtool(text: str) -> None:
    promtool = require_binary("promtool")
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=ours(text),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == ""


# -- in-process clusters ------------------------------------------------------------


@gen_cluster(client=True)
async def test_values_equal_the_schedulers_accumulators(c, s, a, b):
    await c.register_plugin(catalog.SchedulerMetrics())
    with span("etl"):
        with span("load"):
            xs = c.map(inc, range(10), workers=[a.address])
        # Its inputs live on a: b fetches them (gather-dep there, get-data on a).
        total_ = c.submit(sum, xs, workers=[b.address])
    assert await total_ == 55
    array = da.ones((40, 40), chunks=10)
    with dask.config.set({"array.rechunk.method": "p2p"}), span("reshape"):
        assert await c.compute(array.rechunk((40, 2)).sum()) == 1600
    await heartbeats(a, b)

    # The scrape and the scheduler's dicts, read with no await between them.
    text = scrape_of(s)
    want = expected(s)
    got = exported(text)
    assert set(got) == set(want)
    for series, value in want.items():
        assert got[series] == pytest.approx(value, rel=1e-12, abs=1e-15), series

    # Every kind of key showed up: tasks, transfers both ways, P2P, spans.
    names = {name for name, _ in got}
    for family in (
        "dask_catalog_fine_execute_seconds_total",
        "dask_catalog_fine_execute_bytes_total",
        "dask_catalog_fine_execute_total",
        "dask_catalog_fine_p2p_seconds_total",
        "dask_catalog_fine_p2p_bytes_total",
        "dask_catalog_fine_worker_seconds_total",
        "dask_catalog_fine_span_execute_seconds_total",
        "dask_catalog_fine_span_p2p_seconds_total",
    ):
        assert family in names, family
    contexts = label_values(got, "dask_catalog_fine_worker_seconds_total", "context")
    assert {"gather-dep", "get-data"} <= contexts
    spans = label_values(got, "dask_catalog_fine_span_execute_seconds_total", "span")
    assert {"etl", "etl/load", "reshape"} <= spans
    # String keys (latency, tick-duration, ...) are not fine metrics: not exported.
    assert any(isinstance(k, str) for k in s.cumulative_worker_metrics)

    # Against distributed's public Span API: a span's own series are its metrics
    # without its sub-spans', and a parent's series plus its children's are what
    # Span.cumulative_worker_metrics (the whole tree) reports.
    ext = s.extensions["spans"]
    (etl,) = ext.spans_search_by_name["etl",]
    tree = etl.cumulative_worker_metrics
    for activity in {k[2] for k in tree if k[0] == "execute" and k[-1] == "seconds"}:
        if activity == "idle or other spans":  # made up by the property
            continue
        want_seconds = sum(
            v
            for k, v in tree.items()
            if k[0] == "execute" and k[2] == activity and k[-1] == "seconds"
        )
        got_seconds = sum(
            total(
                got,
                "dask_catalog_fine_span_execute_seconds_total",
                span=name,
                activity=activity,
            )
            for name in ("etl", "etl/load")
        )
        assert got_seconds == pytest.approx(want_seconds, rel=1e-12), activity

    # The global families equal the sum over spans (nothing lost, nothing twice).
    for unit in ("seconds", "bytes"):
        assert total(got, f"dask_catalog_fine_execute_{unit}_total") == pytest.approx(
            total(got, f"dask_catalog_fine_span_execute_{unit}_total"), rel=1e-9
        )
    check_with_promtool(text)


def chatty(n: int) -> int:
    """A task that counts ``n`` activities of its own (task code may do that)."""
    for i in range(n):
        context_meter.digest_metric(f"step-{i}", 1, "count")
    return n


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2)])
async def test_caps_hold_with_many_prefixes_spans_and_activities(c, s, a):
    await c.register_plugin(catalog.SchedulerMetrics(max_prefixes=5))
    futures = []
    for i in range(12):
        with span(f"job-{i}"):
            futures += [c.submit(inc, j, key=f"prefix{i:02d}-{j}") for j in range(2)]
    await c.gather(futures)
    assert await c.submit(chatty, 150, key="chatty-1") == 150
    await heartbeats(a)
    first = exported(scrape_of(s))
    want = expected(s)

    seconds = "dask_catalog_fine_execute_seconds_total"
    prefixes = label_values(first, seconds, "prefix")
    assert len(prefixes) == 6 and "other" in prefixes
    # The prefix labels are the scheduler families' own (one cap per server).
    scheduler_prefixes = {
        labels["prefix"]
        for name, labels, _ in samples(scrape_of(s))
        if name == "dask_catalog_scheduler_tasks_total"
    }
    assert prefixes - {"other"} <= scheduler_prefixes
    span_seconds = "dask_catalog_fine_span_execute_seconds_total"
    spans = label_values(first, span_seconds, "span")
    assert len(spans) == 6 and "other" in spans
    counts = "dask_catalog_fine_execute_total"
    # One cap for the activity names of every family; distributed has an
    # activity of its own called "other", which is where the rest go too.
    activities = {dict(labels)["activity"] for _, labels in first}
    cap = _fine_metrics.MAX_NAMES
    assert cap <= len(activities) <= cap + 1 and "other" in activities

    # Folding into "other" loses nothing: totals equal distributed's.
    span_counts = "dask_catalog_fine_span_execute_total"
    for family in (seconds, span_seconds, counts, span_counts):
        assert total(first, family) == pytest.approx(total(want, family), rel=1e-9)
    named = len([a for a in activities if a.startswith("step-")])
    assert 0 < named < 150
    assert total(first, counts, activity="other") == 150 - named

    # Later work under new names goes to "other" too, and no series steps back.
    with span("job-late"):
        assert await c.submit(inc, 1, key="late-1") == 2
    await heartbeats(a)
    second = exported(scrape_of(s))
    assert label_values(second, span_seconds, "span") == spans
    assert label_values(second, seconds, "prefix") == prefixes
    for series, value in first.items():
        assert second[series] >= value, series


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_off_by_option_and_removed_at_teardown(c, s, a):
    await c.register_plugin(catalog.SchedulerMetrics(fine_metrics=False))
    assert await c.submit(inc, 1) == 2
    await heartbeats(a)
    assert s.cumulative_worker_metrics
    text = scrape_of(s)
    assert "dask_catalog_scheduler_tasks_total" in text
    assert "dask_catalog_fine_" not in text

    with pytest.warns(UserWarning, match="overwriting"):
        await c.register_plugin(catalog.SchedulerMetrics())
    assert "dask_catalog_fine_execute_seconds_total{" in scrape_of(s)
    plugin = s.plugins[catalog.SchedulerMetrics.name]
    await plugin.close()
    held = _prom._COLLECTORS.get(id(s), (None, []))[1]
    assert not any(isinstance(x, _fine_metrics.FineMetrics) for x in held)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_an_unreadable_accumulator_is_an_error_not_a_failed_scrape(c, s, a):
    await c.register_plugin(catalog.SchedulerMetrics())
    assert await c.submit(inc, 1, key="inc-1") == 2
    await heartbeats(a)
    # A shape this module does not know (say, a later distributed's).
    s.cumulative_worker_metrics["execute", "inc", "thread-cpu", "seconds"] = "n/a"
    text = scrape_of(s)
    assert 'dask_catalog_scheduler_tasks_total{outcome="success",prefix="inc"}' in text
    assert "dask_catalog_fine_" not in text
    plugin = s.plugins[catalog.SchedulerMetrics.name]
    assert plugin.errors == 1
    assert plugin.last_error.startswith("fine performance metrics: TypeError")


def test_option_is_declared_once():
    option = ENTRY.option("fine-metrics")
    assert option.default is True
    assert ENTRY.flag(option) == "--metrics-fine-metrics"
    assert catalog.SchedulerMetrics(fine_metrics=False).settings.fine_metrics is False
    with pytest.raises(ValueError, match="fine-metrics"):
        catalog.SchedulerMetrics(fine_metrics="sometimes")


# -- the docs and the shipped dashboard -----------------------------------------------


def dashboard_exprs() -> dict[str, list[str]]:
    dashboard = json.loads((DOCS / "assets" / "grafana-dashboard.json").read_text())
    exprs = {
        panel["title"]: [target["expr"] for target in panel["targets"]]
        for panel in dashboard["panels"]
    }
    exprs["(variables)"] = [
        var["query"]["query"]
        for var in dashboard["templating"]["list"]
        if isinstance(var.get("query"), dict)
    ]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (not its functions or labels)."""
    return set(re.findall(r"\b(dask_[a-z0-9_]+)\b", expr))


def test_docs_list_every_fine_family_and_label():
    page = (DOCS / "entries" / "metrics.md").read_text()
    section = page.split("### Fine performance metrics", 1)[1].split("\n## ", 1)[0]
    for group, (stem, labels) in STEMS.items():
        assert _fine_metrics.GROUPS[group][:2] == (stem, labels)
        for unit in ("seconds", "bytes", ""):
            name, _ = family_of(group, unit or "count", {})
            assert f"`{name}`" in section, name
        for label in labels:
            assert f"`{label}`" in section, label
    assert "`unit`" in section and "`fine-metrics`" in section


@gen_cluster(client=True)
async def test_every_dashboard_query_names_real_families(c, s, a, b):
    """Each series a panel selects is in a real exposition, or documented.

    The quantile panels read ``_bucket`` series, which need ``prefix-buckets``.
    """
    await c.register_plugin(catalog.SchedulerMetrics(prefix_buckets=True))
    await c.register_plugin(catalog.Metrics(prefix_buckets=True))
    with span("etl"):
        xs = c.map(inc, range(4), workers=[a.address])
        assert await c.submit(sum, xs, workers=[b.address]) == 10
    await heartbeats(a, b)
    texts = await asyncio.gather(
        *(
            asyncio.to_thread(
                fetch, f"http://127.0.0.1:{server.http_server.port}/metrics"
            )
            for server in (s, a)
        )
    )
    real = {name for text in texts for name, _, _ in samples(text)}
    for family in (f for text in texts for f in text_string_to_metric_families(text)):
        # A family without samples yet (no task failed here) still counts.
        real.add(family.name)
        if family.type == "counter":
            real.add(f"{family.name}_total")
    page = (DOCS / "entries" / "metrics.md").read_text()
    others = page.split("### Families other entries add here", 1)[1].split("###")[0]
    documented = set(re.findall(r"`(dask_catalog_[a-z0-9_]+)`", others))
    for title, exprs in dashboard_exprs().items():
        for expr in exprs:
            for name in metric_names(expr):
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in real or family in documented, (title, name)


# -- real processes -------------------------------------------------------------------


@pytest.mark.slow
def test_cli_scheduler_exports_them(procs):
    from distributed import Client

    sched, address = procs.scheduler("--preload", "catalog.metrics")
    procs.worker(address, "--nthreads", "2")
    run_work(address)
    url = f"http://127.0.0.1:{dashboard_port(sched)}/metrics"

    def scheduler_totals() -> Series:
        with Client(address, timeout=30) as client:
            rows = client.run_on_scheduler(
                lambda dask_scheduler: [
                    (list(k), v)
                    for k, v in dask_scheduler.cumulative_worker_metrics.items()
                    if isinstance(k, tuple) and k[0] == "execute"
                ]
            )
        out: Series = defaultdict(float)
        for (_, prefix, activity, unit), value in rows:
            name, labels = family_of(
                "execute", unit, {"prefix": prefix, "activity": activity}
            )
            out[name, frozenset(labels.items())] += value
        return dict(out)

    def agree() -> bool:
        # Heartbeats bring the last numbers in their own time: wait until a
        # scrape and the scheduler's dict say the same (nothing runs any more).
        got = {
            series: value
            for series, value in exported(fetch(url)).items()
            if series[0].startswith("dask_catalog_fine_execute_")
        }
        want = scheduler_totals()
        return (
            total(got, "dask_catalog_fine_execute_seconds_total", prefix="boom") > 0
            and set(got) == set(want)
            and all(got[k] == pytest.approx(v, rel=1e-12) for k, v in want.items())
        )

    wait_until(agree, timeout=60, why=lambda: fetch(url)[-3000:])
    text = fetch(url)
    got = exported(text)
    assert total(got, "dask_catalog_fine_execute_seconds_total", prefix="inc") > 0
    assert "default" in label_values(
        got, "dask_catalog_fine_span_execute_seconds_total", "span"
    )
    check_with_promtool(text)
    assert "Failed to start preload" not in sched.output


def docs_queries() -> list[str]:
    """The PromQL queries of the section (a line, plus lines indented under it)."""
    page = (DOCS / "entries" / "metrics.md").read_text()
    section = page.split("### Fine performance metrics", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```promql\n(.*?)```", section, re.DOTALL)
    queries: list[str] = []
    for line in block.splitlines():
        if line.startswith(" ") and queries:
            queries[-1] += "\n" + line
        elif line.strip() and not line.startswith("#"):
            queries.append(line)
    return queries


def test_docs_queries_are_valid_promql_on_real_families(tmp_path):
    queries = docs_queries()
    assert len(queries) >= 4
    families = {
        family_of(group, unit, {})[0]
        for group in STEMS
        for unit in ("seconds", "bytes", "count")
    }
    for query in queries:
        assert metric_names(query) and metric_names(query) <= families, query
    rules = {
        "groups": [
            {
                "name": "docs",
                "rules": [
                    {"record": f"docs:query{i}", "expr": q}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run(
        [require_binary("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
