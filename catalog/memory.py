"""Memory guards that fail the offending task instead of losing the worker."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from dask.sizeof import sizeof
from dask.utils import format_bytes
from distributed.core import Status

from catalog._memory_attribution import (
    HAVE_FAULTS,
    RESUME_FACTOR,
    RssReader,
    _minor_faults,
    _PrefixStats,
    host_decision,
    merge_reports,
    split_growth,
)
from catalog.entry import (
    OTHER,
    RETRY_INTERVAL,
    Duration,
    Entry,
    Families,
    Firing,
    Option,
    Size,
    SizeOrFraction,
    TaskInterrupt,
    WorkerEntryPlugin,
    add_collector,
    bounded,
    entry_preload,
    families_for,
    interrupt_options,
    log_worker_event,
    prefix_of,
    remove_collector,
    run_soon,
)

__all__ = [
    "ANNOTATION",
    "ENTRY",
    "MemoryGuard",
    "RssReader",
    "TaskMemoryLimitExceeded",
    "dask_setup",
    "dask_teardown",
    "host_decision",
    "merge_reports",
    "report",
    "split_growth",
]

logger = logging.getLogger("catalog.memory")

#: The task annotation that overrides ``task-limit`` for the annotated tasks.
ANNOTATION = "catalog_memory_limit"
#: How the annotation's value is read: as ``task-limit`` is.
ANNOTATION_TYPE = Size(nullable=True, memory=True)
#: Worker event topic of every action.
TOPIC = "catalog.memory"
#: How many finished tasks ``peak_of`` remembers.
RECENT_TASKS = 10_000
#: Worker task states in which a task's thread may still be running it.
RUNNING_STATES = frozenset({"executing", "long-running", "cancelled", "resumed"})
#: Samples a failed task may take to stop before the guard warns that it has not.
STILL_RUNNING_SAMPLES = 5
#: Distinct prefixes ``report`` keeps per worker; later ones are folded into
#: ``"other"`` and counted (``prefixes_overflow`` in the status).
MAX_PREFIXES = 1000
#: Bucket bounds (bytes) of ``dask_catalog_task_peak_memory_bytes``.
PEAK_BUCKETS = tuple(float(2**20 * 4**i) for i in range(9))  # 1 MiB .. 64 GiB

ENTRY = Entry(
    name="memory",
    summary="fail the task that eats memory instead of losing the whole worker",
    runs_on={
        "worker": "samples RSS, attributes growth to running tasks, fails offenders",
        "scheduler": "nothing",
        "nanny": "nothing",
        "client": "registers MemoryGuard on every worker",
    },
    options=[
        Option(
            "task-limit",
            Size(nullable=True, memory=True),
            None,
            "Fail a task whose attributed memory growth exceeds this size "
            "(annotation catalog_memory_limit overrides it per task).",
        ),
        Option(
            "process-limit",
            SizeOrFraction(of="worker memory limit", nullable=True),
            0.9,
            "Above this process memory, fail the running task with the largest "
            "attributed growth (between distributed's pause 0.8 and terminate 0.95).",
        ),
        Option(
            "host-min-available",
            SizeOrFraction(of="host's total memory", nullable=True),
            None,
            "Pause the worker while the host's available memory is below this, "
            "until it is back above 1.25 times it.",
        ),
        Option(
            "interval",
            Duration(minimum="1ms", maximum="1h"),
            "50ms",
            "How often the worker's memory is sampled.",
        ),
        *interrupt_options(
            "1s",
            "the guard escalates: a process-limit victim gets the worker restarted "
            "gracefully (results moved first), a task-limit one is logged and counted",
        ),
    ],
    examples=(
        "dask worker tcp://scheduler:8786 --nthreads 1 --memory-limit 4GiB "
        "--preload catalog.memory --memory-task-limit 1GiB",
    ),
)


class TaskMemoryLimitExceeded(TaskInterrupt):
    """Raised inside a task that the memory guard failed.

    The message names the key, the limit and the memory observed. Inside the
    task it is a ``BaseException``, so ``except Exception`` (or ``except
    MemoryError``) does not swallow it; on the client it is also a
    ``MemoryError``.
    """

    reported_as = (MemoryError,)


# ---------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Running:
    """One running task, as the sampler sees it."""

    key: Any
    prefix: str
    thread: int
    limit: int | None
    attributed: float = 0.0
    peak: float = 0.0
    shared: bool = False
    fired: str | None = None
    fired_rss: int = 0
    fired_sample: int = 0
    firing: Firing | None = None
    wanted: str | None = None
    wanted_limit: int = 0
    message: str = ""
    warned: bool = False
    faults: int | None = None
    first: bool = True


#: A task the transition hook saw start: the guard's latest RSS reading then,
#: ``_State.begins`` then (any other start changes it) and whether another task
#: was running. A plain tuple: building it is the whole cost of a start.
_Begun = tuple[int, int, bool]
#: A task the hook saw leave the running states, waiting to be counted: key,
#: its sampler record (or None), its ``_Begun`` (or None) and whether others ran
#: alongside it.
_Ended = tuple[Any, "_Running | None", "_Begun | None", bool]
#: Least time between two counts of finished tasks by the sampler thread: the
#: tasks that end meanwhile are counted together, one RSS reading for all.
FOLD_GAP = 0.002


@dataclass
class _State:
    """What one active guard builds in setup (dropped at teardown)."""

    process: psutil.Process
    rss: RssReader
    interval: float
    task_limit: int | None
    process_limit: int | None
    host_threshold: int | None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None
    running: dict[int, _Running] = field(default_factory=dict)
    by_key: dict[Any, _Running] = field(default_factory=dict)
    #: Every task running now, from the transition hook (short ones included).
    begun: dict[Any, _Begun] = field(default_factory=dict)
    begins: int = 0
    #: Tasks that left the running states, counted by the sampler thread (or
    #: by a reader) with one RSS reading: the hook itself reads nothing.
    ended: deque[_Ended] = field(default_factory=deque)
    #: The latest RSS reading, by the sampler or a count: a start's baseline.
    mark_rss: int = 0
    #: Released by the hook when a task ends, to wake the sampler thread.
    wake: threading.Lock = field(default_factory=threading.Lock)
    collector: Any = None
    recent: OrderedDict[Any, int] = field(default_factory=OrderedDict)
    prefixes: dict[str, _PrefixStats] = field(default_factory=dict)
    native: dict[int, int] = field(default_factory=dict)
    last_rss: int | None = None
    sample: int = 0
    collect: bool = False
    fired_keys: set[Any] = field(default_factory=set)
    victim: Any = None
    victim_left: bool = False
    rearm: int | None = None
    restarting: bool = False
    retry_soon: bool = False
    prefixes_overflow: int = 0
    unstoppable: int = 0
    host_paused: bool = False
    pause_hook: Callable[..., Any] | None = None


class MemoryGuard(WorkerEntryPlugin):
    """Measure each task's memory on the worker and fail the offender in time.

    A daemon thread samples the process RSS every ``interval`` and attributes
    its growth to the running tasks. A task over ``task-limit`` (or its
    ``catalog_memory_limit`` annotation), or the largest grower when the process
    passes ``process-limit``, is failed with :class:`TaskMemoryLimitExceeded`
    before the nanny would kill the whole worker. Below ``host-min-available``
    of free host memory the worker pauses.

    Args:
        task_limit: size; None for no per-task limit.
        process_limit: size, or fraction of the worker memory limit (0.9).
        host_min_available: size, or fraction of the host's total memory.
        interval: sampling period (``"50ms"``).

    Example:
        >>> from distributed import Client, LocalCluster
        >>> import catalog
        >>> cluster = LocalCluster(n_workers=1, threads_per_worker=1,
        ...     processes=False, protocol="tcp", host="127.0.0.1",
        ...     dashboard_address="127.0.0.1:0")
        >>> client = Client(cluster)
        >>> _ = client.register_plugin(catalog.MemoryGuard(task_limit="300MiB"))
        >>> def grow():
        ...     return len([b"x" * 2**20 for _ in range(10)])
        >>> client.submit(grow).result()
        10
        >>> client.close(); cluster.close()
    """

    entry = ENTRY

    # -- lifecycle ------------------------------------------------------------
    def on_setup(self, worker: Any) -> None:
        s = self.settings
        process = psutil.Process()
        state = _State(
            process=process,
            rss=RssReader(process),
            interval=s.interval,
            task_limit=s.task_limit,
            process_limit=self._process_limit(worker),
            host_threshold=_of_total(
                s.host_min_available, psutil.virtual_memory().total
            ),
        )
        state.last_rss = state.mark_rss = process.memory_info().rss
        state.wake.acquire()  # held: the hook releases it to wake the sampler
        # Tasks already running when the guard arrives are measured from now.
        for ts in (*worker.state.executing, *worker.state.long_running):
            state.begun[ts.key] = (state.last_rss, 0, True)
        self._state = state
        state.collector = _FoldCollector(self, worker, state)
        add_collector(worker, state.collector)
        if state.host_threshold is not None:
            self._hold_distributed_unpause(worker, state)
        state.thread = threading.Thread(
            target=self._run, args=(worker, state), name="catalog-memory", daemon=True
        )
        state.thread.start()

    def on_teardown(self, worker: Any) -> None:
        state: _State | None = getattr(self, "_state", None)
        if state is None:
            return
        state.stop.set()
        _wake(state)
        if state.thread is not None and state.thread is not threading.current_thread():
            state.thread.join(timeout=max(1.0, 4 * state.interval))
        if state.collector is not None:
            remove_collector(worker, state.collector)
        state.rss.close()
        manager = getattr(worker, "memory_manager", None)
        if state.pause_hook is not None and manager is not None:
            if manager.__dict__.get("_maybe_pause_or_unpause") is state.pause_hook:
                del manager.__dict__["_maybe_pause_or_unpause"]
        if state.host_paused:
            state.host_paused = False
            run_soon(worker, self._apply_resume, worker)

    def _process_limit(self, worker: Any) -> int | None:
        value = self.settings.process_limit
        if value is None:
            return None
        if isinstance(value, float):
            manager = getattr(worker, "memory_manager", None)
            total = getattr(manager, "memory_limit", None)
            if not total:
                logger.info(
                    "process-limit %s is a fraction and the worker has no memory "
                    "limit: process-limit is off",
                    value,
                )
                return None
            terminate = getattr(manager, "memory_terminate_fraction", None) or 0.95
            if value >= terminate:
                logger.warning(
                    "process-limit %s is not below the nanny's terminate fraction "
                    "%s: the nanny may kill the worker first",
                    value,
                    terminate,
                )
            return int(total * value)
        return int(value)

    # -- public -------------------------------------------------------------
    def peak_of(self, key: Any) -> int | None:
        """Peak memory growth (bytes) of a running or recently finished task.

        Returns None for a task the guard has not seen run (before its setup)
        or has forgotten (more than 10,000 tasks ago).
        """
        state: _State | None = getattr(self, "_state", None)
        if state is None:
            return None
        self._fold(self.server, state)
        with state.lock:
            rec = state.by_key.get(key)
            if rec is not None:
                return int(rec.peak)
            return state.recent.get(key)

    def prefix_stats(self) -> dict[str, dict[str, Any]]:
        """Per task prefix: count, mean and max peak, shared and failed counts."""
        state: _State | None = getattr(self, "_state", None)
        if state is None:
            return {}
        self._fold(self.server, state)
        with state.lock:
            return {p: st.as_dict() for p, st in state.prefixes.items()}

    def memory(self) -> int:
        """Bytes of the per-prefix figures, recent peaks and running records."""
        state: _State | None = getattr(self, "_state", None)
        if state is None:
            return 0
        self._fold(self.server, state)
        with state.lock:
            held = (state.prefixes, state.recent, state.by_key, state.begun)
            return sum(sizeof(part) for part in held)

    def status(self) -> dict[str, Any]:
        out = super().status()
        state: _State | None = getattr(self, "_state", None)
        if state is not None:
            out.update(
                process_limit_bytes=state.process_limit,
                host_min_available_bytes=state.host_threshold,
                host_paused=state.host_paused,
                running=len(state.running),
                unstoppable=state.unstoppable,
                restarting=state.restarting,
                prefixes_overflow=state.prefixes_overflow,
            )
        return out

    # -- hot path --------------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        # A start records the guard's latest RSS reading and an end queues the
        # task for the sampler thread, which counts it after one RSS reading
        # (for every task that ended meanwhile): no system call here, on the
        # worker's event loop. A seceded or cancelled task still runs in its
        # thread: only its leaving the running states ends its record.
        if finish in RUNNING_STATES:
            if start not in RUNNING_STATES:
                state: _State | None = self.__dict__.get("_state")
                if state is not None:
                    state.begins += 1
                    begun = state.begun
                    begun[key] = (state.mark_rss, state.begins, bool(begun))
        elif start in RUNNING_STATES:
            state = self.__dict__.get("_state")
            if state is None:
                return
            # begun first, then by_key: see _start.
            begun_rec = state.begun.pop(key, None)
            rec = state.by_key.pop(key, None)
            if rec is None and begun_rec is None:
                return  # ran before the guard was set up
            shared = begun_rec is not None and (
                begun_rec[2] or begun_rec[1] != state.begins or bool(state.begun)
            )
            if rec is not None and rec.firing is not None:
                # A failed task: reported, and its interrupt withdrawn, before
                # its thread runs another task. Rare: counted right here.
                self._fold(self.server, state, (key, rec, begun_rec, shared))
                if key in state.fired_keys:
                    # distributed has dropped the task's result message: its
                    # exception, traceback and frames are now garbage.
                    state.fired_keys.discard(key)
                    if key == state.victim:
                        state.victim_left = True
                    state.collect = True
                return
            state.ended.append((key, rec, begun_rec, shared))
            wake = state.wake
            if wake.locked():
                _wake(state)

    # -- sampler ------------------------------------------------------------
    def _run(self, worker: Any, state: _State) -> None:
        due = time.monotonic() + state.interval
        while not state.stop.is_set():
            left = due - time.monotonic()
            if left > 0 and state.wake.acquire(timeout=left):
                # A task ended: count it (and those ending in the next
                # FOLD_GAP, together) while its RSS is fresh.
                try:
                    self._fold(worker, state)
                except Exception as exc:
                    self.report_error("counting finished tasks", exc)
                state.stop.wait(FOLD_GAP)
                continue
            if state.stop.is_set():
                break
            due = time.monotonic() + state.interval
            try:
                self._sample(worker, state)
                # An interrupt that found its thread outside a safe point is
                # tried again soon, until the next sample.
                deadline = time.monotonic() + state.interval
                while (
                    state.retry_soon
                    and not state.stop.wait(min(RETRY_INTERVAL, state.interval))
                    and time.monotonic() < deadline
                ):
                    self._interrupts(worker, state, list(state.running.values()))
            except Exception as exc:
                self.report_error("sampling memory", exc)

    def _sample(self, worker: Any, state: _State) -> None:
        state.sample += 1
        if state.collect:
            # A failed task's frames (and its memory) hang in a reference cycle
            # through the exception's traceback until the next full collection.
            state.collect = False
            gc.collect()
            state.last_rss = state.process.memory_info().rss
            if state.victim_left:
                state.victim_left = False
                state.victim = None
                state.rearm = state.last_rss
        rss = state.process.memory_info().rss
        self._fold(worker, state, rss=rss)
        with worker.active_threads_lock:
            active = dict(worker.active_threads)
        delta = rss - (state.last_rss if state.last_rss is not None else rss)
        state.last_rss = rss

        for tid, rec in list(state.running.items()):
            if active.get(tid) != rec.key:
                # Its thread has left it; its transition finishes the record.
                with state.lock:
                    if state.running.get(tid) is rec:
                        del state.running[tid]
        for tid, key in active.items():
            if tid not in state.running:
                self._start(worker, state, tid, key)
        tasks = list(state.running.values())

        weights: list[float | None] = [None] * len(tasks)
        if HAVE_FAULTS and len(tasks) > 1:
            for i, rec in enumerate(tasks):
                faults = self._faults_of(state, rec.thread)
                if faults is not None and rec.faults is not None and not rec.first:
                    weights[i] = max(faults - rec.faults, 0)
                rec.faults = faults
        elif HAVE_FAULTS:
            for rec in tasks:
                rec.faults = None
        shares = split_growth(delta, [r.attributed for r in tasks], weights)
        with state.lock:
            for rec, share in zip(tasks, shares, strict=True):
                if rec.first:
                    share = max(share, 0.0)
                    rec.first = False
                rec.attributed = max(rec.attributed + share, 0.0)
                rec.peak = max(rec.peak, rec.attributed)
                if len(tasks) > 1:
                    rec.shared = True

        self._interrupts(worker, state, tasks)
        for rec in tasks:
            if (
                rec.firing is None
                and rec.limit is not None
                and rec.attributed > rec.limit
            ):
                self._fire(worker, state, rec, "task-limit", rec.limit, rss)
        if state.process_limit is not None:
            if rss > state.process_limit:
                self._over_process_limit(worker, state, tasks, rss)
            else:
                state.rearm = None
        if state.host_threshold is not None:
            self._check_host(worker, state)

    def _interrupts(self, worker: Any, state: _State, tasks: list[_Running]) -> None:
        """Deliver, repeat or escalate the interrupts of tasks already failed."""
        s = self.settings
        state.retry_soon = False
        for rec in tasks:
            if rec.firing is None:
                continue
            step = rec.firing.due(s.interrupt_grace, s.interrupt_attempts)
            if step == "fire":
                self._deliver(worker, state, rec)
            elif step == "escalate":
                self._escalate(worker, state, rec)

    def _start(self, worker: Any, state: _State, tid: int, key: Any) -> None:
        ts = worker.state.tasks.get(key)
        prefix = getattr(ts, "prefix", None) or prefix_of(key)
        limit = state.task_limit
        annotations = getattr(ts, "annotations", None) or {}
        if ANNOTATION in annotations:
            try:
                limit = ANNOTATION_TYPE.convert(annotations[ANNOTATION], None, None)
            except Exception as exc:
                self.report_error(f"annotation {ANNOTATION} of {key!r}", exc)
        rec = _Running(key=key, prefix=prefix, thread=tid, limit=limit)
        with state.lock:
            if key not in state.begun:
                return  # its transition has already finished it
            state.running[tid] = rec
            state.by_key[key] = rec
            # The hook takes no lock: it pops begun, then by_key. Had it popped
            # begun since the check above, it may have missed rec: undo.
            if key not in state.begun:
                if state.running.get(tid) is rec:
                    del state.running[tid]
                if state.by_key.get(key) is rec:
                    del state.by_key[key]

    def _fold(
        self,
        worker: Any,
        state: _State,
        one: _Ended | None = None,
        rss: int | None = None,
    ) -> None:
        """Count the tasks that ended (or ``one``), with one RSS reading for all."""
        ended = state.ended
        if one is None and not ended:
            if rss is not None:
                state.mark_rss = rss
            return
        if rss is None:
            rss = state.rss()
        state.mark_rss = rss
        fam = families_for(worker)
        cancel: list[_Running] = []
        with state.lock:
            while ended:
                self._count(worker, state, *ended.popleft(), rss, fam, cancel)
            if one is not None:
                self._count(worker, state, *one, rss, fam, cancel)
        for rec in cancel:
            # Left executing by itself (finished inside C code) before the
            # exception landed: it must not hit the thread's next task.
            assert rec.firing is not None
            rec.firing.cancel(worker)

    def _count(
        self,
        worker: Any,
        state: _State,
        key: Any,
        rec: _Running | None,
        begun: _Begun | None,
        shared: bool,
        rss: int,
        fam: Families | None,
        cancel: list[_Running],
    ) -> None:
        """Count a task that left the running states, once, in every family.

        Its peak is the larger of what the samples attributed to it and its
        RSS growth from the reading before its start to the one after its end.
        That growth is all its own when it ran alone; when others ran
        alongside, a sampled task keeps its attributed share and a task no
        sample saw gets the process's growth (flagged shared). Under the lock.
        """
        if rec is not None and state.running.get(rec.thread) is rec:
            del state.running[rec.thread]
        growth = max(rss - begun[0], 0) if begun is not None else 0
        if rec is None:
            peak, prefix, failed = growth, prefix_of(key), False
        else:
            delivered = False
            if rec.firing is not None:
                rec.firing.settle()  # raised after all, though withdrawn
                if rec.firing.claim_first_report():
                    self._report_first(worker, state, rec)
                delivered = rec.firing.count > 0
                cancel.append(rec)
            shared = shared or rec.shared
            peak = int(rec.peak) if shared else max(int(rec.peak), growth)
            prefix, failed = rec.prefix, delivered
        state.recent[key] = peak
        if len(state.recent) > RECENT_TASKS:
            state.recent.popitem(last=False)
        if not bounded(state.prefixes, prefix, MAX_PREFIXES):
            state.prefixes_overflow += 1
            prefix = OTHER
        stats = state.prefixes.get(prefix)
        if stats is None:
            stats = state.prefixes[prefix] = _PrefixStats()
        stats.count += 1
        stats.total += peak
        stats.max = max(stats.max, peak)
        stats.shared += shared
        stats.failed += failed
        if fam is not None:
            fam.histogram(
                "task_peak_memory_bytes",
                "Peak memory growth attributed to a task, in bytes",
                ["prefix"],
                buckets=PEAK_BUCKETS,
            ).labels(fam.prefix(prefix)).observe(peak)

    def _faults_of(self, state: _State, tid: int) -> int | None:
        native = state.native.get(tid)
        if native is None:
            state.native = {
                t.ident: t.native_id
                for t in threading.enumerate()
                if t.ident is not None and t.native_id is not None
            }
            native = state.native.get(tid)
            if native is None:
                return None
        return _minor_faults(native)

    def _over_process_limit(
        self, worker: Any, state: _State, tasks: list[_Running], rss: int
    ) -> None:
        assert state.process_limit is not None
        fired = [r for r in tasks if r.fired is not None]
        for rec in fired:
            waited = state.sample - rec.fired_sample
            if (
                not rec.warned
                and waited >= STILL_RUNNING_SAMPLES
                and rss > rec.fired_rss
            ):
                rec.warned = True
                self._act(
                    worker,
                    "still-running",
                    rec,
                    state.process_limit,
                    {"rss": rss},
                    f"task {rec.key!r} was failed but has not stopped (blocked in C "
                    f"code?) and process memory keeps rising: {format_bytes(rss)} > "
                    f"process-limit {format_bytes(state.process_limit)}; it is "
                    "interrupted again every interrupt-grace, then the worker is "
                    "restarted",
                )
        if state.victim is not None:
            return  # wait for the last victim to leave before choosing another
        if state.rearm is not None and rss <= state.rearm:
            return  # memory has not risen since the last victim left
        candidates = [r for r in tasks if r.firing is None and r.attributed > 0]
        if candidates:
            victim = max(candidates, key=lambda r: r.attributed)
            self._fire(worker, state, victim, "process-limit", state.process_limit, rss)

    def _fire(
        self,
        worker: Any,
        state: _State,
        rec: _Running,
        action: str,
        limit: int,
        rss: int,
    ) -> None:
        observed = int(rec.attributed)
        shared = " (shared: other tasks ran meanwhile)" if rec.shared else ""
        if action == "task-limit":
            message = (
                f"task {rec.key!r} exceeded its memory limit: {format_bytes(observed)} "
                f"attributed growth{shared} > task-limit {format_bytes(limit)}"
            )
        else:
            message = (
                f"task {rec.key!r} failed to protect the worker: process memory "
                f"{format_bytes(rss)} > process-limit {format_bytes(limit)}, and this "
                f"task had the largest attributed growth, {format_bytes(observed)}"
                f"{shared}"
            )
        rec.firing = Firing(rec.thread)
        rec.wanted = action
        rec.message = message
        rec.wanted_limit = limit
        state.fired_keys.add(rec.key)
        if action == "process-limit":
            state.victim = rec.key  # no other victim while this one is tried
        self._deliver(worker, state, rec)

    def _deliver(self, worker: Any, state: _State, rec: _Running) -> None:
        """Raise the task's TaskMemoryLimitExceeded, first or again."""
        assert rec.firing is not None and rec.wanted is not None
        if not rec.firing.fire(worker, rec.key, TaskMemoryLimitExceeded, rec.message):
            state.retry_soon = True  # not at a safe point right now
            return
        if rec.firing.kept_pending:
            return  # the last one has not landed yet (C code): nothing new to say
        if rec.firing.count == 1:
            if rec.firing.claim_first_report():
                self._report_first(worker, state, rec)
            return
        text = (
            f"task {rec.key!r} is still running after TaskMemoryLimitExceeded: "
            f"raising it again (attempt {rec.firing.count} of "
            f"{self.settings.interrupt_attempts})"
        )
        figures = {"rss": state.last_rss or 0, "attempt": rec.firing.count}
        self._act(worker, "refire", rec, rec.wanted_limit, figures, text)

    def _report_first(self, worker: Any, state: _State, rec: _Running) -> None:
        """The first TaskMemoryLimitExceeded landed: log, count and tell, once.

        From the sampler thread that fired it, or from the task's leaving
        transition when that came first (see ``Firing.claim_first_report``).
        """
        assert rec.wanted is not None
        rss = state.last_rss or 0
        rec.fired = rec.wanted
        rec.fired_rss = rss
        rec.fired_sample = state.sample
        figures = {"rss": rss, "attempt": 1}
        text = rec.message + " (failing it)"
        self._act(worker, rec.wanted, rec, rec.wanted_limit, figures, text)

    def _escalate(self, worker: Any, state: _State, rec: _Running) -> None:
        """A failed task survived every interrupt (or never stood at a safe point).

        A process-limit victim (or any such task while the process is over the
        limit) would take the whole worker down: restart the worker gracefully
        through the scheduler, which first moves its results to other workers.
        A task-limit victim on a worker that is not in danger is logged and
        counted.
        """
        assert rec.firing is not None
        state.unstoppable += 1
        rss = state.last_rss or 0
        over = state.process_limit is not None and rss > state.process_limit
        attempts = rec.firing.count
        figures = {"rss": rss, "attempt": attempts}
        why = (
            f"still running after {attempts} TaskMemoryLimitExceeded delivered (it "
            "swallows them, sits in C code, or never stood at a safe point)"
        )
        if not (rec.wanted == "process-limit" or over):
            self._act(
                worker,
                "unstoppable",
                rec,
                rec.wanted_limit,
                figures,
                f"task {rec.key!r} cannot be stopped: {why}; the worker is not over "
                "process-limit, so it is left alone",
            )
            return
        if state.restarting:
            return
        state.restarting = True
        nanny = getattr(worker, "nanny", None)
        comeback = (
            "its nanny starts a new worker process"
            if nanny
            else "it has no nanny, so it closes and does NOT come back"
        )
        self._act(
            worker,
            "restart",
            rec,
            rec.wanted_limit,
            figures,
            f"task {rec.key!r} cannot be stopped: {why}, with process memory "
            f"{format_bytes(rss)}; restarting the worker gracefully (the scheduler "
            f"moves its results to other workers first); {comeback}",
        )
        run_soon(worker, self._restart_worker, worker)

    async def _restart_worker(self, worker: Any) -> None:
        """Retire the worker's results through the scheduler, then restart it.

        ``Worker.close_gracefully(restart=True)`` is not enough: its process
        cannot exit while the unstoppable task's thread runs (the executor's
        threads are joined at exit). The scheduler's ``restart_workers`` has the
        nanny stop the process, killing it when it will not stop; a worker
        without a nanny is closed instead.
        """
        address = worker.address
        stimulus_id = f"catalog-memory-restart-{time.time()}"
        try:
            await worker.scheduler.retire_workers(
                workers=[address],
                close_workers=False,
                remove=False,
                stimulus_id=stimulus_id,
            )
            await worker.scheduler.restart_workers(
                workers=[address],
                timeout=30,
                wait_for_workers=False,
                on_error="return",
                stimulus_id=stimulus_id,
            )
        except Exception as exc:  # the worker may be gone before the answer
            if worker.status not in (Status.closing, Status.closed):
                self.report_error("restarting the worker", exc)

    def _act(
        self,
        worker: Any,
        action: str,
        rec: _Running | None,
        limit: int,
        figures: dict[str, int],
        message: str,
    ) -> None:
        fam = families_for(worker)
        if fam is not None:  # first: a slow log handler must not delay the count
            label = fam.prefix(rec.prefix) if rec is not None else ""
            fam.counter(
                "memory_actions",
                "Actions of the memory guard (failed tasks, pauses, warnings)",
                ["action", "prefix"],
            ).labels(action, label).inc()
        logger.warning("%s", message)
        event: dict[str, Any] = {
            "action": action,
            "worker": str(getattr(worker, "address", "")),
            "limit": int(limit),
            **figures,
        }
        if rec is not None:
            event.update(
                key=str(rec.key),
                prefix=rec.prefix,
                observed=int(rec.attributed),
                shared=rec.shared,
            )
        log_worker_event(worker, TOPIC, event)

    # -- host memory ------------------------------------------------------------
    def _check_host(self, worker: Any, state: _State) -> None:
        assert state.host_threshold is not None
        available = psutil.virtual_memory().available
        decision = host_decision(state.host_paused, available, state.host_threshold)
        if decision is None:
            return
        threshold = state.host_threshold
        if decision == "pause":
            state.host_paused = True
            text = (
                f"host available memory {format_bytes(available)} < host-min-available "
                f"{format_bytes(threshold)}: pausing the worker"
            )
            run_soon(worker, self._apply_pause, worker)
        else:
            state.host_paused = False
            text = (
                f"host available memory {format_bytes(available)} > "
                f"{RESUME_FACTOR} x host-min-available {format_bytes(threshold)}: "
                "resuming the worker"
            )
            run_soon(worker, self._apply_resume, worker)
        self._act(worker, decision, None, threshold, {"available": available}, text)

    def _hold_distributed_unpause(self, worker: Any, state: _State) -> None:
        """Keep distributed's memory monitor from lifting our pause.

        Its monitor sets a paused worker running whenever the *process* is below
        the pause fraction, which says nothing about the host.
        """
        manager = getattr(worker, "memory_manager", None)
        original = getattr(manager, "_maybe_pause_or_unpause", None)
        if original is None:
            return

        def _maybe_pause_or_unpause(worker: Any, memory: int) -> None:
            if state.host_paused and worker.status == Status.paused:
                return
            original(worker, memory)

        state.pause_hook = _maybe_pause_or_unpause
        manager.__dict__["_maybe_pause_or_unpause"] = _maybe_pause_or_unpause

    def _apply_pause(self, worker: Any) -> None:
        state: _State | None = getattr(self, "_state", None)
        if state is not None and state.host_paused and worker.status == Status.running:
            worker.status = Status.paused

    def _apply_resume(self, worker: Any) -> None:
        state: _State | None = getattr(self, "_state", None)
        if state is not None and state.host_paused:
            return
        if worker.status != Status.paused:
            return
        manager = getattr(worker, "memory_manager", None)
        fraction = getattr(manager, "memory_pause_fraction", False)
        total = getattr(manager, "memory_limit", None)
        if fraction and total:
            memory = worker.monitor.get_process_memory()
            if memory / total > fraction:
                return  # distributed's own pause holds; its monitor lifts it
        worker.status = Status.running


