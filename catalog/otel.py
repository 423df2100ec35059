"""Every task as an OpenTelemetry span, exported over OTLP/HTTP off the event loop."""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import click
import dask

from catalog._version import __version__
from catalog.entry import (
    Entry,
    EntryPlugin,
    Integer,
    NameValue,
    Option,
    OptionType,
    SchedulerEntryPlugin,
    Text,
    WorkerEntryPlugin,
    add_collector,
    address_of,
    bounded,
    entry_preload,
    guards_itself,
    mask_text,
    prefix_of,
    remove_collector,
    server_running,
)

__all__ = [
    "ENTRY",
    "EXTRA",
    "OpenTelemetry",
    "SchedulerOpenTelemetry",
    "dask_setup",
    "dask_teardown",
    "propagate",
    "span",
    "traceparent",
]

logger = logging.getLogger("catalog.otel")

#: What to install when the OpenTelemetry packages are missing.
EXTRA = 'pip install "dask-catalog[otel]"'
#: The annotation that carries a W3C trace context to the tasks.
ANNOTATION = "traceparent"
#: Worker states a task computes in, and the states a computed task ends in.
RUNNING = frozenset({"executing", "long-running", "resumed"})
FINISHED = frozenset({"memory", "error"})
#: Scheduler states a task waits in before it is sent to a worker.
WAITS = frozenset({"waiting", "queued", "no-worker"})
#: Tasks the scheduler half follows through their waits at most; later ones
#: get no scheduler spans (counted as dropped).
MAX_WAITING = 1_000_000
#: Spans per OTLP request, and seconds between the drain thread's rounds.
BATCH = 512
INTERVAL = 0.5
#: Seconds teardown waits for the last spans to leave before giving up on them.
FLUSH_TIMEOUT = 2.0
#: Characters of an error's text kept as the span's status description.
MAX_ERROR_TEXT = 1000


def _missing_extra() -> str | None:
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


def _require() -> None:
    problem = _missing_extra()
    if problem is not None:
        raise ImportError(problem)


class _OtelEntry(Entry):
    """The entry, refusing a command line in a process without the extra.

    Constructing a plugin does not need the extra (a client without it may
    register the entry on workers that have it); running one does.
    """

    # platform: needs an Entry "requires an extra" hook in catalog.entry
    def check_command_line(self, params: Any) -> None:
        super().check_command_line(params)
        problem = _missing_extra()
        if problem is not None:
            raise click.UsageError(problem)


class _Endpoint(OptionType):
    """An http(s) URL; a bare ``scheme://host:port`` gets OTLP's ``/v1/traces``."""

    name = "url"
    accepted = "an http:// or https:// URL, such as http://127.0.0.1:4318"
    nullable = True

    def parse(self, value: Any) -> str:
        text = str(value).strip() if isinstance(value, str) else ""
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("not an http(s) URL")
        if parts.path in ("", "/"):
            return text.rstrip("/") + "/v1/traces"
        return text


class _Header(NameValue):
    """``name=value``: one HTTP header sent with every export."""

    def __init__(self) -> None:
        super().__init__("name=value with name an HTTP header name")

    def check(self, name: str, value: str) -> None:
        if not name or not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in name):
            raise ValueError(f"{name!r} is not an HTTP header name")


