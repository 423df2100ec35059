"""The dashboard entry: the /catalog page and data.json, in-process and in Chromium."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import dask
import pytest
from distributed import Client
from distributed.utils_test import gen_cluster
from tornado.httpclient import AsyncHTTPClient

import catalog
from catalog._entry import OptionError
from catalog.dashboard import CSP, SUMMARY_KEY, data
from tests.procs import REPO_ENV, require_binary

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "<script>document.title='pwned'</script>"
SCHEDULER = {"dashboard_address": "127.0.0.1:0"}


def hostile_inc(x):
    return x + 1


def test_options_are_checked_and_the_plugins_pickle():
    with pytest.raises(OptionError, match="refresh"):
        catalog.Dashboard(refresh="1ms")
    for plugin in (catalog.Dashboard(events=3), catalog.WorkerDashboard()):
        assert pickle.loads(pickle.dumps(plugin)).settings == plugin.settings


async def get(s, path):
    port = s.http_server.port
    return await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}")


async def heartbeat_summaries(s, n):
    for _ in range(200):
        if sum(SUMMARY_KEY in (ws.metrics or {}) for ws in s.workers.values()) >= n:
            return
        await _sleep(0.05)
    raise AssertionError("no worker sent its summary in the heartbeat")


async def _sleep(t):
    import asyncio

    await asyncio.sleep(t)


@gen_cluster(client=True, scheduler_kwargs=SCHEDULER)
async def test_page_and_data_from_the_scheduler_alone(c, s, a, b):
    await c.register_plugin(catalog.SchedulerMetrics())
    await c.register_plugin(catalog.EventLog())
    await c.register_plugin(catalog.Dashboard(refresh="100ms"))
    await c.register_plugin(catalog.WorkerDashboard())
    await c.register_plugin(catalog.MemoryGuard())
    futures = [c.submit(hostile_inc, i, key=f"{HOSTILE}-{i}") for i in range(4)]
    await c.gather(futures)
    await heartbeat_summaries(s, 2)

    page = await get(s, "/catalog")
    assert page.headers["Content-Security-Policy"] == CSP
    assert b"catalog/dashboard.js" in page.body
    assert (
        (await get(s, "/catalog/dashboard.js"))
        .headers["Content-Type"]
        .startswith("text/javascript")
    )
    answer = await get(s, "/catalog/data.json")
    assert answer.headers["Content-Security-Policy"] == CSP
    got = json.loads(answer.body)
    (row,) = [p for p in got["prefixes"] if "script" in p["prefix"]]
    assert row["success"] == 4 and row["wait"]["count"] == 4
    assert len(row["wait"]["counts"]) == len(row["wait"]["bounds"]) + 1
    assert row["memory"]["count"] == 4
    assert set(got["scheduler"]["entries"]) >= {"dashboard", "events", "metrics"}
    assert set(got["workers"]) == {a.address, b.address}
    for info in got["workers"].values():
        assert {"dashboard", "memory"} <= set(info["entries"])
        assert "memory" not in info  # the peaks are merged into "prefixes"
    # Alike workers' settings are sent once, by reference.
    refs = {
        name: {info["entries"][name]["settings"] for info in got["workers"].values()}
        for name in ("dashboard", "memory")
    }
    assert all(len(ref) == 1 for ref in refs.values()), refs
    (memory_ref,) = refs["memory"]
    interval = catalog.MemoryGuard().settings.interval
    assert got["settings"][memory_ref]["interval"] == interval
    assert any(e["event"] == "graph-submitted" for e in got["events"])
    assert got["trace"]["available"] is False


@gen_cluster(client=True, scheduler_kwargs=SCHEDULER)
async def test_data_is_cached_for_the_refresh_period(c, s, a, b):
    await c.register_plugin(catalog.Dashboard(refresh="1h"))
    first = (await get(s, "/catalog/data.json")).body
    await c.submit(hostile_inc, 1)
    assert (await get(s, "/catalog/data.json")).body == first


@gen_cluster(client=True, scheduler_kwargs={**SCHEDULER, "http_prefix": "/dask"})
async def test_the_dashboard_prefix_is_respected(c, s, a, b):
    await c.register_plugin(catalog.Dashboard())
    assert s.plugins["catalog.dashboard"].url == "/dask/catalog"
    assert b"<title>dask-catalog" in (await get(s, "/dask/catalog")).body
    assert json.loads((await get(s, "/dask/catalog/data.json")).body)["workers"]


@gen_cluster(
    client=True,
    scheduler_kwargs=SCHEDULER,
    config={
        "distributed.scheduler.http.routes": [
            *dask.config.get("distributed.scheduler.http.routes"),
            "catalog.dashboard",
        ]
    },
)
async def test_listed_in_the_routes_it_works_without_the_plugin(c, s, a, b):
    got = json.loads((await get(s, "/catalog/data.json")).body)
    assert got["workers"][a.address]["error"].startswith("no summary")
    rules = len(s.http_application.default_router.rules)
    await c.register_plugin(catalog.Dashboard())  # finds its routes: adds none
    assert len(s.http_application.default_router.rules) == rules


@gen_cluster(client=True, scheduler_kwargs=SCHEDULER)
async def test_trace_download_merges_worker_and_scheduler_buffers(c, s, a, b):
    await c.register_plugin(catalog.Tracer())
    await c.register_plugin(catalog.SchedulerTracer())
    await c.register_plugin(catalog.Dashboard())
    await c.gather([c.submit(hostile_inc, i, key=f"{HOSTILE}-{i}") for i in range(3)])
    answer = await get(s, "/catalog/trace.json")
    assert "attachment" in answer.headers["Content-Disposition"]
    trace = json.loads(answer.body)
    roles = {
        e["args"]["name"]
        for e in trace["traceEvents"]
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    assert HOSTILE in json.dumps(trace), roles


def test_data_with_no_plugin_at_all_on_a_bare_scheduler():
    from distributed import Scheduler

    async def run():
        async with Scheduler(dashboard_address="127.0.0.1:0") as s:
            return data(s)

    import asyncio

    got = asyncio.run(run())
    assert got["workers"] == {} and got["events"] is None and got["slow"] == []


# ---------------------------------------------------------------------------
# A real browser on real processes
# ---------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium(tmp_path, *args):
    exe = shutil.which("chromium") or require_binary("chromium")
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_page_in_chromium_escapes_hostile_keys(procs, tmp_path):
    require_binary("chromium")
    sched, address = procs.scheduler(
        "--dashboard-prefix",
        "/dask",
        "--preload",
        "catalog",
        "--enable",
        "dashboard,metrics,events",
        env=REPO_ENV,
    )
    dashboard = sched.wait_for(r"dashboard at:\s+http://[\d.]+:(\d+)")
    port = int(dashboard.group(1))
    for _ in range(2):  # two alike workers: one row per entry on the page
        procs.worker(
            address,
            "--nthreads",
            "2",
            "--preload",
            "catalog",
            "--enable",
            "dashboard,watchdog,memory",
            "--watchdog-warn-after",
            "500ms",
            env=REPO_ENV,
        )
    url = f"http://127.0.0.1:{port}/dask/catalog"
    with Client(address, timeout=60) as client:
        client.gather(
            [client.submit(hostile_inc, i, key=f"{HOSTILE}-{i}") for i in range(5)]
        )
        stuck = client.submit(time.sleep, 60, key=f"{HOSTILE}-slow")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "/data.json") as r:
                got = json.load(r)
            summaries = [w for w in got["workers"].values() if "entries" in w]
            if got["slow"] and len(summaries) == 2:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the slow task or a summary never reached data.json")
        result = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
        shot = tmp_path / "dashboard.png"
        chromium(
            tmp_path,
            "--virtual-time-budget=5000",
            "--window-size=1280,1400",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            url,
        )
        del stuck
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    # The keys are in the rendered tables, as text: no script from them ran.
    assert "<title>dask-catalog</title>" in dom, dom[:2000]
    assert "pwned" not in dom.split("</title>")[0]
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;-slow" in dom
    assert "<script>document.title" not in dom
    assert "hostile_inc" in dom or "script&gt;document" in dom
    assert "dashboard,watchdog" not in dom  # settings shown per entry, not argv
    assert "watchdog" in dom and "warn_after=0.5" in dom
    assert dom.count("2 workers: tcp://127.0.0.1:") == 3  # dashboard, watchdog, memory
    assert "updated " in dom
    assert shot.exists() and shot.stat().st_size > 10_000
    if os.environ.get("CATALOG_UPDATE_SCREENSHOT"):
        shutil.copy(shot, ROOT / "docs" / "assets" / "dashboard.png")
