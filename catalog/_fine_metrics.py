"""distributed's fine performance metrics as Prometheus counters, read when scraped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from catalog.entry import OTHER, add_collector, bounded, remove_collector

if TYPE_CHECKING:
    # platform: needs Families in catalog.entry (the type add_collector hands over)
    from catalog._prom import Families

__all__ = ["GROUPS", "MAX_NAMES", "MAX_PARSED", "FineMetrics", "install", "uninstall"]

#: Distinct values of ``activity``, ``where``, ``context`` and ``unit`` each before
#: ``"other"``: distributed names a dozen, but task code can add its own with
#: ``context_meter.digest_metric``.
MAX_NAMES = 100

#: Keys whose series are remembered between scrapes (about 300 B each, so 6 MB
#: at most); past it, further keys are worked out again at every scrape.
MAX_PARSED = 20_000

_UNSEEN = object()

#: Units with a family of their own (``_seconds_total``, ``_bytes_total``); any
#: other unit (``count``, a task's own) goes to the family with a ``unit`` label.
_UNITS = ("seconds", "bytes")

#: The contexts whose keys carry a second element (a prefix, where in a shuffle),
#: and which the spans extension apportions to spans (``CONTEXTS_WITH_SPAN_ID``).
_EXECUTE, _P2P, _WORKER = "execute", "p2p", "worker"

#: Family stem, label names, what is measured and distributed's key, by group.
#: The span groups sum over the prefix (``where`` stays) and add ``span``: a
#: span label times a prefix label would be the product of two caps.
GROUPS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    _EXECUTE: (
        "fine_execute",
        ("prefix", "activity"),
        "running tasks, by task prefix and activity",
        "('execute', prefix, activity, unit)",
    ),
    _P2P: (
        "fine_p2p",
        ("where", "activity"),
        "in P2P shuffles and rechunks, by where and activity",
        "('p2p', where, activity, unit)",
    ),
    _WORKER: (
        "fine_worker",
        ("context", "activity"),
        "outside tasks (gather-dep: fetching inputs, get-data: sending data, "
        "memory-monitor: spilling), by context and activity",
        "(context, activity, unit)",
    ),
    "span_execute": (
        "fine_span_execute",
        ("span", "activity"),
        "running the tasks of each span (its own, not its sub-spans'), by span "
        "and activity",
        "('execute', prefix, activity, unit) of the span, prefixes summed",
    ),
    "span_p2p": (
        "fine_span_p2p",
        ("span", "where", "activity"),
        "in P2P shuffles and rechunks of each span (its own), by span, where and "
        "activity",
        "('p2p', where, activity, unit) of the span",
    ),
}

_UNIT_HELP = {
    "seconds": "Seconds workers spent",
    "bytes": "Bytes workers handled",
    "": "Operations (unit count) and other units workers counted",
}


def _text(part: Any) -> str:
    """A label value of a key's element (a task's own label may be a tuple)."""
    if isinstance(part, tuple):
        return "/".join(map(_text, part))
    return str(part)


class _Capped:
    """Label values of one kind: the first ``cap`` distinct ones, then ``other``."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if not bounded(self.seen, value, self.cap):
            return OTHER
        self.seen.add(value)
        return value