def _wake(state: _State) -> None:
    """Wake the sampler thread (a task ended, or teardown)."""
    try:
        state.wake.release()
    except RuntimeError:
        pass  # released already, by another thread just now


class _FoldCollector:
    """Counts the tasks that ended before a scrape reads ``task_peak_memory_bytes``.

    It adds no family of its own: the scrape runs collectors before it reads the
    server's families (``catalog._prom``).
    """

    def __init__(self, guard: MemoryGuard, worker: Any, state: _State) -> None:
        self.guard, self.worker, self.state = guard, worker, state

    def collect(self, fam: Families) -> list[Any]:
        self.guard._fold(self.worker, self.state)
        return []


def _of_total(value: float | int | None, total: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, float):
        return int(total * value)
    return int(value)


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def _worker_report(dask_worker: Any) -> dict[str, dict[str, Any]]:
    plugin = dask_worker.plugins.get(ENTRY.plugin_name)
    if plugin is None or not hasattr(plugin, "prefix_stats"):
        return {}
    return plugin.prefix_stats()


def report(client: Any) -> Any:
    """Peak task memory per prefix, from every worker with the guard.

    Returns:
        ``{prefix: {"count", "mean", "max", "shared", "failed"}}`` with sizes in
        bytes: ``count`` tasks that ran (each once, however short), ``shared`` of
        them measured while other tasks ran, ``failed`` by the guard. With an
        asynchronous client, a coroutine to await.
    """
    if getattr(client, "asynchronous", False):

        async def _report() -> dict[str, dict[str, Any]]:
            return merge_reports(await client.run(_worker_report))

        return _report()
    return merge_reports(client.run(_worker_report))


dask_setup, dask_teardown = entry_preload(ENTRY, worker=MemoryGuard)
