"""The otel entry's export pipeline: the SDK imported lazily, a queue, a drain thread.

Nothing here imports OpenTelemetry at import time: ``import catalog`` and the
other entries must work without the ``otel`` extra.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import dask

from catalog._version import __version__  # platform: needs __version__ in catalog.entry
from catalog.entry import mask_text

__all__ = [
    "ANNOTATION",
    "EXTRA",
    "Pipeline",
    "PipelineCollector",
    "key_text",
    "load_sdk",
    "missing_extra",
    "ns",
    "parent_of",
    "quiet",
    "span_attributes",
    "task_ids",
]

logger = logging.getLogger("catalog.otel")

#: What to install when the OpenTelemetry packages are missing.
EXTRA = 'pip install "dask-catalog[otel]"'
#: The annotation that carries a W3C trace context to the tasks.
ANNOTATION = "traceparent"
#: Spans per OTLP request, and seconds between the drain thread's rounds.
BATCH = 512
INTERVAL = 0.5
#: Seconds teardown waits for the last spans to leave before giving up on them.
FLUSH_TIMEOUT = 2.0
#: Seconds an export may take at teardown before the collector counts as down.
SLOW_EXPORT = 0.5


def missing_extra() -> str | None:
    """Why the entry cannot run in this process, or None when it can."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        return (
            f"catalog entry 'otel' needs the OpenTelemetry SDK and OTLP exporter, "
            f"which are not installed ({exc}): {EXTRA}"
        )
    return None


def require() -> None:
    problem = missing_extra()
    if problem is not None:
        raise ImportError(problem)


# ---------------------------------------------------------------------------
# The SDK, imported when an entry sets up
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_sdk() -> SimpleNamespace:
    """The OpenTelemetry names the entry uses, imported on first use only."""
    require()
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from opentelemetry.trace.propagation.tracecontext import (
        TraceContextTextMapPropagator,
    )
    from opentelemetry.trace.status import Status, StatusCode

    class Ids(RandomIdGenerator):
        """Random ids, except those the drain thread sets for the next span.

        A task's span id (and, without a client context, its trace id) is
        derived from its key and run id, so the scheduler half can parent its
        spans to a span a worker creates, without any message between them.
        """

        def __init__(self) -> None:
            self.trace_id: int | None = None
            self.span_id: int | None = None

        def generate_trace_id(self) -> int:
            value, self.trace_id = self.trace_id, None
            return value if value is not None else super().generate_trace_id()

        def generate_span_id(self) -> int:
            value, self.span_id = self.span_id, None
            return value if value is not None else super().generate_span_id()

    class Collect(SpanProcessor):
        """Hands every ended span to the pipeline's bounded export queue."""

        def __init__(self, pipeline: Pipeline) -> None:
            self.pipeline = pipeline

        def on_end(self, span: Any) -> None:
            self.pipeline.offer_span(span)

    return SimpleNamespace(
        context=otel_context,
        trace=trace,
        Exporter=OTLPSpanExporter,
        Resource=Resource,
        TracerProvider=TracerProvider,
        SUCCESS=SpanExportResult.SUCCESS,
        ParentBased=ParentBased,
        TraceIdRatioBased=TraceIdRatioBased,
        NonRecordingSpan=NonRecordingSpan,
        SpanContext=SpanContext,
        TraceFlags=TraceFlags,
        propagator=TraceContextTextMapPropagator(),
        Status=Status,
        ERROR=StatusCode.ERROR,
        Ids=Ids,
        Collect=Collect,
    )


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


def key_text(key: Any) -> str:
    return key if isinstance(key, str) else str(key)


def task_ids(key: str, run_id: Any, trace_id: int | None) -> tuple[int, int]:
    """The (trace id, span id) of one run of a task: the same in every process."""
    digest = hashlib.blake2b(f"{run_id}\0{key}".encode(), digest_size=24).digest()
    span_id = int.from_bytes(digest[:8], "big") or 1
    if trace_id is None:
        trace_id = int.from_bytes(digest[8:], "big") or 1
    return trace_id, span_id


@functools.lru_cache(maxsize=4096)
def parent_of(value: Any) -> Any:
    """The SpanContext a ``traceparent`` annotation names, or None."""
    if not isinstance(value, str):
        return None
    sdk = load_sdk()
    ctx = sdk.propagator.extract({ANNOTATION: value})
    parent = sdk.trace.get_current_span(ctx).get_span_context()
    return parent if parent.is_valid else None


