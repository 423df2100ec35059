"""An audit log of the cluster: workers, clients, graphs, failures, restarts."""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from dask.sizeof import sizeof

from catalog.entry import (
    MAX_BACKUPS,
    Entry,
    Integer,
    JsonLinesFile,
    Option,
    RotateSize,
    SchedulerEntryPlugin,
    Text,
    entry_preload,
    families_for,
    guards_itself,
    prefix_of,
)

__all__ = ["ENTRY", "EVENTS", "EventLog", "dask_setup", "dask_teardown"]

#: The logger the events go to when no ``file`` is given.
LOGGER_NAME = "catalog.events"

#: The events this entry names itself. Any other scheduler event is recorded
#: under its topic (``"all"``, ``"scheduler"``, a topic of your own), or as
#: ``worker-event`` / ``client-event`` when its topic is one worker or client.
EVENTS = (
    "worker-added",
    "worker-removed",
    "client-added",
    "client-removed",
    "graph-submitted",
    "task-erred",
    "task-retried",
    "worker-restart-memory",
    "restart",
    "scheduler-closing",
    "worker-event",
    "client-event",
)

#: distributed's own event topics: its bookkeeping ("all": gather, scatter,
#: rebalance ...), logged at DEBUG without a file, as are ``worker-event`` and
#: ``client-event``. Every other event, topics of your own included, is INFO.
DISTRIBUTED_TOPICS = frozenset(
    {
        "all",
        "scheduler",
        "transitions",
        "stealing",
        "current-time",
        "print",
        "warn",
        "worker-get-client",
        "worker-client",
    }
)
_LOGGED_AT_DEBUG = DISTRIBUTED_TOPICS | {"worker-event", "client-event"}

#: Scheduler events that the named events above already record.
_COVERED_ACTIONS = frozenset(
    {"add-worker", "remove-worker", "add-client", "remove-client"}
)

#: Attributes of a LogRecord that ``extra`` must not overwrite.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}

#: Distinct ``event`` label values on the metric before ``"other"``.
MAX_EVENT_LABELS = 100

#: Records kept in memory for the dashboard entry (``recent``).
RECENT = 200

_STIMULUS_TIME = re.compile(r"-\d+(\.\d+)?$")

ENTRY = Entry(
    name="events",
    summary="an audit log of the cluster: workers, clients, graphs, failures",
    runs_on={
        "scheduler": "records the cluster's events to a JSON-lines file or a logger",
        "worker": "nothing (the events are the scheduler's)",
        "nanny": "nothing (the nanny's events reach the scheduler)",
        "client": "registers the event log on the scheduler",
    },
    options=[
        Option(
            "file",
            Text("a file path", nullable=True),
            None,
            "Append one JSON object per event to this file "
            "(none: log each event through the catalog.events logger).",
        ),
        Option(
            "rotate-bytes",
            RotateSize(),
            0,
            "Rotate the file when it would grow past this size (0: never).",
        ),
        Option(
            "backups",
            Integer(0, maximum=MAX_BACKUPS),
            5,
            "How many rotated files to keep, as FILE.1 ... FILE.N.",
        ),
        Option(
            "include",
            Text("an event name such as worker-added", nullable=False),
            [],
            "Record only these events (repeatable, comma lists allowed; empty: all).",
            multiple=True,
        ),
        Option(
            "exclude",
            Text("an event name such as worker-added", nullable=False),
            [],
            "Never record these events (repeatable, comma lists allowed).",
            multiple=True,
        ),
    ],
    examples=(
        "dask scheduler --preload catalog.events --events-file events.jsonl",
        "dask scheduler --preload catalog.events --events-exclude worker-event",
    ),
)


def utc_now() -> str:
    """The current time, ISO 8601 in UTC with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def names(values: Iterable[str]) -> frozenset[str]:
    """Event names from repeatable, comma-separated option values."""
    return frozenset(
        name.strip() for value in values for name in value.split(",") if name.strip()
    )


def plain(obj: Any) -> Any:
    """``obj`` made of JSON types: sets sorted into lists, other objects as text."""
    if obj is None or isinstance(obj, str | bool | int | float):
        return obj
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted((plain(v) for v in obj), key=str)
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return str(obj)


def log_message(event: str, fields: dict[str, Any]) -> str:
    """``event: k=v k=v``, each value as ASCII JSON, so no value breaks the line.

    The event name (a topic can be any text) is left to the catalog's log
    filter, which escapes control characters in every catalog log line.

    >>> log_message("worker-added", {"worker": "tcp://h:1", "nthreads": 2})
    'worker-added: worker="tcp://h:1" nthreads=2'
    """
    shown = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
    return f"{event}: {shown}" if shown else event


def reason_of(stimulus_id: str) -> str:
    """A stimulus id or a worker's close reason without its trailing timestamp."""
    return _STIMULUS_TIME.sub("", stimulus_id or "") or "unknown"