class FineMetrics:
    """The scheduler's fine performance metrics, folded into counters at scrape time.

    Reads ``Scheduler.cumulative_worker_metrics`` (every worker's metrics, summed
    by the scheduler at each heartbeat) and each span's own metrics from the
    spans extension; nothing runs per task. A label value, once given, stays
    given (past a cap new values are ``other``), so every series only grows.

    Args:
        scheduler: the scheduler whose accumulators are read.
        max_prefixes: distinct span names before ``span="other"`` (task prefixes
            share the metrics entry's own cap through ``Families.prefix``).
        report_error: called with what failed and the exception, when a scrape
            could not read the accumulators (the scrape then goes on without
            these families).
    """

    def __init__(
        self,
        scheduler: Any,
        max_prefixes: int,
        report_error: Callable[[str, BaseException], None],
    ) -> None:
        self.scheduler = scheduler
        self.report_error = report_error
        self._spans = _Capped(max_prefixes)
        self._names = {
            kind: _Capped(MAX_NAMES)
            for kind in ("activity", "where", "context", "unit")
        }
        #: (span or None, distributed's key) -> its (group, unit) and labels.
        self._parsed: dict[tuple[str | None, Hashable], Any] = {}
        # Scrapes come from the event loop (dashboard) and from the exporter's
        # threads (standalone port, pusher): one at a time assigns labels.
        self._lock = threading.Lock()

    def collect(self, fam: Families) -> Iterator[Metric]:
        try:
            families = self._families(fam)
        except Exception as exc:
            self.report_error("fine performance metrics", exc)
            return
        yield from families

    def _families(self, fam: Families) -> list[Metric]:
        # Copies first: the event loop adds to these dicts at every heartbeat,
        # and copying a dict is atomic where iterating it is not.
        metrics = dict(self.scheduler.cumulative_worker_metrics)
        ext = self.scheduler.extensions.get("spans")
        spans = list(ext.spans.values()) if ext is not None else []
        totals: dict[tuple[str, str], dict[tuple[str, ...], float]] = {
            (group, unit): {} for group in GROUPS for unit in (*_UNITS, "")
        }
        with self._lock:
            self._fold(totals, fam, None, metrics)
            for span in spans:
                name = self._spans("/".join(map(_text, span.name)))
                self._fold(totals, fam, name, dict(span._cumulative_worker_metrics))
        out: list[Metric] = []
        for (group, unit), series in totals.items():
            stem, labels, what, key = GROUPS[group]
            name = f"{fam.namespace}_{stem}" + (f"_{unit}" if unit else "")
            family = CounterMetricFamily(
                name,
                f"{_UNIT_HELP[unit]} {what} (distributed's fine performance "
                f"metrics, key {key}).",
                labels=[*labels, "unit"] if not unit else list(labels),
            )
            for values, total in series.items():
                family.add_metric(list(values), total)
            out.append(family)
        return out

    def _fold(
        self,
        totals: dict[tuple[str, str], dict[tuple[str, ...], float]],
        fam: Families,
        span: str | None,
        metrics: dict[Hashable, float],
    ) -> None:
        """Add ``metrics`` (``span``'s own, or the scheduler's) to their series."""
        parsed = self._parsed
        for key, value in metrics.items():
            # The same keys come back at every scrape (and in span after span):
            # their series, once worked out, stay the same.
            cached = (span, key)
            found = parsed.get(cached, _UNSEEN)
            if found is _UNSEEN:
                found = self._series_of(fam, span, key)
                if len(parsed) < MAX_PARSED:
                    parsed[cached] = found
            if found is not None:
                series = totals[found[0]]
                series[found[1]] = series.get(found[1], 0) + value

    def _series_of(
        self, fam: Families, span: str | None, key: Hashable
    ) -> tuple[tuple[str, str], tuple[str, ...]] | None:
        """The (group, unit) and label values of one key, None if not exported."""
        # String keys (latency, tick-duration, transfer-bandwidth...) are sums of
        # other digests, not fine performance metrics.
        if not isinstance(key, tuple) or len(key) < 3:
            return None
        context, unit = key[0], _text(key[-1])
        labels: tuple[str, ...]
        if context == _EXECUTE or context == _P2P:
            if len(key) < 4:
                return None
            scope, activity = _text(key[1]), self._names["activity"](_text(key[2:-1]))
            if context == _EXECUTE:
                labels = (
                    (fam.prefix(scope), activity) if span is None else (span, activity)
                )
            else:
                where = self._names["where"](scope)
                labels = (where, activity) if span is None else (span, where, activity)
            group = context if span is None else f"span_{context}"
        elif span is not None:
            return None  # the spans extension keeps no other contexts
        else:
            group = _WORKER
            labels = (
                self._names["context"](_text(context)),
                self._names["activity"](_text(key[1:-1])),
            )
        if unit not in _UNITS:
            labels = (*labels, self._names["unit"](unit))
            unit = ""
        return (group, unit), labels


def install(plugin: Any, scheduler: Any) -> FineMetrics | None:
    """Serve ``scheduler``'s fine metrics beside ``plugin``'s (a SchedulerMetrics).

    None when the ``fine-metrics`` option is off.
    """
    if not plugin.settings.fine_metrics:
        return None
    collector = FineMetrics(
        scheduler, plugin.settings.max_prefixes, plugin.report_error
    )
    add_collector(scheduler, collector)
    return collector


def uninstall(scheduler: Any, collector: FineMetrics | None) -> None:
    """Undo :func:`install` (``collector`` None: nothing was installed)."""
    if collector is not None:
        remove_collector(scheduler, collector)
