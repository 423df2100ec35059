"""A catalog page on the Dask dashboard: entries, prefixes, slow tasks, events."""

from __future__ import annotations

import itertools
import json
import logging
import time
import weakref
from importlib import resources
from typing import Any

import dask.config
from distributed.http.utils import RequestHandler
from distributed.protocol.serialize import Serialized, deserialize
from tornado import web

from catalog._dashboard_settings import SharedSettings
from catalog.entry import (
    Duration,
    Entry,
    Integer,
    Option,
    SchedulerEntryPlugin,
    WorkerEntryPlugin,
    entry_preload,
    local_status,
    mask,
)

__all__ = [
    "CSP",
    "ENTRY",
    "SUMMARY_KEY",
    "Dashboard",
    "WorkerDashboard",
    "dask_setup",
    "dask_teardown",
    "data",
    "routes",
]

logger = logging.getLogger("catalog.dashboard")

#: The key of the worker's heartbeat ``metrics`` that carries its summary.
SUMMARY_KEY = "catalog"

#: Sent with every answer: the page runs its own script and nothing else.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)

#: Watchdog event actions shown as timeouts.
TIMEOUT_ACTIONS = frozenset({"timeout", "refire", "unstoppable"})

ENTRY = Entry(
    name="dashboard",
    summary="a catalog page on the Dask dashboard, with a JSON endpoint",
    runs_on={
        "scheduler": "serves /catalog and /catalog/data.json on the dashboard address",
        "worker": "adds a small summary to the worker's heartbeat",
        "nanny": "nothing (one INFO line)",
        "client": "registers the page on the scheduler and the summary on workers",
    },
    options=[
        Option(
            "refresh",
            Duration(minimum="100ms", maximum="1h"),
            "2s",
            "How often the page fetches its data; answers are cached for as long "
            "(at most 2s).",
        ),
        Option(
            "events",
            Integer(0, maximum=1000),
            50,
            "How many recent events (audit log and each catalog.* topic) are shown.",
        ),
        Option(
            "slow-tasks",
            Integer(0, maximum=100),
            10,
            "Tasks past the watchdog's warn-after each worker sends, longest first.",
        ),
        Option(
            "memory-prefixes",
            Integer(0, maximum=1000),
            50,
            "Prefixes with the largest memory peaks each worker sends.",
        ),
    ],
    examples=(
        "dask scheduler --preload catalog --enable dashboard,metrics,events",
        "dask worker tcp://127.0.0.1:8786 --preload catalog --enable dashboard",
    ),
)


def _plain(obj: Any) -> Any:
    """``obj`` as JSON types (what the heartbeat and the page can carry)."""
    return json.loads(json.dumps(obj, default=str))


def _plugin(server: Any, name: str) -> Any:
    plugin = server.plugins.get(f"catalog.{name}")
    return plugin if plugin is not None and getattr(plugin, "active", False) else None


def _entries(server: Any) -> dict[str, Any]:

    return mask(_plain(local_status(server)))


# ---------------------------------------------------------------------------
# Worker half: a summary in the heartbeat
# ---------------------------------------------------------------------------