def exception_of(
    kwargs: dict[str, Any], ts: Any = None, allowed: int = 0
) -> str | None:
    """The text of the exception a scheduler transition carries, never unpickled.

    A worker sends its exception pickled with its text beside it; the text is
    all this reads (unpickling a worker's bytes would run its code on the
    scheduler, whatever ``distributed.scheduler.pickle`` says). The one error
    without a text is the scheduler's own ``KilledWorker``, recognised from the
    task's state: more suspicious deaths than ``allowed`` failures.

    Args:
        kwargs: the transition's keyword arguments.
        ts: the scheduler's TaskState of the key, if it still has one.
        allowed: the scheduler's ``allowed_failures``.
    """
    text = kwargs.get("exception_text")
    if text:
        return str(text)
    if kwargs.get("exception") is None:
        return None
    suspicious = getattr(ts, "suspicious", 0) or 0
    if suspicious > allowed:
        return (
            f"KilledWorker: {suspicious} workers died while running the task; "
            f"the last was {kwargs.get('worker')}"
        )
    return "an exception without its text (not unpickled)"


class EventLog(SchedulerEntryPlugin):
    """Record what happens to the cluster, one JSON object per event.

    On the scheduler it records workers joining and leaving (and why), clients
    connecting, graphs submitted, tasks that fail or are retried, workers the
    nanny restarts for memory, every other scheduler event, restarts and the
    scheduler closing. Each event goes to ``file`` as one JSON line, or, without
    a file, to the ``catalog.events`` logger (message: the event name; fields:
    the record's ``extra``). With the metrics entry active on the scheduler, it
    counts them in ``dask_catalog_scheduler_events_total{event}``.

    Args:
        file: the JSON-lines file to append to, or None for the logger.
        rotate_bytes: rotate the file past this size (``"100MiB"``), or 0 for never.
        backups: rotated files to keep.
        include: event names to record (empty: all).
        exclude: event names never to record.

    Example:
        >>> import catalog
        >>> log = catalog.EventLog(file="events.jsonl", exclude=["worker-event"])
        >>> log.name
        'catalog.events'
        >>> # client.register_plugin(log) starts it on the scheduler
    """

    entry = ENTRY

    # -- set up / tear down --------------------------------------------------
    def on_setup(self, scheduler: Any) -> None:
        settings = self.settings
        include, exclude = names(settings.include), names(settings.exclude)
        self._wanted: Callable[[str], bool] = (
            (lambda name: name in include and name not in exclude)
            if include
            else (lambda name: name not in exclude)
        )
        self._names: dict[str, Any] = {
            addr: ws.name for addr, ws in scheduler.workers.items()
        }
        self._closing_reasons: dict[str, str] = {}
        self._removals: dict[str, dict[str, Any]] = {}
        self._labels: set[str] = set()
        self._recent: deque[tuple[float, str, dict[str, Any]]] = deque(maxlen=RECENT)
        self._logger = logging.getLogger(LOGGER_NAME)
        self._file: JsonLinesFile | None = None
        if settings.file is not None:
            self._file = JsonLinesFile(
                settings.file,
                rotate_bytes=settings.rotate_bytes,
                backups=settings.backups,
                flush_interval=None,
                on_error=self.report_error,
            ).open()

    def on_teardown(self, scheduler: Any) -> None:
        file, self._file = getattr(self, "_file", None), None
        if file is not None:
            file.close()

    # -- recording -----------------------------------------------------------
    def record(self, event: str, **fields: Any) -> None:
        """Record one event (when the filters keep it) and count it."""
        if not self.active or not self._wanted(event):
            return
        self._recent.append((time.time(), event, fields))
        if self._file is not None:
            self._file.write({"ts": utc_now(), "event": event, **fields})
        else:
            extra = {
                (f"event_{k}" if k in _RECORD_ATTRS else k): v
                for k, v in fields.items()
            }
            extra["event"] = event
            # The message says what happened, with its fields; distributed's own
            # topics ("all": gather, scatter ...) and per-worker or per-client
            # chatter are bookkeeping: DEBUG.
            level = logging.DEBUG if event in _LOGGED_AT_DEBUG else logging.INFO
            if self._logger.isEnabledFor(level):
                self._logger.log(level, "%s", log_message(event, fields), extra=extra)
        fam = families_for(self.server)
        if fam is not None:
            fam.counter(
                "scheduler_events", "Events recorded by the events entry.", ["event"]
            ).labels(self._label(event)).inc()

    def _label(self, event: str) -> str:
        if event in self._labels or event in EVENTS:
            return event
        if len(self._labels) >= MAX_EVENT_LABELS:
            return "other"
        self._labels.add(event)
        return event

    # -- scheduler hooks -----------------------------------------------------
    def add_worker(self, scheduler: Any, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        name = ws.name if ws is not None else None
        self._names[worker] = name
        self._closing_reasons.pop(worker, None)
        self.record(
            "worker-added",
            worker=worker,
            name=plain(name),
            nthreads=ws.nthreads if ws is not None else None,
            memory_limit=ws.memory_limit if ws is not None else None,
        )

    def remove_worker(
        self, scheduler: Any, worker: str, *, stimulus_id: str = "", **kwargs: Any
    ) -> None:
        removal = self._removals.pop(worker, {})
        said = self._closing_reasons.pop(worker, None)
        self.record(
            "worker-removed",
            worker=worker,
            name=plain(self._names.pop(worker, None)),
            reason=reason_of(said or stimulus_id),
            stimulus_id=stimulus_id,
            expected=removal.get("expected"),
            processing_tasks=len(removal.get("processing-tasks") or ()),
            lost_computed_tasks=len(removal.get("lost-computed-tasks") or ()),
        )

    def add_client(self, scheduler: Any, client: str) -> None:
        self.record("client-added", client=client)

    def remove_client(self, scheduler: Any, client: str) -> None:
        self.record("client-removed", client=client)

    def update_graph(
        self, scheduler: Any, *, client: str = "", tasks: Any = (), **kwargs: Any
    ) -> None:
        if not self.active or not self._wanted("graph-submitted"):
            return
        known = scheduler.tasks
        prefixes = {known[k].prefix.name if k in known else prefix_of(k) for k in tasks}
        self.record(
            "graph-submitted",
            client=client,
            tasks=len(tasks),
            keys=len(kwargs.get("keys") or ()),
            prefixes=sorted(prefixes),
        )

    @guards_itself
    def transition(
        self,
        key: Any = None,
        start: str = "",
        finish: str = "",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Called for every transition of every task: only two kinds count.
        try:
            if finish != "erred" and (finish != "released" or start != "processing"):
                return
            self._transition(key, start, finish, kwargs)
        except Exception as exc:
            self.report_error("transition", exc)

    def _transition(
        self, key: Any, start: str, finish: str, kwargs: dict[str, Any]
    ) -> None:
        if finish == "erred":
            # Dependents erred by blame carry no cause of their own: not listed.
            if kwargs.get("cause") == key or "exception_text" in kwargs:
                self.record(
                    "task-erred",
                    key=plain(key),
                    prefix=prefix_of(key),
                    exception=exception_of(
                        kwargs,
                        self.server.tasks.get(key),
                        self.server.allowed_failures,
                    ),
                    worker=kwargs.get("worker"),
                )
        elif (
            start == "processing"
            and finish == "released"
            and str(kwargs.get("stimulus_id", "")).startswith("task-erred")
            and self.active
        ):
            # The scheduler retries a failed task by releasing it (then waiting).
            # A stale run's error (a task re-run elsewhere) is released the same
            # way; distributed gives a plugin no way to tell the two apart.
            ts = self.server.tasks.get(key)
            self.record(
                "task-retried",
                key=plain(key),
                prefix=prefix_of(key),
                retries_left=ts.retries if ts is not None else None,
            )

    def log_event(self, topic: str, msg: Any) -> None:
        if not self.active:
            return
        topic = str(topic)
        action = msg.get("action") if isinstance(msg, dict) else None
        if topic == "worker-restart-memory" and isinstance(msg, dict):
            self._closing_reasons.setdefault(str(msg.get("worker")), topic)
            self.record(
                "worker-restart-memory",
                worker=msg.get("worker"),
                pid=msg.get("pid"),
                rss=msg.get("rss"),
            )
            return
        if "://" in topic:
            if action == "closing-worker":
                self._closing_reasons[topic] = str(msg.get("reason") or "")
            elif action == "remove-worker":
                self._removals[topic] = msg
            if action in _COVERED_ACTIONS:
                return
            self.record("worker-event", worker=topic, topic=topic, msg=plain(msg))
            return
        if action in _COVERED_ACTIONS:
            return
        if action == "update-graph" and msg.get("status") == "OK":
            return  # graph-submitted has it
        if topic in self.server.clients or topic.startswith("Client-"):
            if action == "update-graph":
                return  # the same message also goes to the "scheduler" topic
            self.record("client-event", client=topic, topic=topic, msg=plain(msg))
            return
        self.record(topic, topic=topic, msg=plain(msg))

    def restart(self, scheduler: Any) -> None:
        self.record("restart", workers=len(scheduler.workers))

    async def before_close(self) -> None:
        self.record(
            "scheduler-closing",
            scheduler=self.server.address,
            workers=len(self.server.workers),
        )

    def memory(self) -> int:
        """Bytes of lines waiting for the file and of the per-worker notes."""
        names = ("_closing_reasons", "_removals", "_labels")
        held = [getattr(self, name, None) or {} for name in names]
        file = getattr(self, "_file", None)
        queued = file.memory() if file is not None else 0
        return queued + sum(sizeof(type(part)(part)) for part in held)

    def recent(self, n: int = RECENT) -> list[dict[str, Any]]:
        """The last ``n`` recorded events, newest first, as plain dicts."""
        ring = list(getattr(self, "_recent", ()))[-n:] if n > 0 else []
        return [
            {"time": t, "event": event, **plain(fields)}
            for t, event, fields in reversed(ring)
        ]

    def status(self) -> dict[str, Any]:
        out = super().status()
        file = getattr(self, "_file", None)
        if file is not None:
            out.update(
                file=file.path,
                written=file.written,
                buffered=file.buffered,
                dropped=file.dropped,
            )
        return out


dask_setup, dask_teardown = entry_preload(ENTRY, scheduler=EventLog)
