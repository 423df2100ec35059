"""Find stuck tasks, show where they are stuck, and time them out."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from dask.sizeof import sizeof
from dask.utils import format_time

from catalog._watchdog_stacks import _stack_of, format_stack
from catalog._watchdog_stacks import _task_frames as _task_frames  # tests use it
from catalog.entry import (
    RETRY_INTERVAL,
    Duration,
    Entry,
    Firing,
    Integer,
    Option,
    TaskInterrupt,
    WorkerEntryPlugin,
    bounded,
    entry_preload,
    families_for,
    interrupt_options,
    log_worker_event,
    now,
    pending,
    prefix_of,
)

__all__ = [
    "ANNOTATION",
    "ENTRY",
    "EVENT_TOPIC",
    "TaskTimeoutError",
    "Watchdog",
    "dask_setup",
    "dask_teardown",
    "running",
]

logger = logging.getLogger("catalog.watchdog")

#: The task annotation that sets ``fail-after`` for some tasks.
ANNOTATION = "catalog_timeout"

#: The topic of the worker events (``worker.log_event``).
EVENT_TOPIC = "catalog.watchdog"

#: Worker task states in which a task still occupies a thread.
RUNNING_STATES = frozenset({"executing", "long-running", "cancelled", "resumed"})
#: Distinct ``catalog_timeout`` annotation values whose parse is cached; past
#: it values are parsed per task and counted (``annotation_cache_overflow``).
MAX_CACHED_ANNOTATIONS = 256

ENTRY = Entry(
    name="watchdog",
    summary="find stuck tasks, show where they are stuck, and time them out",
    runs_on={
        "worker": "checks the worker's running tasks every interval",
        "scheduler": "nothing (one INFO line)",
        "nanny": "nothing (one INFO line)",
        "client": "registers the Watchdog on every worker",
    },
    options=[
        Option(
            "warn-after",
            Duration(nullable=True),
            "5m",
            "Log a WARNING with the stack of a task running longer than this, "
            "repeated at most once per this period.",
        ),
        Option(
            "fail-after",
            Duration(nullable=True),
            None,
            "Fail a task running longer than this with TaskTimeoutError; "
            f"a task's annotation {ANNOTATION} overrides it.",
        ),
        Option(
            "interval",
            Duration(minimum="1ms", maximum="1h"),
            "1s",
            "How often the running tasks are checked.",
        ),
        Option(
            "stack-depth",
            Integer(1),
            8,
            "How many innermost frames of a task's stack are shown.",
        ),
        *interrupt_options(
            "5s", "the watchdog gives up on it: logs it and counts it as unstoppable"
        ),
    ],
    examples=(
        "dask worker tcp://127.0.0.1:8786 --preload catalog.watchdog "
        "--watchdog-warn-after 1m --watchdog-fail-after 30m",
    ),
)

_TIMEOUT_TYPE = Duration(nullable=True)


class TaskTimeoutError(TaskInterrupt):
    """Raised inside a task that ran longer than its ``fail-after``.

    Inside the task it is a ``BaseException``: ``except Exception`` does not
    swallow it. The client sees it as the task's exception, and there it is
    also a ``TimeoutError``; ``retries=`` apply as usual.
    """

    reported_as = (TimeoutError,)


@dataclass(slots=True)
class _Running:
    """What the watchdog knows about one running task (slots: built per start)."""

    start: float
    fail_after: float | None
    warned_at: float | None = None
    fired_at: float | None = None
    firing: Firing | None = None


class Watchdog(WorkerEntryPlugin):
    """Warn about tasks that run too long, with their stack, and time them out.

    A daemon thread wakes every ``interval``. A task running longer than
    ``warn_after`` gets a WARNING (and a worker event) naming its key, prefix,
    elapsed time and the innermost frames of the thread running it; a task
    running longer than ``fail_after`` (or its ``catalog_timeout`` annotation)
    gets :class:`TaskTimeoutError` raised in its thread.

    Example:
        >>> import catalog
        >>> watchdog = catalog.Watchdog(warn_after="1m", fail_after="1h")
        >>> watchdog.settings.fail_after
        3600.0
        >>> # client.register_plugin(watchdog)
    """

    entry = ENTRY
    _thread: threading.Thread | None
    TIMEOUTS_DOC = "Tasks failed by the watchdog."

    def on_setup(self, worker: Any) -> None:
        self.worker = worker
        self._tasks: dict[Any, _Running] = {}
        self._timeouts: dict[Any, float | None] = {}
        self.annotation_cache_overflow = 0
        self.warnings = 0
        self.timeouts = 0
        self.refires = 0
        self.unstoppable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="catalog-watchdog", daemon=True
        )
        self._thread.start()

    def on_teardown(self, worker: Any) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
        tasks = getattr(self, "_tasks", None)
        if tasks is not None:
            tasks.clear()

    # -- hot path: on the event loop --------------------------------------------
    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish == "executing":
            self._tasks[key] = _Running(now(), self._fail_after_of(key))
        elif finish == "long-running":
            if key not in self._tasks:
                self._tasks[key] = _Running(now(), self._fail_after_of(key))
        elif finish not in RUNNING_STATES:
            record = self._tasks.pop(key, None)
            if record is not None and record.firing is not None:
                record.firing.settle()  # raised after all, though withdrawn
                self._count_timeout(record.firing, key)
                # A fired task that finished by itself (inside C code) must not
                # pass its undelivered exception on to the thread's next task.
                record.firing.cancel(self.worker)

    def _fail_after_of(self, key: Any) -> float | None:
        ts = self.worker.state.tasks.get(key)
        annotations = ts.annotations if ts is not None else None
        if not annotations or ANNOTATION not in annotations:
            return self.settings.fail_after
        raw = annotations[ANNOTATION]
        try:
            return self._timeouts[raw]
        except (KeyError, TypeError):
            pass
        try:
            parsed = _TIMEOUT_TYPE.convert(raw, None, None)
        except Exception as exc:
            self.report_error(f"annotation {ANNOTATION}={raw!r} of {key!r}", exc)
            parsed = self.settings.fail_after
        try:
            if bounded(self._timeouts, raw, MAX_CACHED_ANNOTATIONS):
                self._timeouts[raw] = parsed
            else:
                self.annotation_cache_overflow += 1
        except TypeError:
            pass
        return parsed

    # -- the checker thread -------------------------------------------------------
    def _loop(self) -> None:
        wait = self.settings.interval
        while not self._stop.wait(wait):
            try:
                deferred = self.check()
            except Exception as exc:
                self.report_error("checking running tasks", exc)
                deferred = False
            # A timeout that found its thread outside a safe point is tried
            # again soon: the thread may stand at one only for a moment.
            wait = (
                min(RETRY_INTERVAL, self.settings.interval)
                if deferred
                else (self.settings.interval)
            )

    def check(self) -> bool:
        """Look at every running task once (the checker thread calls this).

        Returns:
            Whether a timeout is due but could not be delivered yet (its thread
            was not at a safe point).
        """
        worker = self.worker
        deferred = False
        if not worker.active_threads:
            return deferred
        with worker.active_threads_lock:
            active = dict(worker.active_threads)
        tasks = worker.state.tasks
        current = now()
        warn_after = self.settings.warn_after
        for thread_id, key in active.items():
            ts = tasks.get(key)
            if ts is None or ts.state not in RUNNING_STATES:
                continue  # an actor call, or a thread that is just leaving
            record = self._tasks.get(key)
            if record is None:  # set up while the task was already running
                start = ts.start_time or current
                record = self._tasks.setdefault(
                    key, _Running(start, self._fail_after_of(key))
                )
            elapsed = current - record.start
            fail_after = record.fail_after
            if fail_after is not None and elapsed >= fail_after:
                if record.firing is None or record.firing.thread != thread_id:
                    record.firing = Firing(thread_id)
                step = record.firing.due(
                    self.settings.interrupt_grace, self.settings.interrupt_attempts
                )
            else:
                step = None
            if step == "fire":
                if not self._time_out(thread_id, key, record, elapsed, ts.state):
                    deferred = True
            elif step == "escalate":
                self._give_up(thread_id, key, record, elapsed, ts.state)
            elif (
                warn_after is not None
                and elapsed >= warn_after
                and (
                    record.warned_at is None or current - record.warned_at >= warn_after
                )
            ):
                record.warned_at = current
                self._warn(thread_id, key, record, elapsed, ts.state)
        for key in [k for k in list(self._tasks) if k not in tasks]:
            self._tasks.pop(key, None)  # forgotten without a transition we saw
        return deferred

    def _describe(
        self, thread_id: int, key: Any, record: _Running, elapsed: float
    ) -> dict:
        return {
            "key": str(key),
            "prefix": prefix_of(key),
            "worker": str(self.worker.address),
            "thread": thread_id,
            "elapsed": round(elapsed, 3),
            "warn_after": self.settings.warn_after,
            "fail_after": record.fail_after,
            "stack": _stack_of(thread_id, self.settings.stack_depth),
        }

    def _time_out(
        self, thread_id: int, key: Any, record: _Running, elapsed: float, state: str
    ) -> bool:
        assert record.fail_after is not None
        message = (
            f"task {str(key)!r} ran longer than {format_time(record.fail_after)} "
            f"(catalog.watchdog fail-after) on worker {self.worker.address}"
        )
        firing = record.firing
        assert firing is not None
        if not firing.fire(self.worker, key, TaskTimeoutError, message):
            return False  # not at a safe point right now: try again soon
        if firing.kept_pending:
            return True  # the last one has not landed yet: the warnings say so
        info = self._describe(thread_id, key, record, elapsed)
        info["attempt"] = firing.count
        if firing.count == 1:
            record.fired_at = now()
            self._count_timeout(firing, key)
            what = "timed out after"
            action, counter, doc = "timeout", None, ""
        else:
            self.refires += 1
            what = "is still running, interrupted again, after"
            action, counter, doc = (
                "refire",
                "watchdog_refires",
                "TaskTimeoutErrors raised again in tasks that went on running.",
            )
        logger.warning(
            "Task %r (prefix %s, %s) on worker %s %s %s (fail-after %s): raising "
            "TaskTimeoutError in thread %d (attempt %d of %d), which is at:\n%s",
            info["key"],
            info["prefix"],
            state,
            info["worker"],
            what,
            format_time(elapsed),
            format_time(record.fail_after),
            thread_id,
            firing.count,
            self.settings.interrupt_attempts,
            format_stack(info["stack"]),
        )
        self._emit(action, info, counter, doc)
        return True

    def _give_up(
        self, thread_id: int, key: Any, record: _Running, elapsed: float, state: str
    ) -> None:
        """The task survived every interrupt: say so loudly, count it, leave it."""
        self.unstoppable += 1
        info = self._describe(thread_id, key, record, elapsed)
        assert record.firing is not None
        info["attempt"] = record.firing.count
        logger.warning(
            "Task %r (prefix %s, %s) on worker %s cannot be stopped: still running "
            "after %s and %d TaskTimeoutErrors delivered (it swallows them, sits "
            "in C code, or never stood at a safe point); the watchdog gives up on "
            "it. Thread %d is at:\n%s",
            info["key"],
            info["prefix"],
            state,
            info["worker"],
            format_time(elapsed),
            record.firing.count,
            thread_id,
            format_stack(info["stack"]),
        )
        self._emit(
            "unstoppable",
            info,
            "watchdog_unstoppable",
            "Tasks the watchdog could not stop after interrupt-attempts interrupts.",
        )

    def _warn(
        self, thread_id: int, key: Any, record: _Running, elapsed: float, state: str
    ) -> None:
        info = self._describe(thread_id, key, record, elapsed)
        timeout_pending = record.fired_at is not None
        info["timeout_pending"] = timeout_pending
        if timeout_pending:
            assert record.fired_at is not None
            if record.firing is not None and pending(record.firing.fired):
                why = (
                    "the thread is blocked outside Python (C code or I/O) and "
                    "gets it when that call returns"
                )
            else:
                why = "the task caught it and goes on"
            deadline = (
                f"TaskTimeoutError pending for "
                f"{format_time(now() - record.fired_at)}: {why}"
            )
        elif record.fail_after is not None:
            deadline = (
                f"fails at {format_time(record.fail_after)}, "
                f"in {format_time(max(record.fail_after - elapsed, 0))}"
            )
        else:
            deadline = "no fail-after"
        self.warnings += 1
        logger.warning(
            "Task %r (prefix %s, %s) on worker %s has been running for %s "
            "(warn-after %s; %s); thread %d is at:\n%s",
            info["key"],
            info["prefix"],
            state,
            info["worker"],
            format_time(elapsed),
            format_time(self.settings.warn_after),
            deadline,
            thread_id,
            format_stack(info["stack"]),
        )
        self._emit("warning", info, "watchdog_warnings", "Slow-task warnings logged.")

    def _count_timeout(self, firing: Firing, key: Any) -> None:
        """Count a delivered timeout once, from whichever thread comes first."""
        if firing.claim_first_report():
            self.timeouts += 1
            self._count("watchdog_timeouts", self.TIMEOUTS_DOC, prefix_of(key))

    def _emit(self, action: str, info: dict, counter: str | None, doc: str) -> None:
        log_worker_event(self.worker, EVENT_TOPIC, {"action": action, **info})
        if counter is not None:
            self._count(counter, doc, info["prefix"])

    def _count(self, counter: str, doc: str, prefix: str) -> None:
        fam = families_for(self.worker)
        if fam is not None:
            fam.counter(counter, doc, ["prefix"]).labels(fam.prefix(prefix)).inc()

    def memory(self) -> int:
        """Bytes of the running tasks' records and the annotation cache."""
        held = (getattr(self, "_tasks", None) or {}, getattr(self, "_timeouts", {}))
        return sum(sizeof(dict(part)) for part in held)

    def status(self) -> dict[str, Any]:
        """The base status plus how many warnings and timeouts were issued."""
        out = super().status()
        for name in (
            "warnings",
            "timeouts",
            "refires",
            "unstoppable",
            "annotation_cache_overflow",
        ):
            out[name] = getattr(self, name, 0)
        return out