class WorkerDashboard(WorkerEntryPlugin):
    """Send a small summary of this worker's catalog with every heartbeat.

    distributed calls every callable of ``worker.metrics`` on each heartbeat
    and the scheduler keeps the result in ``WorkerState.metrics``: the page
    reads it there, without asking any worker. The summary is rebuilt at most
    once a second: the entries' status, the memory guard's largest peaks per
    prefix and the watchdog's slow tasks with their stacks.

    Example:
        >>> import catalog
        >>> catalog.WorkerDashboard(slow_tasks=5).settings.slow_tasks
        5
    """

    entry = ENTRY

    def on_setup(self, worker: Any) -> None:
        self._cached: tuple[float, dict[str, Any]] | None = None
        worker.metrics[SUMMARY_KEY] = self.summary

    def on_teardown(self, worker: Any) -> None:
        if worker.metrics.get(SUMMARY_KEY) == self.summary:
            del worker.metrics[SUMMARY_KEY]

    def summary(self, worker: Any = None) -> dict[str, Any]:
        """The heartbeat's summary (cached for a second)."""
        current = time.monotonic()
        cached = self._cached
        if cached is not None and current - cached[0] < 1.0:
            return cached[1]
        try:
            out = self._build(self.server)
        except Exception as exc:
            self.report_error("building the heartbeat summary", exc)
            out = {"error": str(exc)}
        self._cached = (current, out)
        return out

    def _build(self, worker: Any) -> dict[str, Any]:
        settings = self.settings
        out: dict[str, Any] = {"time": time.time(), **_entries(worker)}
        guard = _plugin(worker, "memory")
        if guard is not None and settings.memory_prefixes:
            stats = guard.prefix_stats()
            top = sorted(stats.items(), key=lambda kv: -kv[1]["max"])
            out["memory"] = dict(top[: settings.memory_prefixes])
        watchdog = _plugin(worker, "watchdog")
        if watchdog is not None and settings.slow_tasks:
            from catalog.watchdog import _running_on  # platform: needs running_on

            threshold = watchdog.settings.warn_after
            slow = [
                t
                for t in _running_on(worker)
                if threshold is not None and t["elapsed"] >= threshold
            ]
            out["slow"] = slow[: settings.slow_tasks]
            out["warn_after"] = threshold
        return _plain(out)


# ---------------------------------------------------------------------------
# Scheduler half: the data, built at request time
# ---------------------------------------------------------------------------

_CACHE: weakref.WeakKeyDictionary[Any, tuple[float, bytes]] = (
    weakref.WeakKeyDictionary()
)


def _settings(scheduler: Any) -> Any:
    plugin = _plugin(scheduler, "dashboard")
    if plugin is not None:
        return plugin.settings
    return ENTRY.resolve({}, owner="routes")


def _last(events: Any, n: int) -> list[Any]:
    """The last ``n`` items of a deque or tuple, newest first."""
    return list(itertools.islice(reversed(events), n)) if n > 0 else []


def _topics(scheduler: Any) -> dict[str, Any]:
    """Every ``catalog.*`` scheduler event topic's deque, by name."""
    broker = getattr(scheduler, "_broker", None)
    topics = getattr(broker, "_topics", None)
    if isinstance(topics, dict):
        return {
            name: topic.events
            for name, topic in list(topics.items())
            if str(name).startswith("catalog.")
        }
    return {
        name: events
        for name, events in scheduler.get_events().items()
        if str(name).startswith("catalog.")
    }


def _prefixes(scheduler: Any, workers: dict[str, Any]) -> list[dict[str, Any]]:
    metrics = _plugin(scheduler, "metrics")
    snap = metrics.snapshot() if metrics is not None else {}
    memory: dict[str, dict[str, Any]] = {}
    for info in workers.values():
        for prefix, st in (info.get("memory") or {}).items():
            m = memory.setdefault(prefix, {"count": 0, "max": 0, "failed": 0})
            m["count"] += st.get("count", 0)
            m["max"] = max(m["max"], st.get("max", 0))
            m["failed"] += st.get("failed", 0)
    rows = []
    for label in sorted(set(snap) | set(memory)):
        row: dict[str, Any] = {"prefix": label, **snap.get(label, {})}
        row["memory"] = memory.get(label)
        rows.append(row)
    rows.sort(key=lambda r: -(r.get("success", 0) + r.get("error", 0)))
    return rows


