"""Prometheus families shared by entries: plain counts, folded in at scrape time."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = [
    "OTHER",
    "Collector",
    "Families",
    "ProcessCollector",
    "add_collector",
    "attach",
    "detach",
    "families_for",
    "histogram_family",
    "register_process_collector",
    "remove_collector",
]

OTHER = "other"

#: prometheus_client's own default ladder, for a histogram asked without buckets.
DEFAULT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


class Collector(Protocol):
    """What :func:`add_collector` takes: families computed at scrape time."""

    def collect(self, fam: Families) -> Iterable[Metric]:
        """The families of one server; ``fam`` gives namespace and labels."""


class Histogram:
    """Counts per bucket and a sum, kept in plain lists until a scrape.

    ``counts[i]`` counts the values in ``(buckets[i-1], buckets[i]]`` and the
    last slot those above every bucket, so :meth:`observe` is one bisection
    and two additions; the cumulative Prometheus form is built at scrape time.
    Callers that are not alone on their thread hold a lock around it.
    """

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        """Fold ``other`` (same buckets) into this one."""
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum


def histogram_family(
    name: str,
    doc: str,
    labelnames: Sequence[str],
    series: Iterable[tuple[Sequence[str], Histogram]],
    per_bucket: bool = True,
) -> Metric:
    """One Prometheus family of ``series`` (label values, histogram).

    With ``per_bucket`` false the family is a summary: ``_count`` and ``_sum``
    only, two series each instead of one per bucket plus three.
    """
    if not per_bucket:
        summary = SummaryMetricFamily(name, doc, labels=labelnames)
        for values, h in series:
            summary.add_metric(list(values), h.count, h.sum)
        return summary
    family = HistogramMetricFamily(name, doc, labels=labelnames)
    for values, h in series:
        cumulative, total = [], 0
        for bound, n in zip((*h.buckets, float("inf")), h.counts, strict=True):
            total += n
            cumulative.append((floatToGoString(bound), total))
        family.add_metric(list(values), cumulative, h.sum)
    return family


class _Family:
    """A family other entries write to through :class:`Families`: plain values."""

    def __init__(
        self, families: Families, name: str, doc: str, labelnames: Sequence[str]
    ) -> None:
        self.families = families
        self.name = f"{families.namespace}_{name}"
        self.doc = doc
        self.labelnames = (*families.labels, *labelnames)
        self._lock = families.lock
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        """The child of these label values (the server's own are filled in)."""
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(values, self._child())
        return child

    def _child(self) -> Any:
        raise NotImplementedError

    def _items(self) -> list[tuple[tuple[str, ...], Any]]:
        server = tuple(self.families.labels.values())
        with self._lock:
            children = list(self._children.items())
        return [(server + values, child) for values, child in children]


class _CounterChild:
    __slots__ = ("_lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        # Entries count from the event loop and from their own threads.
        with self._lock:
            self.value += amount


class _Counter(_Family):
    def _child(self) -> _CounterChild:
        return _CounterChild(self._lock)

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self._items():
            family.add_metric(list(values), child.value)
        return family


class _HistogramChild(Histogram):
    __slots__ = ("_lock",)

    def __init__(self, buckets: Sequence[float], lock: threading.Lock) -> None:
        super().__init__(buckets)
        self._lock = lock

    def observe(self, value: float) -> None:
        with self._lock:
            Histogram.observe(self, value)


class _Histogram(_Family):
    def __init__(self, *args: Any, buckets: Sequence[float]) -> None:
        super().__init__(*args)
        self.buckets = tuple(buckets) or DEFAULT_BUCKETS

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets, self._lock)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Metric:
        items = self._items()
        with self._lock:  # a consistent copy: counts and sum of one moment
            copies = []
            for values, child in items:
                h = Histogram(child.buckets)
                h.add(child)
                copies.append((values, h))
        per_bucket = self.families.prefix_buckets or "prefix" not in self.labelnames
        return histogram_family(
            self.name, self.doc, self.labelnames, copies, per_bucket=per_bucket
        )


class Families:
    """The catalog's metric families of one server (a worker or a scheduler).

    The metrics entry creates one at setup and drops it at teardown; other entries
    add their families with :meth:`counter` / :meth:`histogram` when the metrics
    entry is active beside them (:func:`families_for`). Nothing is registered
    with prometheus_client: values are plain numbers, and one process-wide
    collector turns them into families at scrape time, so several workers in one
    process never raise ``DuplicateTimeseries``.

    Args:
        namespace: prefix of every family name (``dask_catalog``).
        labels: constant labels of this server, e.g. ``{"worker": address}``.
        max_prefixes: distinct prefix label values before ``"other"``.
        prefix_buckets: histograms with a ``prefix`` label keep their buckets
            per prefix; when false they are summaries (count and sum) per prefix.
    """

    def __init__(
        self,
        namespace: str,
        labels: dict[str, str],
        max_prefixes: int,
        prefix_buckets: bool = False,
    ) -> None:
        self.namespace = namespace
        self.labels = labels
        self.max_prefixes = max_prefixes
        self.prefix_buckets = prefix_buckets
        self.lock = threading.Lock()
        self._prefixes: set[str] = set()
        self._families: dict[str, _Counter | _Histogram] = {}

    def prefix(self, prefix: str) -> str:
        """The label value for ``prefix``: itself, or ``"other"`` past the limit."""
        if prefix in self._prefixes:
            return prefix
        if len(self._prefixes) >= self.max_prefixes:
            return OTHER
        self._prefixes.add(prefix)
        return prefix

    def counter(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> Any:
        """A counter (``name`` without ``_total``), bound to this server's labels."""
        family = self._families.get(name)
        if family is None:
            with self.lock:
                family = self._families.setdefault(
                    name, _Counter(self, name, doc, labelnames)
                )
        return family

    def histogram(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
    ) -> Any:
        """A histogram bound to this server's labels: ``.labels(...).observe(v)``."""
        family = self._families.get(name)
        if family is None:
            with self.lock:
                family = self._families.setdefault(
                    name, _Histogram(self, name, doc, labelnames, buckets=buckets)
                )
        return family

    def collect(self) -> Iterator[Metric]:
        """The families entries wrote to, as Prometheus families."""
        with self.lock:
            families = list(self._families.values())
        for family in families:
            yield family.collect()


#: Families of every server in this process with the metrics entry active.
_SERVERS: dict[int, tuple[Any, Families]] = {}
_SERVERS_LOCK = threading.Lock()

#: Scrape-time collectors entries keep per server, whatever the order in which
#: they and the metrics entry set up: served while metrics is active there.
_COLLECTORS: dict[int, tuple[Any, list[Collector]]] = {}


def attach(server: Any, families: Families) -> None:
    """Serve ``families`` as ``server``'s (the metrics entry's setup)."""
    with _SERVERS_LOCK:
        _SERVERS[id(server)] = (server, families)


def detach(server: Any) -> None:
    with _SERVERS_LOCK:
        _SERVERS.pop(id(server), None)


def add_collector(server: Any, collector: Collector) -> None:
    """Serve ``collector.collect(families)`` whenever metrics is active on ``server``.

    ``families`` is that server's :class:`Families` (namespace and labels).
    """
    with _SERVERS_LOCK:
        _COLLECTORS.setdefault(id(server), (server, []))[1].append(collector)


def remove_collector(server: Any, collector: Collector) -> None:
    with _SERVERS_LOCK:
        found = _COLLECTORS.get(id(server))
        if found is not None and collector in found[1]:
            found[1].remove(collector)
            if not found[1]:
                del _COLLECTORS[id(server)]


def families_for(server: Any) -> Families | None:
    """The families of ``server`` when the metrics entry is active on it."""
    found = _SERVERS.get(id(server))
    return found[1] if found is not None and found[0] is server else None


def _server_metrics(server: Any, fam: Families) -> Iterator[Metric]:
    with _SERVERS_LOCK:
        found = _COLLECTORS.get(id(server))
        collectors = list(found[1]) if found is not None and found[0] is server else []
    # Collectors first: one may fold pending counts into ``fam`` (memory's).
    extra = [metric for collector in collectors for metric in collector.collect(fam)]
    yield from fam.collect()
    yield from extra


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