def _running_on(dask_worker: Any) -> list[dict[str, Any]]:
    """The tasks running on this worker (``client.run`` calls it on every worker)."""
    plugin = dask_worker.plugins.get(ENTRY.plugin_name)
    records = getattr(plugin, "_tasks", {}) if isinstance(plugin, Watchdog) else {}
    depth = plugin.settings.stack_depth if isinstance(plugin, Watchdog) else 8
    with dask_worker.active_threads_lock:
        active = dict(dask_worker.active_threads)
    current = now()
    out = []
    for thread_id, key in active.items():
        ts = dask_worker.state.tasks.get(key)
        if ts is None or ts.state not in RUNNING_STATES:
            continue
        record = records.get(key)
        firing = record.firing if record is not None else None
        start = record.start if record is not None else (ts.start_time or current)
        out.append(
            {
                "key": str(key),
                "prefix": prefix_of(key),
                "state": ts.state,
                "thread": thread_id,
                "elapsed": round(current - start, 3),
                "fail_after": record.fail_after if record is not None else None,
                "timed_out": record is not None and record.fired_at is not None,
                "interrupts": firing.count if firing is not None else 0,
                "unstoppable": firing is not None and firing.escalated,
                "stack": _stack_of(thread_id, depth),
            }
        )
    out.sort(key=lambda task: -task["elapsed"])
    return out


def running(client: Any) -> Any:
    """The tasks running right now on every worker: "what is my cluster doing?".

    Works with or without the Watchdog installed; with it, elapsed times count
    from the moment the task started executing and timeouts are shown.

    Args:
        client: a ``distributed.Client``; with ``Client(asynchronous=True)`` an
            awaitable of the result is returned, as distributed's own client
            methods do.

    Returns:
        ``{worker address: [task, ...]}``, longest-running first; each task is
        ``{"key", "prefix", "state", "thread", "elapsed", "fail_after",
        "timed_out", "interrupts", "unstoppable", "stack"}`` with ``stack`` a
        list of ``{"filename", "lineno", "name", "line"}``, outermost frame
        first.
    """
    # client.run itself answers an awaitable for an asynchronous client.
    return client.run(_running_on)


dask_setup, dask_teardown = entry_preload(ENTRY, worker=Watchdog)