def data(scheduler: Any) -> dict[str, Any]:
    """Everything the page shows, from the scheduler's own state (no fan-out).

    Returns:
        ``{"time", "refresh", "scheduler", "workers", "settings", "prefixes",
        "slow", "timeouts", "events", "topics", "trace"}``; see the entry's docs
        page.
    """
    settings = _settings(scheduler)
    workers: dict[str, Any] = {}
    slow: list[dict[str, Any]] = []
    shared = SharedSettings()
    for address, ws in list(scheduler.workers.items()):
        summary = (ws.metrics or {}).get(SUMMARY_KEY)
        info: dict[str, Any] = {"name": str(ws.name)}
        if isinstance(summary, dict):
            info.update(summary)
            if isinstance(summary.get("entries"), dict):
                info["entries"] = shared.refer(summary["entries"])
            for task in summary.get("slow") or ():
                slow.append({"worker": address, **task})
        else:
            info["error"] = "no summary: the dashboard entry is not on this worker"
        workers[address] = info
    slow.sort(key=lambda t: -t.get("elapsed", 0))
    topics = {
        name: [{"time": t, "msg": msg} for t, msg in _last(events, settings.events)]
        for name, events in sorted(_topics(scheduler).items())
    }
    timeouts = [
        e
        for e in topics.get("catalog.watchdog", [])
        if isinstance(e["msg"], dict) and e["msg"].get("action") in TIMEOUT_ACTIONS
    ]
    prefixes = _prefixes(scheduler, workers)
    for info in workers.values():
        # Merged into ``prefixes``: per worker it would be most of the answer
        # (50 prefixes from each of 100 workers).
        info.pop("memory", None)
    log = _plugin(scheduler, "events")
    tracing = _plugin(scheduler, "tracer") is not None or any(
        "tracer" in (w.get("entries") or {}) for w in workers.values()
    )
    # Only the entries' settings are masked (in _entries): a task's "key"
    # is no secret, whatever its field name suggests.
    return _plain(
        {
            "time": time.time(),
            "refresh": settings.refresh,
            "scheduler": {"address": scheduler.address, **_entries(scheduler)},
            "workers": workers,
            "settings": shared.table,
            "prefixes": prefixes,
            "slow": slow,
            "timeouts": timeouts,
            "events": log.recent(settings.events) if log is not None else None,
            "topics": topics,
            "trace": {"available": tracing, "url": "catalog/trace.json"},
        }
    )


def _cached_data(scheduler: Any) -> bytes:
    ttl = min(_settings(scheduler).refresh, 2.0)
    current = time.monotonic()
    cached = _CACHE.get(scheduler)
    if cached is not None and current - cached[0] < ttl:
        return cached[1]
    body = json.dumps(data(scheduler), separators=(",", ":")).encode()
    _CACHE[scheduler] = (current, body)
    return body


# ---------------------------------------------------------------------------
# HTTP handlers
# ---------------------------------------------------------------------------