class _Ratio(OptionType):
    """A fraction of traces kept, from 0 to 1."""

    name = "ratio"
    accepted = "a number from 0 to 1"
    nullable = True

    def parse(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("not a number")
        ratio = float(value)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("outside 0..1")
        return ratio


ENTRY = _OtelEntry(
    name="otel",
    summary="export every task as an OpenTelemetry span (OTLP/HTTP)",
    runs_on={
        "worker": "one span per task with its phases (compute, transfer, disk)",
        "scheduler": "spans of the time tasks wait (waiting, queued, no-worker)",
        "nanny": "nothing (one INFO line)",
        "client": "registers both halves; submits carry the current trace context",
    },
    options=[
        Option(
            "endpoint",
            _Endpoint(),
            None,
            "OTLP/HTTP traces URL (a bare http://host:port gets /v1/traces; "
            "default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT, "
            "then http://localhost:4318/v1/traces).",
        ),
        Option(
            "headers",
            _Header(),
            [],
            "HTTP headers sent with every export, name=value (repeatable; added to "
            "those of OTEL_EXPORTER_OTLP_TRACES_HEADERS / OTEL_EXPORTER_OTLP_HEADERS, "
            "replacing a header of the same name).",
            multiple=True,
            secret=True,
        ),
        Option(
            "sampling-ratio",
            _Ratio(),
            None,
            "Fraction of traces exported, decided on the trace id so every "
            "process agrees (a parent's decision wins; default: "
            "OTEL_TRACES_SAMPLER, else all).",
        ),
        Option(
            "service-name",
            Text("a service name"),
            None,
            "The resource's service.name (default: OTEL_SERVICE_NAME, "
            "OTEL_RESOURCE_ATTRIBUTES, then dask).",
        ),
        Option(
            "max-queue",
            Integer(1),
            10_000,
            "Tasks waiting for export per server at most; more are dropped and "
            "counted (a slow or down collector costs no more memory than this).",
        ),
    ],
    examples=[
        "dask worker tcp://127.0.0.1:8786 --preload catalog --enable otel "
        "--otel-endpoint http://127.0.0.1:4318",
        "dask scheduler --preload catalog.otel --otel-service-name etl",
    ],
)


# ---------------------------------------------------------------------------
# The SDK, imported when an entry sets up
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _sdk() -> SimpleNamespace:
    """The OpenTelemetry names the entry uses, imported on first use only."""
    _require()
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

        def __init__(self, pipeline: _Pipeline) -> None:
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


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else str(key)


def _task_ids(key: str, run_id: Any, trace_id: int | None) -> tuple[int, int]:
    """The (trace id, span id) of one run of a task: the same in every process."""
    digest = hashlib.blake2b(f"{run_id}\0{key}".encode(), digest_size=24).digest()
    span_id = int.from_bytes(digest[:8], "big") or 1
    if trace_id is None:
        trace_id = int.from_bytes(digest[8:], "big") or 1
    return trace_id, span_id


@functools.lru_cache(maxsize=4096)
def _parent(value: Any) -> Any:
    """The SpanContext a ``traceparent`` annotation names, or None."""
    if not isinstance(value, str):
        return None
    sdk = _sdk()
    ctx = sdk.propagator.extract({ANNOTATION: value})
    parent = sdk.trace.get_current_span(ctx).get_span_context()
    return parent if parent.is_valid else None


def _span_attributes(annotations: Any) -> dict[str, Any]:
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


class _Pipeline:
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
        sdk = _sdk()
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
        try:
            ok = self.exporter.export(batch) == _sdk().SUCCESS
            error = "the collector refused or could not be reached"
        except Exception as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
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
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(FLUSH_TIMEOUT)
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

    sdk = _sdk()
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


class _Collector:
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


def _quiet(on: bool) -> None:
    global _QUIET_USERS
    with _QUIET_LOCK:
        _QUIET_USERS += 1 if on else -1
        for name in _QUIET_LOGGERS:
            log = logging.getLogger(name)
            if _QUIET_USERS > 0 and _QUIET not in log.filters:
                log.addFilter(_QUIET)
            elif _QUIET_USERS <= 0:
                log.removeFilter(_QUIET)


# ---------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------


class _Exporting:
    """What both halves share: the pipeline, its collector and its status."""

    settings: Any
    server: Any
    role: str
    pipeline: _Pipeline | None = None

    def _start(self, server: Any) -> None:
        _sdk()  # the extra's absence fails setup here, naming the extra
        self.pipeline = _Pipeline(
            self.settings,
            self.role,
            address_of(server) if getattr(server, "address", None) else "",
            self._convert,
            while_running=server_running(server),
            name=str(getattr(server, "name", "") or ""),
        )
        self._records = self.pipeline.records
        self._cap = self.settings.max_queue
        self._collector: _Collector | None = _Collector(self)
        add_collector(server, self._collector)
        _quiet(True)

    def _stop(self, server: Any) -> None:
        collector = getattr(self, "_collector", None)
        if collector is not None:
            remove_collector(server, collector)
            self._collector = None
        pipeline = self.pipeline
        if pipeline is not None:
            self.pipeline = None
            pipeline.close()
            _quiet(False)
            counts = pipeline.counts()
            logger.info(
                "catalog.otel on %s: exported %d spans, %d failed, %d dropped",
                self.role,
                counts["exported"],
                counts["failed"],
                counts["dropped"],
            )

    def _convert(self, record: Any) -> None:
        raise NotImplementedError

    def memory(self) -> int | None:
        """Bytes the export queue holds, estimated: records and spans queued."""
        pipeline = self.pipeline
        if pipeline is None:
            return 0
        return len(pipeline.records) * 400 + len(pipeline.spans) * 1000

    def status(self) -> dict[str, Any]:
        out = super().status()  # type: ignore[misc]
        pipeline = self.pipeline
        out.update(
            pipeline.counts()
            if pipeline is not None
            else {"queued": 0, "dropped": 0, "exported": 0, "failed": 0}
        )
        return out

    def _sampled(self, parent: Any, trace_id: int, name: str) -> bool:
        """Whether the worker's sampler keeps the task span of this trace."""
        assert self.pipeline is not None
        sdk = _sdk()
        ctx = (
            sdk.trace.set_span_in_context(sdk.NonRecordingSpan(parent))
            if parent is not None
            else sdk.context.Context()
        )
        result = self.pipeline.sampler.should_sample(ctx, trace_id, name)
        return bool(result.decision.is_sampled())


class OpenTelemetry(_Exporting, WorkerEntryPlugin):
    """Export every task a worker runs as an OpenTelemetry span, with its phases.

    When a task finishes (``executing -> memory/error``) the hook appends one
    tuple to a bounded queue; a drain thread builds the task's span (name: its
    prefix) and one child span per entry of its ``startstops`` (``compute``,
    ``transfer``, ``disk-read``, ``disk-write``), and exports them over
    OTLP/HTTP. A task submitted under a ``traceparent`` annotation (see
    :func:`span` and :func:`propagate`) is parented to that span.

    Args:
        endpoint: the OTLP/HTTP traces URL, or None for the OTEL_* variables.
        headers: ``name=value`` headers sent with each export (secret).
        sampling_ratio: fraction of traces kept, or None for OTEL_TRACES_SAMPLER.
        service_name: the resource's ``service.name``, or None.
        max_queue: tasks waiting for export at most; more are dropped, counted.

    Example:
        >>> import catalog
        >>> plugin = catalog.OpenTelemetry(endpoint="http://127.0.0.1:4318")
        >>> plugin.settings.endpoint
        'http://127.0.0.1:4318/v1/traces'
        >>> # client.register_plugin(plugin) turns it on on every worker
    """

    entry = ENTRY

    def on_setup(self, worker: Any) -> None:
        self._tasks = worker.state.tasks
        self._threads = worker.state.threads
        self._address = address_of(worker)
        self._start(worker)

    def on_teardown(self, worker: Any) -> None:
        self._stop(worker)

    @guards_itself
    def transition(
        self,
        key: Any = None,
        start: str = "",
        finish: str = "",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        try:
            if finish in FINISHED and start in RUNNING:
                ts = self._tasks.get(key)
                if ts is None:
                    return
                if len(self._records) < self._cap:
                    self._records.append(
                        (
                            key,
                            ts.run_id,
                            tuple(ts.startstops),
                            ts.annotations,
                            ts.nbytes,
                            self._threads.get(key),
                            finish,
                            ts.exception_text,
                        )
                    )
                elif self.pipeline is not None:
                    self.pipeline.dropped += 1
        except Exception as exc:
            self.report_error("transition", exc)

    def _convert(self, record: Any) -> None:
        """The task's span and its phases' spans (on the drain thread)."""
        from distributed.utils import key_split_group

        key, run_id, startstops, annotations, nbytes, thread, finish, error = record
        phases = [
            ss
            for ss in startstops
            if ss.get("start") is not None and ss.get("stop") is not None
        ]
        if not phases:
            return
        assert self.pipeline is not None
        sdk, tracer, ids = _sdk(), self.pipeline.tracer, self.pipeline.ids
        text, prefix = _key_text(key), prefix_of(key)
        parent = _parent(annotations.get(ANNOTATION)) if annotations else None
        ids.trace_id, ids.span_id = _task_ids(
            text, run_id, parent.trace_id if parent is not None else None
        )
        attributes: dict[str, Any] = {
            "dask.key": text,
            "dask.prefix": prefix,
            "dask.group": key_split_group(key),
            "dask.worker": self._address,
            "dask.outcome": finish,
            "dask.run_id": run_id,
            **_span_attributes(annotations),
        }
        if nbytes is not None:
            attributes["dask.nbytes"] = nbytes
        if thread is not None:
            attributes["thread.id"] = thread
        context = (
            sdk.trace.set_span_in_context(sdk.NonRecordingSpan(parent))
            if parent is not None
            else sdk.context.Context()
        )
        task = tracer.start_span(
            prefix,
            context=context,
            attributes=attributes,
            start_time=_ns(min(ss["start"] for ss in phases)),
        )
        ids.trace_id = ids.span_id = None
        if finish == "error":
            task.set_status(sdk.Status(sdk.ERROR, (error or "")[:MAX_ERROR_TEXT]))
        inside = sdk.trace.set_span_in_context(task)
        for ss in phases:
            action = str(ss.get("action") or "unknown")
            phase_attributes = {"dask.phase": action, "dask.key": text}
            if ss.get("source"):
                phase_attributes["dask.source"] = str(ss["source"])
            phase = tracer.start_span(
                action,
                context=inside,
                attributes=phase_attributes,
                start_time=_ns(ss["start"]),
            )
            phase.end(end_time=_ns(ss["stop"]))
        task.end(end_time=_ns(max(ss["stop"] for ss in phases)))


class SchedulerOpenTelemetry(_Exporting, SchedulerEntryPlugin):
    """Export the time each task waited on the scheduler, as spans.

    A task's ``waiting``, ``queued`` and ``no-worker`` stints become spans of
    those names, children of the task's span on the worker that ran it (its
    id is derived from the task's key and run id, so no message is needed).
    It takes the same options as :class:`OpenTelemetry`; give both halves the
    same sampling settings, so that they keep the same traces.

    Example:
        >>> import catalog
        >>> catalog.SchedulerOpenTelemetry(service_name="etl").settings.service_name
        'etl'
        >>> # client.register_plugin(...) turns it on on the scheduler
    """

    entry = ENTRY

    def on_setup(self, scheduler: Any) -> None:
        self._tasks = scheduler.tasks
        self._clock = time.time
        # Drain-thread state: when each followed task entered its current
        # wait, and the waits it has finished, until it is sent to a worker.
        self._since: dict[Any, tuple[str, float]] = {}
        self._stints: dict[Any, list[tuple[str, float, float]]] = {}
        self._start(scheduler)

    def on_teardown(self, scheduler: Any) -> None:
        self._stop(scheduler)

    @guards_itself
    def transition(
        self,
        key: Any = None,
        start: str = "",
        finish: str = "",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        try:
            if start in WAITS or finish in WAITS:
                if len(self._records) >= self._cap:
                    if self.pipeline is not None:
                        self.pipeline.dropped += 1
                    return
                sent = None
                if finish == "processing":
                    ts = self._tasks.get(key)
                    if ts is not None:
                        ws = ts.processing_on
                        sent = (
                            ts.run_id,
                            ts.annotations,
                            ts.group.name,
                            ws.address if ws is not None else None,
                        )
                self._records.append((key, start, finish, self._clock(), sent))
        except Exception as exc:
            self.report_error("transition", exc)

    def _convert(self, record: Any) -> None:
        key, start, finish, t, sent = record
        since, stints = self._since, self._stints
        if start in WAITS:
            entered = since.pop(key, None)
            if entered is not None:
                stints.setdefault(key, []).append((entered[0], entered[1], t))
        if finish in WAITS:
            if bounded(since, key, MAX_WAITING):
                since[key] = (finish, t)
            elif self.pipeline is not None:
                self.pipeline.dropped += 1
            return
        done = stints.pop(key, None)
        if finish == "processing" and done and sent is not None:
            self._emit(key, done, *sent)

    def _emit(
        self,
        key: Any,
        stints: list[tuple[str, float, float]],
        run_id: Any,
        annotations: Any,
        group: str,
        worker: str | None,
    ) -> None:
        assert self.pipeline is not None
        sdk, tracer = _sdk(), self.pipeline.tracer
        text, prefix = _key_text(key), prefix_of(key)
        parent = _parent(annotations.get(ANNOTATION)) if annotations else None
        trace_id, span_id = _task_ids(
            text, run_id, parent.trace_id if parent is not None else None
        )
        flags = sdk.TraceFlags(
            sdk.TraceFlags.SAMPLED
            if self._sampled(parent, trace_id, prefix)
            else sdk.TraceFlags.DEFAULT
        )
        task = sdk.SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
        inside = sdk.trace.set_span_in_context(sdk.NonRecordingSpan(task))
        for state, begin, end in stints:
            attributes: dict[str, Any] = {
                "dask.key": text,
                "dask.prefix": prefix,
                "dask.group": group,
                "dask.state": state,
                "dask.run_id": run_id,
                **_span_attributes(annotations),
            }
            if worker:
                attributes["dask.worker"] = worker
            stint = tracer.start_span(
                state, context=inside, attributes=attributes, start_time=_ns(begin)
            )
            stint.end(end_time=_ns(end))


class _ClientContext(EntryPlugin):
    """The client half: every graph this process submits carries the trace context."""

    entry = ENTRY

    def on_setup(self, client: Any) -> None:
        propagate(True)

    def on_teardown(self, client: Any) -> None:
        propagate(False)


dask_setup, dask_teardown = entry_preload(
    ENTRY, worker=OpenTelemetry, scheduler=SchedulerOpenTelemetry, client=_ClientContext
)


# ---------------------------------------------------------------------------
# The client side: trace context into the tasks' annotations
# ---------------------------------------------------------------------------


def traceparent() -> str | None:
    """The W3C ``traceparent`` of the current OpenTelemetry span, or None.

    Use it as ``dask.annotate(traceparent=catalog.otel.traceparent())`` to
    parent the tasks submitted inside to that span.
    """
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    carrier: dict[str, str] = {}
    _sdk().propagator.inject(carrier)
    return carrier.get(ANNOTATION)


_ORIGINAL_ANNOTATIONS: Callable[[], dict[str, Any]] | None = None
_PROPAGATING = 0
_PROPAGATE_LOCK = threading.Lock()


def _annotations_with_context() -> dict[str, Any]:
    assert _ORIGINAL_ANNOTATIONS is not None
    annotations = _ORIGINAL_ANNOTATIONS()
    if ANNOTATION in annotations:
        return annotations
    value = traceparent()
    if value is None:
        return annotations
    return {**annotations, ANNOTATION: value}


def propagate(on: bool = True) -> None:
    """Make every graph this process submits carry the current trace context.

    While on, ``dask.get_annotations()`` (which ``Client.submit/compute/persist``
    read at submission) includes ``traceparent`` of the current OpenTelemetry
    span, so tasks submitted inside any client-side span are parented to it.
    The entry's preload on a client turns it on; calls nest (each ``True``
    needs a ``False``).
    """
    global _ORIGINAL_ANNOTATIONS, _PROPAGATING
    if on:
        _sdk()
    with _PROPAGATE_LOCK:
        if on:
            _PROPAGATING += 1
            if _ORIGINAL_ANNOTATIONS is None:
                _ORIGINAL_ANNOTATIONS = dask.get_annotations
                dask.get_annotations = _annotations_with_context  # type: ignore[assignment]
        elif _PROPAGATING > 0:
            _PROPAGATING -= 1
            if _PROPAGATING == 0 and _ORIGINAL_ANNOTATIONS is not None:
                dask.get_annotations = _ORIGINAL_ANNOTATIONS  # type: ignore[assignment]
                _ORIGINAL_ANNOTATIONS = None


_CLIENT_PIPELINE: _Pipeline | None = None
_CLIENT_LOCK = threading.Lock()


def _client_tracer() -> Any:
    """A tracer for client spans when the process has no OpenTelemetry of its own.

    It exports with the entry's settings (``catalog.otel.*`` config and the
    OTEL_* variables), from a thread of its own, flushed at exit.
    """
    global _CLIENT_PIPELINE
    sdk = _sdk()
    provider = sdk.trace.get_tracer_provider()
    if isinstance(provider, sdk.TracerProvider):
        return provider.get_tracer("catalog.otel", __version__)
    settings = ENTRY.resolve({})
    with _CLIENT_LOCK:
        old = _CLIENT_PIPELINE
        if old is None or old.settings != settings:
            # Config changed since the last span (a new endpoint): a new exporter.
            _CLIENT_PIPELINE = _Pipeline(settings, "client", "", lambda record: None)
            atexit.register(_CLIENT_PIPELINE.close)
            if old is not None:
                threading.Thread(target=old.close, daemon=True).start()
        return _CLIENT_PIPELINE.tracer


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A client-side span that the tasks submitted inside are parented to.

    It is a span of the process's own OpenTelemetry setup when it has one (a
    ``TracerProvider`` set with ``trace.set_tracer_provider``), else one the
    entry exports itself with its settings. The tasks get its context through
    the ``traceparent`` annotation.

    Args:
        name: the span's name.
        **attributes: the span's attributes.

    Example:
        >>> import catalog
        >>> with catalog.otel.span("load") as s:   # doctest: +SKIP
        ...     client.submit(load).result()
    """
    with _client_tracer().start_as_current_span(name, attributes=attributes) as s:
        carrier: dict[str, str] = {}
        _sdk().propagator.inject(carrier)
        with dask.annotate(**{ANNOTATION: carrier[ANNOTATION]}):
            yield s
