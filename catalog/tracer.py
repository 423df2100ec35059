"""Every task transition recorded cheaply, exported as a Perfetto / Chrome trace."""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, get_args

import click
from distributed.scheduler import TaskStateState as _SchedulerState
from distributed.worker_state_machine import TaskStateState as _WorkerState

from catalog.entry import (
    Choice,
    Duration,
    Entry,
    Integer,
    JsonLinesFile,
    Option,
    SchedulerEntryPlugin,
    Size,
    Text,
    WorkerEntryPlugin,
    add_collector,
    client_call,
    client_then,
    entry_preload,
    guards_itself,
    json_line,
    open_private,
    prefix_of,
    private_dir,
    remove_collector,
    safe_filename,
    server_running,
)

__all__ = [
    "ENTRY",
    "SchedulerTracer",
    "Tracer",
    "chrome_trace",
    "dask_setup",
    "dask_teardown",
    "fetch",
    "read_dir",
    "save",
    "summarize",
    "trace_cli",
]

logger = logging.getLogger("catalog.tracer")

#: Every task state of workers and of the scheduler, for the ``states`` filter.
STATES = tuple(sorted(set(get_args(_WorkerState)) | set(get_args(_SchedulerState))))

ENTRY = Entry(
    name="tracer",
    summary="record every task transition and span; export a Perfetto / Chrome trace",
    runs_on={
        "worker": "records the worker's transitions and finished tasks' spans",
        "scheduler": "records the scheduler's transitions (waiting, queued, ...)",
        "nanny": "nothing (one INFO line)",
        "client": "registers Tracer on the workers and SchedulerTracer",
    },
    options=[
        Option(
            "capacity",
            Integer(1),
            1_000_000,
            "Events kept per server in a ring buffer at most; older ones are "
            "dropped and counted.",
        ),
        Option(
            "max-memory",
            Size(),
            "16MiB",
            "Memory the ring buffer may hold per server: it keeps at most this "
            "divided by 96 bytes events (fewer when capacity is lower).",
        ),
        Option(
            "dir",
            Text("a directory path"),
            None,
            "Directory where each server appends its events as JSON lines to "
            "<server-id>.jsonl (files 0o600, a new directory 0o700).",
        ),
        Option(
            "flush-interval",
            Duration(minimum="1ms", maximum="1h"),
            "1s",
            "How often the JSON-lines file of the dir form is written.",
        ),
        Option(
            "states",
            Choice(*STATES),
            [],
            "Finish states whose transitions are recorded (repeatable; "
            "default: all). Spans are always recorded.",
            multiple=True,
        ),
    ],
    examples=[
        "dask worker tcp://127.0.0.1:8786 --preload catalog.tracer "
        "--tracer-dir ~/dask-trace",
    ],
)

#: Marks a span record in the ring (in place of the start state).
SPAN = "<span>"
#: The ring's budget per event: ``max-memory // EVENT_BYTES`` events at most.
#: An event takes 25 bytes of slots (33 on the scheduler) plus its share of the
#: keys and spans only the ring still holds: 55-75 bytes measured for keys of
#: 20-45 characters (benchmarks/tracer_hook.py); 96 leaves room for longer keys.
EVENT_BYTES = 96
#: Strings the ring shares with distributed: not counted in its memory.
_SHARED = frozenset(
    {*STATES, SPAN, "compute", "transfer", "disk-read", "disk-write", "deserialize"}
)
#: Worker states a task computes in, and the states a computed task ends in.
RUNNING = frozenset({"executing", "long-running", "resumed"})
FINISHED = frozenset({"memory", "error"})
#: The empty start -> code map of a finish state not seen yet (never written).
_NO_CODES: dict[str, int] = {}
#: Scheduler states shown as stints on the scheduler's tracks.
SCHEDULER_STINTS = ("waiting", "queued", "no-worker", "processing")


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else str(key)