_STATIC = {
    "": ("index.html", "text/html; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


class _Handler(RequestHandler):
    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")


class PageHandler(_Handler):
    """The page and its script and style, from the package's static files."""

    def get(self, name: str = "") -> None:
        if name not in _STATIC:
            raise web.HTTPError(404)
        file, kind = _STATIC[name]
        self.set_header("Content-Type", kind)
        self.write(
            resources.files("catalog").joinpath("static").joinpath(file).read_bytes()
        )


class DataHandler(_Handler):
    """``data.json``: :func:`data`, cached for ``refresh`` (at most 2s)."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(_cached_data(self.server))


class TraceHandler(_Handler):
    """``trace.json``: the merged Perfetto trace, built when it is asked for."""

    async def get(self) -> None:
        from catalog.tracer import (  # platform: needs trace building in entry
            _snapshot_scheduler,
            _snapshot_worker,
            chrome_trace,
        )

        scheduler = self.server
        replies = await scheduler.broadcast(
            msg={
                "op": "run",
                "function": _dumps(_snapshot_worker),
                "args": _dumps(()),
                "kwargs": _dumps({}),
            },
            on_error="return",
        )
        sources = []
        for _, reply in sorted(replies.items()):
            if isinstance(reply, dict) and reply.get("status") == "OK":
                result = reply.get("result")
                if isinstance(result, Serialized):  # as the comm handed it over
                    result = deserialize(result.header, result.frames)
                if result:
                    sources.append(result)
        own = _snapshot_scheduler(scheduler)
        if own is not None:
            sources.append(own)
        self.set_header("Content-Type", "application/json")
        self.set_header(
            "Content-Disposition", 'attachment; filename="catalog-trace.json"'
        )
        self.write(json.dumps(chrome_trace(sources)))


def _dumps(obj: Any) -> bytes:
    from distributed.protocol.pickle import dumps

    return dumps(obj)


#: distributed's route list: name this module in
#: ``distributed.scheduler.http.routes`` to serve the page without the plugin.
routes: list[tuple[str, type, dict[str, Any]]] = [
    ("catalog", PageHandler, {}),
    ("catalog/data.json", DataHandler, {}),
    ("catalog/trace.json", TraceHandler, {}),
    (r"catalog/(dashboard\.(?:js|css))", PageHandler, {}),
]


def http_prefix(scheduler: Any) -> str:
    """The dashboard's ``--dashboard-prefix``, read back from its routes.

    distributed does not keep ``http_prefix``; every route it installed from
    ``distributed.scheduler.http.routes`` carries it, so it is found by
    matching those routes' own paths against the application's rules.
    """
    known: dict[type, str] = {}
    for module_name in dask.config.get("distributed.scheduler.http.routes", []):
        try:
            module = __import__(module_name, fromlist=["routes"])
        except Exception:
            continue
        for url, cls, _ in getattr(module, "routes", ()):
            known.setdefault(cls, url.lstrip("/"))
    for _, path, cls in _rules(scheduler.http_application):
        url = known.get(cls)
        if url is not None and path.endswith(url):
            return path[: len(path) - len(url)] or "/"
    return "/"


def _rules(app: Any) -> list[tuple[Any, str, Any]]:
    """``(rule, path pattern, handler class)`` of every path rule of ``app``."""
    out = []
    for host_rule in app.default_router.rules:
        for rule in getattr(host_rule.target, "rules", ()):
            regex = getattr(rule.matcher, "regex", None)
            if regex is not None:
                out.append((rule, regex.pattern.rstrip("$"), rule.target))
    return out


class Dashboard(SchedulerEntryPlugin):
    """Serve the catalog page at ``/catalog`` on the scheduler's dashboard address.

    distributed installs ``distributed.scheduler.http.routes`` before preloads
    run, so on setup the page's handlers are added to the running application,
    under the dashboard's prefix; when this module is already named in that
    config list, its routes are there and nothing is added. All the work
    happens when the page asks, from the scheduler's own state.

    Example:
        >>> import catalog
        >>> catalog.Dashboard(refresh="5s").settings.refresh
        5.0
    """

    entry = ENTRY

    def on_setup(self, scheduler: Any) -> None:
        self.url = None
        app = getattr(scheduler, "http_application", None)
        if app is None:
            logger.info("catalog.dashboard: the scheduler has no HTTP server")
            return
        mine = {cls for _, cls, _ in routes}
        prefix = http_prefix(scheduler)
        if not any(cls in mine for _, _, cls in _rules(app)):
            base = "/" + prefix.strip("/")
            base = base if base.endswith("/") else base + "/"
            app.add_handlers(
                r".*$",
                [
                    (base + url, cls, {"dask_server": scheduler})
                    for url, cls, _ in routes
                ],
            )
        self.url = prefix.rstrip("/") + "/catalog"
        logger.info("catalog.dashboard: the catalog page is at %s", self.url)

    def on_teardown(self, scheduler: Any) -> None:
        _CACHE.pop(scheduler, None)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "url": getattr(self, "url", None)}


dask_setup, dask_teardown = entry_preload(
    ENTRY, worker=WorkerDashboard, scheduler=Dashboard
)
