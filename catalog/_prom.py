"""Prometheus families shared by entries: one collector a process, series per server."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

__all__ = [
    "Families",
    "add_collector",
    "families_for",
    "register_process_collector",
    "remove_collector",
]

OTHER = "other"


class Families:
    """The catalog's metric families of one server (a worker or a scheduler).

    The metrics entry creates one at setup and drops it at teardown; other entries
    add their families with :meth:`counter` / :meth:`histogram` when the metrics
    entry is active beside them (:func:`families_for`). Metric objects are not
    registered anywhere themselves: one process-wide collector serves all of them,
    so several workers in one process never raise ``DuplicateTimeseries``.

    Args:
        namespace: prefix of every family name (``dask_catalog``).
        labels: constant labels of this server, e.g. ``{"worker": address}``.
        max_prefixes: distinct prefix label values before ``"other"``.
    """

    def __init__(
        self, namespace: str, labels: dict[str, str], max_prefixes: int
    ) -> None:
        self.namespace = namespace
        self.labels = labels
        self.max_prefixes = max_prefixes
        self._prefixes: set[str] = set()
        self._metrics: dict[str, Any] = {}
        self._bounds: dict[str, _Bound] = {}
        self._lock = threading.Lock()
        self.extra_collectors: list[Any] = []

    def prefix(self, prefix: str) -> str:
        """The label value for ``prefix``: itself, or ``"other"`` past the limit."""
        if prefix in self._prefixes:
            return prefix
        if len(self._prefixes) >= self.max_prefixes:
            return OTHER
        self._prefixes.add(prefix)
        return prefix

    def _get(
        self, kind: type, name: str, doc: str, labelnames: Sequence[str], **kwargs: Any
    ) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            with self._lock:
                metric = self._metrics.get(name)
                if metric is None:
                    metric = kind(
                        name,
                        doc,
                        labelnames=(*self.labels, *labelnames),
                        namespace=self.namespace,
                        registry=None,
                        **kwargs,
                    )
                    self._metrics[name] = metric
        return metric

    def _bound(self, kind: type, name: str, *args: Any, **kwargs: Any) -> Any:
        # Entries ask for a family at each event: hand back the same bound
        # wrapper, whose child cache makes the next `.labels()` a dict lookup.
        bound = self._bounds.get(name)
        if bound is None:
            metric = self._get(kind, name, *args, **kwargs)
            bound = self._bounds[name] = _Bound(metric, self.labels)
        return bound

    def counter(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> Counter:
        """A counter (``name`` without ``_total``), bound to this server's labels."""
        return self._bound(Counter, name, doc, labelnames)

    def gauge(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._bound(Gauge, name, doc, labelnames)

    def histogram(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
    ) -> Histogram:
        kwargs = {"buckets": tuple(buckets)} if buckets else {}
        return self._bound(Histogram, name, doc, labelnames, **kwargs)

    def collect(self) -> Iterator[Metric]:
        for metric in list(self._metrics.values()):
            for family in metric.collect():
                # `_created` samples add a series per child that PromQL never uses.
                family.samples = [
                    s for s in family.samples if not s.name.endswith("_created")
                ]
                yield family
        for collector in self.extra_collectors:
            yield from collector.collect()


class _Bound:
    """A metric with the server's labels filled in: ``.labels(prefix=...)``."""

    __slots__ = ("_cache", "_metric", "_server")

    def __init__(self, metric: Any, server_labels: dict[str, str]) -> None:
        self._metric = metric
        self._server = server_labels
        self._cache: dict[tuple, Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(
                *self._server.values(), *values
            )
        return child

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


#: Families of every server in this process with the metrics entry active.
_SERVERS: dict[int, tuple[Any, Families]] = {}
_SERVERS_LOCK = threading.Lock()


def attach(server: Any, families: Families) -> None:
    with _SERVERS_LOCK:
        _SERVERS[id(server)] = (server, families)


def detach(server: Any) -> None:
    with _SERVERS_LOCK:
        _SERVERS.pop(id(server), None)


#: Scrape-time collectors other entries keep per server, whatever the order in
#: which they and the metrics entry set up: served while metrics is active there.
_SCRAPE_TIME: dict[int, tuple[Any, list[Any]]] = {}


def add_collector(server: Any, collector: Any) -> None:
    """Serve ``collector.collect(families)`` whenever metrics is active on ``server``.

    ``families`` is that server's :class:`Families` (namespace and labels).
    """
    with _SERVERS_LOCK:
        _SCRAPE_TIME.setdefault(id(server), (server, []))[1].append(collector)


def remove_collector(server: Any, collector: Any) -> None:
    with _SERVERS_LOCK:
        found = _SCRAPE_TIME.get(id(server))
        if found is not None and collector in found[1]:
            found[1].remove(collector)
            if not found[1]:
                del _SCRAPE_TIME[id(server)]


def families_for(server: Any) -> Families | None:
    """The families of ``server`` when the metrics entry is active on it."""
    found = _SERVERS.get(id(server))
    return found[1] if found is not None and found[0] is server else None


def _server_metrics(server: Any, fam: Families) -> Iterator[Metric]:
    yield from fam.collect()
    found = _SCRAPE_TIME.get(id(server))
    if found is not None and found[0] is server:
        for collector in list(found[1]):
            yield from collector.collect(fam)


def collect_all(servers: Sequence[tuple[Any, Families]]) -> Iterator[Metric]:
    """Merge same-named families of several servers into one family each."""
    merged: dict[str, Metric] = {}
    for server, fam in servers:
        for metric in _server_metrics(server, fam):
            have = merged.get(metric.name)
            if have is None:
                merged[metric.name] = metric
            else:
                have.samples.extend(metric.samples)
    yield from merged.values()


class ProcessCollector:
    """The one collector in a registry that yields every server's catalog families."""

    def __init__(self, only: Any = None) -> None:
        self.only = only

    def collect(self) -> Iterator[Metric]:
        with _SERVERS_LOCK:
            servers = list(_SERVERS.values())
        chosen = [
            (server, fam)
            for server, fam in servers
            if self.only is None or server is self.only
        ]
        yield from collect_all(chosen)

    def describe(self) -> list[Metric]:
        # Not describing lets the registry accept us without calling collect().
        return []


_REGISTERED: set[int] = set()
_REGISTERED_LOCK = threading.Lock()


def register_process_collector(registry: CollectorRegistry = REGISTRY) -> None:
    """Put the process collector in ``registry`` once, however often it is asked."""
    with _REGISTERED_LOCK:
        if id(registry) in _REGISTERED:
            return
        registry.register(ProcessCollector())
        _REGISTERED.add(id(registry))
