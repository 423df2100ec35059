"""Every task as an OpenTelemetry span, exported over OTLP/HTTP off the event loop."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import click
import dask
from distributed.utils import key_split_group

from catalog._otel import (
    ANNOTATION,
    EXTRA,
    Pipeline,
    PipelineCollector,
    key_text,
    load_sdk,
    missing_extra,
    ns,
    parent_of,
    quiet,
    span_attributes,
    task_ids,
)
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
    __version__,
    add_collector,
    address_of,
    bounded,
    entry_preload,
    guards_itself,
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

#: Worker states a task computes in, and the states a computed task ends in.
RUNNING = frozenset({"executing", "long-running", "resumed"})
FINISHED = frozenset({"memory", "error"})
#: Scheduler states a task waits in before it is sent to a worker.
WAITS = frozenset({"waiting", "queued", "no-worker"})
#: Tasks the scheduler half follows through their waits at most; later ones
#: get no scheduler spans (counted as dropped).
MAX_WAITING = 1_000_000
#: Characters of an error's text kept as the span's status description.
MAX_ERROR_TEXT = 1000


class _OtelEntry(Entry):
    """The entry, refusing a command line in a process without the extra.

    Constructing a plugin does not need the extra (a client without it may
    register the entry on workers that have it); running one does.
    """

    # platform: needs an Entry "requires an extra" hook in catalog.entry
    def check_command_line(self, params: Any) -> None:
        super().check_command_line(params)
        problem = missing_extra()
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
# Plugins
# ---------------------------------------------------------------------------


class _Exporting:
    """What both halves share: the pipeline, its collector and its status."""

    settings: Any
    server: Any
    role: str
    pipeline: Pipeline | None = None

    def _start(self, server: Any) -> None:
        load_sdk()  # the extra's absence fails setup here, naming the extra
        self.pipeline = Pipeline(
            self.settings,
            self.role,
            address_of(server) if getattr(server, "address", None) else "",
            self._convert,
            while_running=server_running(server),
            name=str(getattr(server, "name", "") or ""),
        )
        self._records = self.pipeline.records
        self._cap = self.settings.max_queue
        self._collector: PipelineCollector | None = PipelineCollector(self)
        add_collector(server, self._collector)
        quiet(True)

    def _stop(self, server: Any) -> None:
        collector = getattr(self, "_collector", None)
        if collector is not None:
            remove_collector(server, collector)
            self._collector = None
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.close()  # its last drain still builds spans through self
            self.pipeline = None
            quiet(False)
            counts = pipeline.counts()
            moved = counts["exported"] or counts["failed"] or counts["dropped"]
            logger.log(
                logging.INFO if moved else logging.DEBUG,
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
        sdk = load_sdk()
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
        key, run_id, startstops, annotations, nbytes, thread, finish, error = record
        phases = [
            ss
            for ss in startstops
            if ss.get("start") is not None and ss.get("stop") is not None
        ]
        if not phases:
            return
        assert self.pipeline is not None
        sdk, tracer, ids = load_sdk(), self.pipeline.tracer, self.pipeline.ids
        text, prefix = key_text(key), prefix_of(key)
        parent = parent_of(annotations.get(ANNOTATION)) if annotations else None
        ids.trace_id, ids.span_id = task_ids(
            text, run_id, parent.trace_id if parent is not None else None
        )
        attributes: dict[str, Any] = {
            "dask.key": text,
            "dask.prefix": prefix,
            "dask.group": key_split_group(key),
            "dask.worker": self._address,
            "dask.outcome": finish,
            "dask.run_id": run_id,
            **span_attributes(annotations),
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
            start_time=ns(min(ss["start"] for ss in phases)),
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
                start_time=ns(ss["start"]),
            )
            phase.end(end_time=ns(ss["stop"]))
        task.end(end_time=ns(max(ss["stop"] for ss in phases)))


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
                # A full queue drops only records that begin following a key: a
                # record that ends a wait frees the drain thread's state for that
                # key (dropping it left the key in _since/_stints for good: a
                # per-key leak while a collector is down or slow). Those records
                # are at most one per key the drain thread follows.
                if len(self._records) >= self._cap and start not in WAITS:
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
        sdk, tracer = load_sdk(), self.pipeline.tracer
        text, prefix = key_text(key), prefix_of(key)
        parent = parent_of(annotations.get(ANNOTATION)) if annotations else None
        trace_id, span_id = task_ids(
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
                **span_attributes(annotations),
            }
            if worker:
                attributes["dask.worker"] = worker
            stint = tracer.start_span(
                state, context=inside, attributes=attributes, start_time=ns(begin)
            )
            stint.end(end_time=ns(end))


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
    load_sdk().propagator.inject(carrier)
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
        load_sdk()
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


_CLIENT_PIPELINE: Pipeline | None = None
_CLIENT_LOCK = threading.Lock()


def _client_tracer() -> Any:
    """A tracer for client spans when the process has no OpenTelemetry of its own.

    It exports with the entry's settings (``catalog.otel.*`` config and the
    OTEL_* variables), from a thread of its own, flushed at exit.
    """
    global _CLIENT_PIPELINE
    sdk = load_sdk()
    provider = sdk.trace.get_tracer_provider()
    if isinstance(provider, sdk.TracerProvider):
        return provider.get_tracer("catalog.otel", __version__)
    settings = ENTRY.resolve({})
    with _CLIENT_LOCK:
        pipeline = old = _CLIENT_PIPELINE
        if pipeline is None or pipeline.settings != settings:
            # Config changed since the last span (a new endpoint): a new exporter.
            pipeline = Pipeline(settings, "client", "", lambda record: None)
            _CLIENT_PIPELINE = pipeline
            atexit.register(pipeline.close)
            if old is not None:
                threading.Thread(target=old.close, daemon=True).start()
        return pipeline.tracer


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
        load_sdk().propagator.inject(carrier)
        with dask.annotate(**{ANNOTATION: carrier[ANNOTATION]}):
            yield s
