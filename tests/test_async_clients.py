"""tracer.fetch/save, watchdog.running and catalog.status with asynchronous clients.

Each returns an awaitable for ``Client(asynchronous=True)``, as distributed's own
client methods do, and the same result as with a synchronous client.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from pathlib import Path

from distributed import Client, Event
from distributed.utils_test import gen_cluster

import catalog
import catalog.tracer
import catalog.watchdog
from catalog.entry import client_call, client_then

WRITING_AN_ENTRY = Path(__file__).resolve().parent.parent / "docs/writing-an-entry.md"


def inc(x: int) -> int:
    return x + 1


def wait_for(name: str) -> int:
    Event(name).wait()
    return 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)])
async def test_tracer_fetch_and_save_await_with_an_async_client(c, s, a, b, tmp_path):
    await c.register_plugin(catalog.Tracer())
    assert await c.gather(c.map(inc, range(4))) == [1, 2, 3, 4]

    pending = catalog.tracer.fetch(c)
    assert inspect.isawaitable(pending)
    raw = await pending
    assert sorted(raw["workers"]) == sorted([a.address, b.address])
    spans = [
        e
        for source in raw["workers"].values()
        for e in source["events"]
        if e["type"] == "span"
    ]
    assert len(spans) == 4

    path = tmp_path / "trace.json"
    summary = await catalog.tracer.save(c, path)
    assert summary["path"] == str(path)
    assert summary["spans"] == 4
    assert summary["workers"] == 2
    assert json.loads(path.read_text())["traceEvents"]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_watchdog_running_awaits_with_an_async_client(c, s, a):
    await c.register_plugin(catalog.Watchdog())
    release = Event("release")
    future = c.submit(wait_for, "release", key="wait_for-1")
    while not a.state.executing:
        await c.run(lambda: None)  # a round trip, not a sleep
    pending = catalog.watchdog.running(c)
    assert inspect.isawaitable(pending)
    (task,) = (await pending)[a.address]
    assert task["key"] == "wait_for-1"
    await release.set()
    assert await future == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_status_awaits_with_an_async_client(c, s, a):
    await c.register_plugin(catalog.Tracer())
    pending = catalog.status(c)
    assert inspect.isawaitable(pending)
    data = await pending
    assert data["scheduler"]["address"] == s.address
    assert data["workers"][a.address]["entries"]["tracer"]["active"]
    assert data["nannies"] == {}
    assert "tracer" in catalog.status_text(data)


def test_status_and_fetch_stay_synchronous_with_a_sync_client():
    with Client(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as client:
        client.register_plugin(catalog.Tracer())
        assert client.submit(inc, 1).result() == 2
        data = catalog.status(client)
        (worker,) = data["workers"].values()
        assert worker["entries"]["tracer"]["active"]
        raw = catalog.tracer.fetch(client)
        assert isinstance(raw, dict) and len(raw["workers"]) == 1


def test_client_then_applies_at_once_or_after_the_await():
    assert client_then(2, lambda x: x * 10) == 20

    async def two() -> int:
        return 2

    pending = client_then(two(), lambda x: x * 10)
    assert inspect.isawaitable(pending)
    assert asyncio.run(pending) == 20  # type: ignore[arg-type]


@gen_cluster(client=True, nthreads=[])
async def test_client_call_runs_on_the_loop_for_both_kinds(c, s):
    async def where() -> int:
        return threading.get_ident()

    assert await client_call(c, where) == threading.get_ident()
    assert await client_then(client_call(c, where), lambda t: t + 1) == (
        threading.get_ident() + 1
    )


def docs_client_snippet() -> dict:
    """The ``counts`` example of docs/writing-an-entry.md, run as the page shows."""
    text = WRITING_AN_ENTRY.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    (snippet,) = [b for b in blocks if "client_call" in b]
    namespace: dict = {}
    exec(compile(snippet, str(WRITING_AN_ENTRY), "exec"), namespace)
    return namespace


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_the_docs_client_function_awaits_with_an_async_client(c, s, a):
    counts = docs_client_snippet()["counts"]
    assert await counts(c) == {}


def test_the_docs_client_function_answers_with_a_sync_client():
    counts = docs_client_snippet()["counts"]
    with Client(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as client:
        assert counts(client) == {}