class _Recorder:
    """What the worker and scheduler halves share: the ring, the file, status.

    The ring keeps its newest ``capacity`` records in plain storage that
    nothing is built for per event: the times in an ``array("d")`` (8 bytes,
    no float objects) and the other fields in a ``deque`` of ``STRIDE`` slots
    per record: the key and a small int naming the (start, finish) pair
    (Python's cached small ints: no object either); a finished task's spans
    take the pair's slot as one flat tuple.
    """

    settings: Any
    server: Any
    role: str
    #: Slots per record: worker (key, pair code or spans), scheduler adds worker.
    STRIDE = 2

    def _start_recording(self, server: Any) -> None:
        s = self.settings
        self._cap = max(1, min(s.capacity, s.max_memory // EVENT_BYTES))
        # finish -> start -> code: two lookups of interned strings are cheaper
        # in the hook than building and hashing a (start, finish) tuple.
        self._codes: dict[str, dict[str, int]] = {}
        self._pairs: list[tuple[str, str]] = []
        self._threads_seen: dict[Any, int] = {}
        self._thread_ids: list[Any] = []
        self._new_ring()
        self._clock = time.time
        self._states = frozenset(s.states) if s.states else None
        self._pending: deque[tuple[Any, ...]] | None = None
        self._file: _TraceFile | None = None
        self._collector: _Collector | None = None
        self.address = str(getattr(server, "address", "") or "")
        self.pid = os.getpid()
        if s.dir:
            path = os.path.join(private_dir(s.dir), self.file_name())
            self._pending = deque()
            self._file = _TraceFile(
                path,
                self._drain,
                flush_interval=s.flush_interval,
                on_error=self.report_error,  # type: ignore[attr-defined]
                while_running=server_running(server),
            )
            self._file.write(self._header())
            self._file.open()
            self._file.flush()  # the header line: the file names its server at once
        self._collector = _Collector(self)
        add_collector(server, self._collector)

    def _new_ring(self) -> None:
        self._times = array("d")
        self._times_append = self._times.append
        self._slots: deque[Any] = deque(maxlen=self.STRIDE * self._cap)
        self._slots_extend = self._slots.extend
        self._appended = 0

    def _code(self, start: str, finish: str) -> int:
        """The small int naming a (start, finish) pair in this ring."""
        by_start = self._codes.setdefault(finish, {})
        code = by_start.get(start)
        if code is None:
            code = by_start[start] = len(self._pairs)
            self._pairs.append((start, finish))
        return code

    def _stamp(self) -> float:
        """The time of a new record, stored; the caller stores its slots next."""
        t = self._clock()
        n = self._appended
        if n < self._cap:
            self._times_append(t)
        else:  # full: overwrite the oldest, which the slots' deque drops too
            self._times[n % self._cap] = t
        self._appended = n + 1
        return t

    def _stop_recording(self, server: Any) -> None:
        collector = getattr(self, "_collector", None)
        if collector is not None:
            remove_collector(server, collector)
            self._collector = None
        file = getattr(self, "_file", None)
        if file is not None:
            self._file = None
            file.close()
            logger.info("catalog.tracer wrote %d events to %s", file.written, file.path)
        dropped = self.dropped
        if dropped:
            logger.warning(
                "catalog.tracer on %s %s dropped %d of %d events (capacity %d)",
                self.role,
                self.address,
                dropped,
                self._appended,
                self._cap,
            )

    def file_name(self) -> str:
        """``<role>-<host>_<port>-<pid>.jsonl``: unique per server process."""
        where = self.address.rpartition("://")[2]
        name = safe_filename(f"{self.role}-{where}-{self.pid}")
        return f"{name}.jsonl"

    # -- counts -----------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Events the ring keeps: ``capacity``, or fewer to fit ``max-memory``."""
        return getattr(self, "_cap", self.settings.capacity)

    @property
    def buffered(self) -> int:
        times = getattr(self, "_times", None)
        return len(times) if times is not None else 0

    @property
    def dropped(self) -> int:
        return getattr(self, "_appended", 0) - self.buffered

    def memory(self) -> int:
        """Bytes the ring holds: its storage, and what only the ring keeps alive.

        Keys and span payloads are counted once each, as if only the ring held
        them; state names, span kinds and worker addresses (shared with
        distributed) and Python's cached small ints are not.
        """
        times = getattr(self, "_times", None)
        if times is None:
            return 0
        slots = list(self._slots)
        total = sys.getsizeof(times) + sys.getsizeof(self._slots)
        seen: set[int] = set()

        def add(obj: Any) -> None:
            nonlocal total
            if obj is None or id(obj) in seen or obj in _SHARED:
                return
            if type(obj) is int and -5 <= obj <= 256:
                return
            seen.add(id(obj))
            total += sys.getsizeof(obj)

        w = self.STRIDE
        for i in range(0, len(slots), w):
            add(slots[i])
            payload = slots[i + 1]
            if type(payload) is tuple:
                add(payload)
                for item in payload:
                    add(item)
        return total

    def status(self) -> dict[str, Any]:
        out = super().status()  # type: ignore[misc]
        file = getattr(self, "_file", None)
        out.update(
            recorded=getattr(self, "_appended", 0),
            buffered=self.buffered,
            dropped=self.dropped,
            capacity=self.capacity,
            file=file.path if file is not None else None,
            written=file.written if file is not None else 0,
        )
        return out

    # -- reading ------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        return {
            "type": "process",
            "role": self.role,
            "address": self.address,
            "name": str(getattr(self.server, "name", "") or ""),
            "pid": self.pid,
        }

    def _records(self) -> Iterator[tuple[Any, ...]]:
        """``(time, key, start, finish, worker)`` of every buffered record, oldest
        first (``worker`` is None on workers; a span has ``start`` SPAN and its
        payload as ``finish``)."""
        times, slots, w = list(self._times), list(self._slots), self.STRIDE
        first = self._appended % self._cap if self._appended > self._cap else 0
        order = itertools.chain(range(first, len(times)), range(first))
        for n, i in enumerate(order):
            record = slots[n * w : n * w + w]
            yield self._decode(times[i], *record)

    def _decode(
        self, t: float, key: Any, second: Any, worker: Any = None
    ) -> tuple[Any, ...]:
        if type(second) is tuple:
            return (t, key, SPAN, second, None)
        start, finish = self._pairs[second]
        return (t, key, start, finish, worker)

    def _drain(self) -> list[tuple[Any, ...]]:
        # Runs in the file's flush thread while the event loop appends: popleft
        # and append on a deque are atomic, so no record is ever lost between.
        pending = self._pending
        if not pending:
            return []
        take, decode = pending.popleft, self._decode
        return [decode(*take()) for _ in range(len(pending))]

    def _as_dicts(self, records: Iterable[tuple[Any, ...]]) -> Iterator[dict]:
        prefix = prefix_of
        for record in records:
            t, key, start, finish = record[:4]
            if start is SPAN:
                yield from self._span_dicts(t, key, finish)
            else:
                event = {
                    "type": "transition",
                    "time": t,
                    "key": _key_text(key),
                    "prefix": prefix(key),
                    "start": start,
                    "finish": finish,
                }
                worker = record[4] if len(record) > 4 else None
                if worker:
                    event["worker"] = worker
                yield event

    def _span_dicts(self, t: float, key: Any, payload: Any) -> Iterator[dict]:
        return iter(())

    def snapshot(self, clear: bool = False) -> dict[str, Any]:
        """This server's buffered events as plain JSON-serialisable data."""
        events = list(self._as_dicts(self._records()))
        out = {
            **self._header(),
            "capacity": self.capacity,
            "recorded": self._appended,
            "dropped": self.dropped,
            "events": events,
        }
        if clear:
            self._new_ring()
        return out


class _TraceFile(JsonLinesFile):
    """The dir form's file: each flush first turns the pending records into lines."""

    def __init__(self, path: str, drain: Any, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._drain_records = drain
        self.recorder: Any = getattr(drain, "__self__", None)

    def flush(self) -> None:
        records = self._drain_records()
        if records:
            self.extend([json_line(e) for e in self.recorder._as_dicts(records)])
        super().flush()


class _Collector:
    """Scrape-time gauges of one tracer, served through the metrics entry."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def collect(self, fam: Any) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        names, values = list(fam.labels), list(fam.labels.values())
        rec = self.recorder
        for kind, name, doc, value in (
            (
                CounterMetricFamily,
                "events",
                "Events the tracer recorded.",
                rec._appended,
            ),
            (
                CounterMetricFamily,
                "dropped_events",
                "Events the tracer dropped from its full ring buffer.",
                rec.dropped,
            ),
            (
                GaugeMetricFamily,
                "buffered_events",
                "Events in the tracer's ring buffer.",
                rec.buffered,
            ),
        ):
            family = kind(f"{fam.namespace}_tracer_{name}", doc, labels=names)
            family.add_metric(values, value)
            yield family


class Tracer(_Recorder, WorkerEntryPlugin):
    """Record every transition of a worker, and the spans of every finished task.

    Each transition is kept as ``(time, key, start, finish)`` in a ring buffer of
    ``capacity`` events; when a task finishes (``executing -> memory/error``) its
    ``startstops`` (compute, transfer, disk-read, disk-write) are kept too, with
    the thread that ran it and, when the memory entry is active, its peak memory.
    Read them with :func:`fetch` / :func:`save`, or set ``dir`` to stream them
    to JSON-lines files.

    Args:
        capacity: events kept in the ring buffer; older ones are dropped, counted.
        dir: directory for ``<server-id>.jsonl`` files, or None.
        flush_interval: seconds between writes of the file (``"1s"``).
        states: finish states to record (default: all).

    Example:
        >>> import catalog
        >>> from distributed import Client, LocalCluster
        >>> cluster = LocalCluster(n_workers=1, processes=False, host="127.0.0.1",
        ...                        protocol="tcp", dashboard_address="127.0.0.1:0")
        >>> client = Client(cluster)
        >>> _ = client.register_plugin(catalog.Tracer(capacity=10_000))
        >>> client.submit(sum, [1, 2]).result()
        3
        >>> catalog.tracer.save(client, "trace.json")["spans"]
        1
        >>> client.close(); cluster.close()
    """

    entry = ENTRY

    def on_setup(self, worker: Any) -> None:
        self.worker = worker
        self._tasks = worker.state.tasks
        self._threads = worker.state.threads
        self._plugins = worker.plugins
        self._start_recording(worker)

    def on_teardown(self, worker: Any) -> None:
        self._stop_recording(worker)

    @guards_itself
    def transition(
        self,
        key: Any = None,
        start: str = "",
        finish: str = "",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Called for every transition: _stamp and _code are written out here,
        # two method calls less per call (about a quarter of the hook's cost).
        try:
            states = self._states
            if states is None or finish in states:
                t = self._clock()
                n = self._appended
                if n < self._cap:
                    self._times_append(t)
                else:  # full: overwrite the oldest, which the deque drops too
                    self._times[n % self._cap] = t
                self._appended = n + 1
                code = self._codes.get(finish, _NO_CODES).get(start)
                if code is None:
                    code = self._code(start, finish)
                self._slots_extend((key, code))
                if self._pending is not None:
                    self._pending.append((t, key, code))
            if finish in FINISHED and start in RUNNING:
                self._finished(key)
        except Exception as exc:
            self.report_error("transition", exc)

    def _finished(self, key: Any) -> None:
        ts = self._tasks.get(key)
        if ts is None or not ts.startstops:
            return
        memory = self._plugins.get("catalog.memory")
        peak = self._peak(memory, key) if memory is not None else None
        # One flat tuple: the thread's index (a small int, no object), the
        # peak, then (action, start, stop, source) per startstop; the floats
        # are shared with distributed's dicts, which are then free to go.
        thread = self._threads.get(key)
        if thread is not None:
            index = self._threads_seen.get(thread)
            if index is None:
                index = self._threads_seen[thread] = len(self._thread_ids)
                self._thread_ids.append(thread)
            thread = index
        spans: list[Any] = [thread, peak]
        for ss in ts.startstops:
            spans += (ss.get("action"), ss.get("start"), ss.get("stop"))
            spans.append(ss.get("source"))
        payload = tuple(spans)
        t = self._stamp()
        self._slots_extend((key, payload))
        if self._pending is not None:
            self._pending.append((t, key, payload))

    def _peak(self, memory: Any, key: Any) -> int | None:
        peak_of = getattr(memory, "peak_of", None)
        if peak_of is None:
            return None
        try:
            peak = peak_of(key)
        except Exception as exc:  # the memory entry's failure is not the task's
            self.report_error("catalog.memory peak_of", exc)
            return None
        return peak if isinstance(peak, int) else None

    def _span_dicts(self, t: float, key: Any, payload: Any) -> Iterator[dict]:
        thread = self._thread_ids[payload[0]] if payload[0] is not None else None
        peak = payload[1]
        text, prefix = _key_text(key), prefix_of(key)
        for i in range(2, len(payload), 4):
            kind, start, stop, source = payload[i : i + 4]
            if start is None or stop is None:
                continue
            span = {
                "type": "span",
                "kind": kind or "unknown",
                "start": start,
                "stop": stop,
                "key": text,
                "prefix": prefix,
                "thread": thread if kind == "compute" else None,
            }
            if source is not None:
                span["source"] = source
            if peak is not None:
                span["peak_memory"] = peak
            yield span


class SchedulerTracer(_Recorder, SchedulerEntryPlugin):
    """Record every transition of the scheduler (waiting, queued, processing, ...).

    In the trace the time each task spent in ``waiting``, ``queued``,
    ``no-worker`` and ``processing`` shows on the scheduler's own tracks. It
    takes the same options as :class:`Tracer`.

    Example:
        >>> import catalog
        >>> from distributed import Client, LocalCluster
        >>> cluster = LocalCluster(n_workers=1, processes=False, host="127.0.0.1",
        ...                        protocol="tcp", dashboard_address="127.0.0.1:0")
        >>> client = Client(cluster)
        >>> _ = client.register_plugin(catalog.SchedulerTracer())
        >>> client.submit(sum, [1, 2]).result()
        3
        >>> scheduler = catalog.tracer.fetch(client)["scheduler"]
        >>> len(scheduler["events"]) > 0
        True
        >>> client.close(); cluster.close()
    """

    entry = ENTRY

    def on_setup(self, scheduler: Any) -> None:
        self._tasks = scheduler.tasks
        self._start_recording(scheduler)

    def on_teardown(self, scheduler: Any) -> None:
        self._stop_recording(scheduler)

    STRIDE = 3

    @guards_itself
    def transition(
        self,
        key: Any = None,
        start: str = "",
        finish: str = "",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Called for every transition of every task: _stamp and _code are
        # written out here, two method calls less per call.
        try:
            states = self._states
            if states is None or finish in states:
                # Keys arrive in messages as new str objects at each transition:
                # keep the task's own key, so a task's events share one object.
                ts = self._tasks.get(key)
                if ts is not None:
                    key = ts.key
                t = self._clock()
                n = self._appended
                if n < self._cap:
                    self._times_append(t)
                else:  # full: overwrite the oldest, which the deque drops too
                    self._times[n % self._cap] = t
                self._appended = n + 1
                code = self._codes.get(finish, _NO_CODES).get(start)
                if code is None:
                    code = self._code(start, finish)
                worker = kwargs.get("worker")
                self._slots_extend((key, code, worker))
                if self._pending is not None:
                    self._pending.append((t, key, code, worker))
        except Exception as exc:
            self.report_error("transition", exc)


dask_setup, dask_teardown = entry_preload(
    ENTRY, worker=Tracer, scheduler=SchedulerTracer
)


# ---------------------------------------------------------------------------
# Gathering
# ---------------------------------------------------------------------------


def _snapshot_worker(dask_worker: Any, clear: bool = False) -> dict | None:
    plugin = dask_worker.plugins.get(ENTRY.plugin_name)
    if not isinstance(plugin, Tracer) or not plugin.active:
        return None
    return plugin.snapshot(clear=clear)


def _snapshot_scheduler(dask_scheduler: Any, clear: bool = False) -> dict | None:
    plugin = dask_scheduler.plugins.get(ENTRY.plugin_name)
    if not isinstance(plugin, SchedulerTracer) or not plugin.active:
        return None
    return plugin.snapshot(clear=clear)


def fetch(client: Any, clear: bool = False) -> Any:
    """Gather the raw events of every traced worker and of the scheduler.

    Args:
        client: a ``distributed.Client``; with ``Client(asynchronous=True)`` an
            awaitable of the result is returned, as distributed's own client
            methods do.
        clear: empty the buffers after reading them.

    Returns:
        ``{"workers": {address: source}, "scheduler": source or None}``, where a
        source is ``{"role", "address", "name", "pid", "capacity", "recorded",
        "dropped", "events": [...]}`` and every event is a plain dict
        (``type`` ``"transition"`` or ``"span"``).
    """

    async def gather() -> dict[str, Any]:
        workers = await client.run(_snapshot_worker, clear=clear)
        scheduler = await client.run_on_scheduler(_snapshot_scheduler, clear=clear)
        return {
            "workers": {a: s for a, s in sorted(workers.items()) if s is not None},
            "scheduler": scheduler,
        }

    return client_call(client, gather)


def save(client: Any, path: str | os.PathLike[str], clear: bool = False) -> Any:
    """Gather every buffer and write one Chrome Trace Event file at ``path``.

    With ``Client(asynchronous=True)`` an awaitable of the summary is returned.

    Returns:
        A small summary: ``{"path", "events", "spans", "workers", "scheduler",
        "recorded", "dropped", "prefixes": {prefix: {count, total, mean, p50,
        p95, max}}}`` (seconds, compute spans).
    """

    def write(raw: dict[str, Any]) -> dict[str, Any]:
        sources = list(raw["workers"].values())
        if raw["scheduler"] is not None:
            sources.append(raw["scheduler"])
        trace = chrome_trace(sources)
        _write_json(path, trace)
        return _save_summary(os.fspath(path), sources, trace)

    # The file is written in the caller's thread (or after the await), never
    # on a synchronous client's event loop.
    return client_then(fetch(client, clear=clear), write)


def _save_summary(path: str, sources: list[dict], trace: dict) -> dict[str, Any]:
    events = trace["traceEvents"]
    dropped = sum(s.get("dropped", 0) for s in sources)
    if dropped:
        logger.warning(
            "catalog.tracer: %d events were dropped (ring buffers full); "
            "raise capacity or use dir",
            dropped,
        )
    return {
        "path": path,
        "events": len(events),
        "spans": sum(
            1 for e in events if e["ph"] == "X" and e["cat"] not in SCHEDULER_STINTS
        ),
        "workers": sum(1 for s in sources if s.get("role") == "worker"),
        "scheduler": any(s.get("role") == "scheduler" for s in sources),
        "recorded": sum(s.get("recorded", 0) for s in sources),
        "dropped": dropped,
        "prefixes": summarize(trace),
    }


def _write_json(path: str | os.PathLike[str], obj: Any) -> None:
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, separators=(",", ":"), default=str)


#: The fields a record of the dir form needs to be merged, by record type.
_NUMBER = (int, float)
_REQUIRED_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "span": {"start": _NUMBER, "stop": _NUMBER},
    "transition": {"time": _NUMBER, "key": (str,), "start": (str,), "finish": (str,)},
}


def _record_problem(event: Mapping[str, Any]) -> str | None:
    """What a span or transition record lacks, or None when it can be merged."""
    kind = event.get("type")
    for name, types in _REQUIRED_FIELDS.get(str(kind), {}).items():
        value = event.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            what = "a number" if types is _NUMBER else "text"
            return f"a {kind} record needs {name!r} ({what}), got {value!r}"
    return None


def read_dir(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the ``*.jsonl`` files of the dir form into sources, like :func:`fetch`.

    A line that is not JSON (a server killed mid-write truncates its last
    line) is skipped.

    Raises:
        ValueError: a span or transition record lacks a field, naming the
            file and the line.
    """
    sources = []
    for path in sorted(glob.glob(os.path.join(os.fspath(directory), "*.jsonl"))):
        source: dict[str, Any] = {"role": "worker", "address": path, "events": []}
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "process":
                    source.update({k: v for k, v in event.items() if k != "type"})
                    continue
                problem = _record_problem(event)
                if problem is not None:
                    msg = f"{path}, line {number}: {problem}"
                    raise ValueError(msg)
                source["events"].append(event)
        source["recorded"] = len(source["events"])
        sources.append(source)
    return sources


# ---------------------------------------------------------------------------
# Chrome Trace Event format
# ---------------------------------------------------------------------------


class _Lanes:
    """Tracks of one process: overlapping spans of a group go to separate lanes."""

    def __init__(self, pid: int, meta: list[dict]) -> None:
        self.pid = pid
        self.meta = meta
        self.ends: dict[str, list[float]] = {}
        self.tids: dict[tuple[str, int], int] = {}

    def tid(self, group: str, start: float, stop: float) -> int:
        ends = self.ends.setdefault(group, [])
        for lane, end in enumerate(ends):
            if start >= end:
                ends[lane] = stop
                break
        else:
            lane = len(ends)
            ends.append(stop)
        found = self.tids.get((group, lane))
        if found is None:
            found = self.tids[group, lane] = len(self.tids) + 1
            name = group if lane == 0 else f"{group} ({lane + 1})"
            self.meta.append(_meta("thread_name", self.pid, found, name=name))
            self.meta.append(
                _meta("thread_sort_index", self.pid, found, sort_index=found)
            )
        return found


def _meta(kind: str, pid: int, tid: int, **args: Any) -> dict[str, Any]:
    return {"name": kind, "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": args}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _ts_dur(start: float, stop: float) -> dict[str, float]:
    """``ts`` and ``dur`` in microseconds, both taken from the rounded endpoints.

    Epoch microseconds are near 1.8e15, where a double's step is 0.25 us, so
    ``_us(start) + _us(stop - start)`` can land past ``_us(stop)``: a span
    that ends exactly when the next one on its track starts would then
    overlap it. The difference of the two rounded endpoints is exact, so
    ``ts + dur`` is the rounded ``stop`` and rounding keeps the order.
    """
    ts = _us(start)
    return {"ts": ts, "dur": max(0.0, _us(stop) - ts)}


def chrome_trace(sources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Build ``{"traceEvents": [...]}`` from sources (see :func:`fetch`).

    Worker spans become complete events (``ph: "X"``) named by task prefix,
    ``cat`` = span kind, on a track per thread (compute) or per kind; the
    scheduler's stints in waiting / queued / no-worker / processing become
    complete events on the scheduler's tracks (pid 1).
    """
    meta: list[dict] = []
    spans: list[dict] = []
    ordered = sorted(
        sources, key=lambda s: (s.get("role") != "scheduler", str(s.get("address")))
    )
    pid = 1 if any(s.get("role") == "scheduler" for s in ordered) else 2
    for source in ordered:
        role = source.get("role", "worker")
        label = f"{role} {source.get('address', '')}".strip()
        if source.get("name") and source.get("name") != source.get("address"):
            label += f" ({source['name']})"
        meta.append(_meta("process_name", pid, 0, name=label))
        meta.append(_meta("process_sort_index", pid, 0, sort_index=pid))
        lanes = _Lanes(pid, meta)
        events = source.get("events", ())
        if role == "scheduler":
            spans.extend(_scheduler_spans(events, pid, lanes))
        else:
            spans.extend(_worker_spans(events, pid, lanes, source))
        pid += 1
    spans.sort(key=lambda e: e["ts"])
    return {"traceEvents": meta + spans, "displayTimeUnit": "ms"}


def _worker_spans(
    events: Iterable[Mapping], pid: int, lanes: _Lanes, source: Mapping
) -> Iterator[dict]:
    worker = source.get("address", "")
    candidates = [e for e in events if e.get("type") == "span"]
    candidates.sort(key=lambda e: e["start"])
    for e in candidates:
        kind = str(e.get("kind", "unknown"))
        start, stop = float(e["start"]), float(e["stop"])
        thread = e.get("thread")
        group = f"thread {thread}" if thread is not None else kind
        args = {"key": e.get("key"), "worker": worker}
        for extra in ("source", "peak_memory", "thread"):
            if e.get(extra) is not None:
                args[extra] = e[extra]
        yield {
            "name": str(e.get("prefix") or prefix_of(e.get("key"))),
            "cat": kind,
            "ph": "X",
            **_ts_dur(start, stop),
            "pid": pid,
            "tid": lanes.tid(group, start, stop),
            "args": args,
        }


def _scheduler_spans(
    events: Iterable[Mapping], pid: int, lanes: _Lanes
) -> Iterator[dict]:
    stints = []
    entered: dict[str, tuple[str, float]] = {}
    transitions = [e for e in events if e.get("type") == "transition"]
    transitions.sort(key=lambda e: e["time"])
    for e in transitions:
        key = e["key"]
        begun = entered.pop(key, None)
        if begun is not None and begun[0] == e["start"]:
            stints.append((begun[0], begun[1], e))
        if e["finish"] in SCHEDULER_STINTS:
            entered[key] = (e["finish"], e["time"])
    stints.sort(key=lambda s: s[1])
    for state, start, end in stints:
        group = state
        if state == "processing" and end.get("worker"):
            group = f"processing on {end['worker']}"
        args = {"key": end["key"], "next": end["finish"]}
        if end.get("worker"):
            args["worker"] = end["worker"]
        yield {
            "name": str(end.get("prefix") or prefix_of(end["key"])),
            "cat": state,
            "ph": "X",
            **_ts_dur(start, end["time"]),
            "pid": pid,
            "tid": lanes.tid(group, start, end["time"]),
            "args": args,
        }


# ---------------------------------------------------------------------------
# Summaries and the `dask catalog trace` commands
# ---------------------------------------------------------------------------


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summarize(trace: Mapping[str, Any], kind: str = "compute") -> dict[str, dict]:
    """Per prefix: count, total, mean, p50, p95, max (seconds) of ``kind`` spans.

    Raises:
        ValueError: ``trace`` is not a Chrome trace (an object whose
            ``traceEvents`` is a list of objects, complete events with a
            ``name`` and a numeric ``dur``).
    """
    events = trace.get("traceEvents") if isinstance(trace, Mapping) else None
    if not isinstance(events, list):
        msg = 'expected a JSON object with a "traceEvents" list'
        raise ValueError(msg)
    durations: dict[str, list[float]] = {}
    for index, e in enumerate(events):
        if not isinstance(e, Mapping):
            msg = f"traceEvents[{index}] is not an object: {e!r}"
            raise ValueError(msg)
        if e.get("ph") == "X" and e.get("cat") == kind:
            dur = e.get("dur")
            if not isinstance(dur, _NUMBER) or isinstance(dur, bool):
                msg = f"traceEvents[{index}] has no numeric 'dur': {e!r}"
                raise ValueError(msg)
            durations.setdefault(str(e.get("name")), []).append(dur / 1e6)
    out = {}
    for prefix, values in sorted(durations.items()):
        values.sort()
        total = sum(values)
        out[prefix] = {
            "count": len(values),
            "total": total,
            "mean": total / len(values),
            "p50": _percentile(values, 50),
            "p95": _percentile(values, 95),
            "max": values[-1],
        }
    return out


trace_cli = click.Group(
    "trace", help="Work with traces recorded by the catalog's tracer entry."
)


@trace_cli.command("merge")
@click.argument(
    "directory", type=click.Path(exists=True, file_okay=False, dir_okay=True)
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default="trace.json",
    show_default=True,
    help="The Chrome Trace Event file to write.",
)
def merge_command(directory: str, output: str) -> None:
    """Merge the JSON-lines files of DIRECTORY into one Chrome / Perfetto trace."""
    try:
        sources = read_dir(directory)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'DIRECTORY'") from None
    if not sources:
        raise click.ClickException(f"no *.jsonl files in {directory}")
    trace = chrome_trace(sources)
    _write_json(output, trace)
    summary = _save_summary(output, sources, trace)
    click.echo(
        f"wrote {summary['events']} events ({summary['spans']} spans) from "
        f"{len(sources)} files to {output}"
    )


@trace_cli.command("summary")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--kind",
    default="compute",
    show_default=True,
    help="Span kind: compute, transfer, disk-read, disk-write, waiting, ...",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def summary_command(file: str, kind: str, as_json: bool) -> None:
    """Print per task prefix: count, total, mean, p50, p95, max (seconds)."""
    try:
        with open(file, encoding="utf-8") as f:
            trace = json.load(f)
        rows = summarize(trace, kind=kind)
    except ValueError as exc:  # not JSON, not UTF-8, or not a trace
        raise click.BadParameter(
            f"{file} is not a Chrome trace: {exc}", param_hint="'FILE'"
        ) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max([len("prefix"), *map(len, rows)])
    header = ("count", "total", "mean", "p50", "p95", "max")
    click.echo(f"{'prefix':<{width}}  " + "  ".join(f"{h:>9}" for h in header))
    for prefix, row in rows.items():
        cells = [f"{row['count']:>9d}"]
        cells += [f"{row[h]:>9.4f}" for h in header[1:]]
        click.echo(f"{prefix:<{width}}  " + "  ".join(cells))