def span_attributes(annotations: Any) -> dict[str, Any]:
    """Dask's own ``span()`` names of a task, as attributes."""
    found = annotations.get("span") if isinstance(annotations, dict) else None
    if not isinstance(found, dict):
        return {}
    out: dict[str, Any] = {}
    names = found.get("name")
    if names:
        out["dask.span.name"] = [str(n) for n in names]
    ids = found.get("ids")
    if ids:
        out["dask.span.id"] = str(ids[-1])
    return out


# ---------------------------------------------------------------------------
# The pipeline: a bounded queue, a drain thread, the SDK's OTLP exporter
# ---------------------------------------------------------------------------


class Pipeline:
    """Turns queued records into spans and exports them, on its own thread.

    The event loop only appends plain tuples to ``records`` (while it holds
    fewer than ``cap``); the drain thread builds the spans with the SDK's
    tracer (sampler, ids, limits) and posts them with the SDK's OTLP/HTTP
    exporter. A slow or down collector blocks only this thread: records past
    ``cap`` are dropped and counted, never waited for.
    """

    def __init__(
        self,
        settings: Any,
        role: str,
        address: str,
        convert: Callable[[Any], None],
        while_running: Callable[[], bool] = lambda: True,
        name: str = "",
    ) -> None:
        sdk = load_sdk()
        self.settings = settings
        self.role = role
        self.cap = settings.max_queue
        self.records: deque[Any] = deque()
        self.spans: deque[Any] = deque()
        self.dropped = 0  # records, counted by the event loop only
        self.dropped_spans = 0  # finished spans past the queue (client threads)
        self.exported = 0
        self.failed = 0
        self.last_error: str | None = None
        self._convert = convert
        self._while_running = while_running
        headers = dict(h.split("=", 1) for h in settings.headers) or None
        self.exporter = sdk.Exporter(endpoint=settings.endpoint, headers=headers)
        self.endpoint = str(getattr(self.exporter, "_endpoint", settings.endpoint))
        sampler = (
            sdk.ParentBased(sdk.TraceIdRatioBased(settings.sampling_ratio))
            if settings.sampling_ratio is not None
            else None  # the SDK reads OTEL_TRACES_SAMPLER(_ARG)
        )
        self.ids = sdk.Ids()
        self.provider = sdk.TracerProvider(
            sampler=sampler,
            resource=_resource(settings, role, address, name),
            shutdown_on_exit=False,
            id_generator=self.ids,
        )
        self.provider.add_span_processor(sdk.Collect(self))
        self.sampler = self.provider.sampler
        self.tracer = self.provider.get_tracer("catalog.otel", __version__)
        self._stop = threading.Event()
        self._abandon = False
        self._closed = False
        self._exporting_since: float | None = None
        # A client's pipeline runs its thread only while spans wait: nothing
        # outlives the client's work (it ends the spans, they go, it stops).
        self._on_demand = role == "client"
        self._lock = threading.Lock()
        self._running = False
        self._thread = threading.Thread()
        if not self._on_demand:
            self._wake()

    def _wake(self) -> None:
        with self._lock:
            if not self._running:
                self._running = True
                self._thread = threading.Thread(
                    target=self._run, name=f"catalog.otel-{self.role}", daemon=True
                )
                self._thread.start()

    # -- queueing ------------------------------------------------------------
    def offer_span(self, span: Any) -> None:
        if len(self.spans) < self.cap * 4:
            self.spans.append(span)
            if self._on_demand:
                self._wake()
        else:
            self.dropped_spans += 1

    @property
    def queued(self) -> int:
        return len(self.records) + len(self.spans)

    # -- the drain thread ----------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(INTERVAL) or not self._while_running()
            try:
                self._drain()
            except Exception as exc:  # the thread never dies
                self.last_error = mask_text(f"{type(exc).__name__}: {exc}")
            if stopping:
                break
            if self._on_demand:
                with self._lock:
                    if not self.records and not self.spans:
                        self._running = False
                        return
        with self._lock:
            self._running = False

    def _drain(self) -> None:
        records, spans = self.records, self.spans
        while records or spans:
            if self._abandon:
                self.failed += len(spans)
                self.dropped += len(records)
                spans.clear()
                records.clear()
                return
            for _ in range(min(len(records), BATCH)):
                record = records.popleft()
                try:
                    self._convert(record)
                except Exception as exc:
                    self.last_error = mask_text(
                        f"building spans: {type(exc).__name__}: {exc}"
                    )
            while spans and not self._abandon:
                batch = [spans.popleft() for _ in range(min(len(spans), BATCH))]
                self._export(batch)

    def _export(self, batch: list[Any]) -> None:
        self._exporting_since = time.monotonic()
        try:
            ok = self.exporter.export(batch) == load_sdk().SUCCESS
            error = "the collector refused or could not be reached"
        except Exception as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        finally:
            self._exporting_since = None
        if ok:
            if self.last_error is not None and self.failed:
                logger.info("catalog.otel: exporting to %s again", self.endpoint)
            self.exported += len(batch)
            self.last_error = None
            return
        if self.failed == 0:
            logger.warning(
                "catalog.otel: could not export %d spans to %s (%s); spans are "
                "counted as failed from now on (dask catalog status)",
                len(batch),
                self.endpoint,
                error,
            )
        self.failed += len(batch)
        self.last_error = mask_text(f"export to {self.endpoint}: {error}")

    def close(self) -> None:
        """Export what is queued within ``FLUSH_TIMEOUT``; drop the rest."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.05)
            since = self._exporting_since
            if since is not None and time.monotonic() - since > SLOW_EXPORT:
                # A request this slow is the exporter retrying a collector that
                # is down: a server's close does not wait out its back-off.
                break
        self._abandon = True
        self.exporter.shutdown()  # ends a retry's back-off wait at once
        if self._thread.is_alive():
            self._thread.join(FLUSH_TIMEOUT)

    def counts(self) -> dict[str, Any]:
        return {
            "endpoint": mask_text(self.endpoint),
            "queued": self.queued,
            "dropped": self.dropped + self.dropped_spans,
            "exported": self.exported,
            "failed": self.failed,
            "last_export_error": self.last_error,
        }


def _resource(settings: Any, role: str, address: str, name: str) -> Any:
    """Resource attributes of one process: who exports, and which versions."""
    import distributed

    sdk = load_sdk()
    attributes: dict[str, Any] = {
        "dask.role": role,
        "service.instance.id": address or f"{role}-{os.getpid()}",
        "process.pid": os.getpid(),
        "host.name": socket.gethostname(),
        "dask.version": dask.__version__,
        "distributed.version": distributed.__version__,
        "catalog.version": __version__,
    }
    if address:
        attributes[f"dask.{role}.address"] = address
    if name:
        attributes[f"dask.{role}.name"] = name
    if settings.service_name:
        attributes["service.name"] = settings.service_name
    resource = sdk.Resource.create(attributes)
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(sdk.Resource({"service.name": "dask"}))
    return resource


class PipelineCollector:
    """Scrape-time counts of one pipeline, served through the metrics entry."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def collect(self, fam: Any) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pipeline = getattr(self.plugin, "pipeline", None)
        if pipeline is None:
            return
        names, values = list(fam.labels), list(fam.labels.values())
        for kind, name, doc, value in (
            (
                CounterMetricFamily,
                "spans_exported",
                "Spans the collector accepted.",
                pipeline.exported,
            ),
            (
                CounterMetricFamily,
                "spans_failed",
                "Spans lost to failed exports (collector down or refusing).",
                pipeline.failed,
            ),
            (
                CounterMetricFamily,
                "dropped",
                "Tasks (and client spans) dropped because the export queue was full.",
                pipeline.dropped + pipeline.dropped_spans,
            ),
            (
                GaugeMetricFamily,
                "queued",
                "Tasks and spans waiting for export.",
                pipeline.queued,
            ),
        ):
            family = kind(f"{fam.namespace}_otel_{name}", doc, labels=names)
            family.add_metric(values, value)
            yield family


# ---------------------------------------------------------------------------
# Quiet SDK logs while a pipeline reports for itself
# ---------------------------------------------------------------------------


class _Quiet(logging.Filter):
    """Drops the exporter's per-batch retry and failure lines.

    With a collector down they would come every few seconds for as long as it
    stays down; the pipeline logs one WARNING instead and counts the rest.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


_QUIET = _Quiet()
_QUIET_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)
_QUIET_USERS = 0
_QUIET_LOCK = threading.Lock()


def quiet(on: bool) -> None:
    global _QUIET_USERS
    with _QUIET_LOCK:
        _QUIET_USERS += 1 if on else -1
        for name in _QUIET_LOGGERS:
            log = logging.getLogger(name)
            if _QUIET_USERS > 0 and _QUIET not in log.filters:
                log.addFilter(_QUIET)
            elif _QUIET_USERS <= 0:
                log.removeFilter(_QUIET)
