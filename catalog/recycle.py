"""Restart workers gracefully before they rot: after N tasks, a lifetime, or a leak."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Any

from dask.utils import format_bytes, format_time

from catalog.entry import (
    Duration,
    Entry,
    Integer,
    Option,
    OptionError,
    OptionType,
    SchedulerEntryPlugin,
    Settings,
    SizeOrFraction,
    WorkerEntryPlugin,
    entry_preload,
    families_for,
    run_soon,
)

__all__ = [
    "ENTRY",
    "EVENT_TOPIC",
    "REASONS",
    "Recycler",
    "SchedulerRecycler",
    "dask_setup",
    "dask_teardown",
]

logger = logging.getLogger("catalog.recycle")

#: The scheduler event topic of every recycle.
EVENT_TOPIC = "catalog.recycle"
#: Why a worker is recycled: the label values of the metric.
REASONS = ("max-tasks", "max-lifetime", "max-unmanaged")
#: The scheduler handler a worker asks to be recycled through.
REQUEST_OP = "catalog_recycle"
#: The worker handler the scheduler asks how many tasks still run there.
RUNNING_OP = "catalog_recycle_running"
#: How long a worker waits for the scheduler's answer: a scheduler without the
#: scheduler half logs "No handler catalog_recycle" and never answers.
REQUEST_TIMEOUT = 10.0
#: How long a worker waits before asking again a scheduler that did not answer.
RETRY_MISSING = 60.0
#: A worker whose accepted recycle left it running this long asks again (the
#: scheduler half puts a worker whose recycle failed back to work).
FAILED_AFTER = 60.0
#: How often the scheduler asks a retiring worker whether its tasks are done.
DRAIN_POLL = 0.2
#: Worker task states that hold a thread.
RUNNING_STATES = frozenset({"executing", "long-running"})


class Fraction(OptionType):
    """A float in (0, 1]: a share of the cluster's workers."""

    # platform: a Fraction option type in catalog.entry would serve other entries.
    name = "fraction"
    accepted = "a fraction in (0, 1] such as 0.25"

    def parse(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("not a number")
        number = float(value)
        if not 0 < number <= 1:
            raise ValueError("out of range")
        return number


def _check(settings: Settings) -> None:
    if settings.lifetime_stagger is not None and settings.max_lifetime is None:
        msg = (
            f"lifetime-stagger={settings.lifetime_stagger!r} needs max-lifetime "
            "(--recycle-max-lifetime): it spreads the lifetimes of a fleet"
        )
        raise OptionError(msg)


ENTRY = Entry(
    name="recycle",
    summary="restart workers gracefully after N tasks, a lifetime, or a leak",
    runs_on={
        "worker": "counts tasks, watches its age and unmanaged memory, asks the "
        "scheduler to recycle it",
        "scheduler": "decides fleet-wide, retires the worker (results moved), waits "
        "for its running tasks, has its nanny start a fresh one",
        "nanny": "nothing (the scheduler asks it to restart the worker)",
        "client": "registers both halves on the cluster",
    },
    options=[
        Option(
            "max-tasks",
            Integer(1, nullable=True),
            None,
            "Recycle a worker after it has computed this many tasks.",
        ),
        Option(
            "max-lifetime",
            Duration(nullable=True, minimum="1s"),
            None,
            "Recycle a worker this long after it started, once its running tasks "
            "have finished (unlike --lifetime, which kills them).",
        ),
        Option(
            "lifetime-stagger",
            Duration(nullable=True),
            None,
            "Add a random 0..this to each worker's max-lifetime, so a fleet does "
            "not restart at once.",
        ),
        Option(
            "max-unmanaged",
            SizeOrFraction(of="worker memory limit", nullable=True),
            None,
            "Recycle a worker whose unmanaged memory (process memory minus data "
            "held) stays above this for max-unmanaged-for.",
        ),
        Option(
            "max-unmanaged-for",
            Duration(minimum="1ms"),
            "1m",
            "How long unmanaged memory must stay above max-unmanaged.",
        ),
        Option(
            "max-retiring",
            Fraction(),
            0.25,
            "The largest share of the workers recycled at once (at least one "
            "worker; never the last running worker).",
        ),
        Option(
            "drain-timeout",
            Duration(nullable=True),
            None,
            "Restart anyway when the running tasks of a retiring worker take longer "
            "than this (none: wait for them).",
        ),
        Option(
            "interval",
            Duration(minimum="10ms", maximum="1h"),
            "1s",
            "How often a worker checks its limits.",
        ),
    ],
    check=_check,
    examples=(
        "dask scheduler --preload catalog.recycle",
        "dask worker tcp://127.0.0.1:8786 --nanny --preload catalog.recycle "
        "--recycle-max-tasks 1000 --recycle-max-lifetime 6h "
        "--recycle-lifetime-stagger 30m",
    ),
)


def _count(server: Any, reason: str) -> None:
    fam = families_for(server)
    if fam is not None:
        fam.counter(
            "worker_recycled", "Workers recycled, by reason.", ["reason"]
        ).labels(reason).inc()


class Recycler(WorkerEntryPlugin):
    """Ask the scheduler to recycle this worker once it reaches one of its limits.

    A daemon thread checks every ``interval``: tasks computed against
    ``max_tasks``, age against ``max_lifetime`` (plus a random share of
    ``lifetime_stagger``), and unmanaged memory against ``max_unmanaged`` for
    ``max_unmanaged_for``. The first limit reached is logged once and sent to
    the scheduler half (:class:`SchedulerRecycler`), which decides and does the
    restart; a request the fleet limits defer is asked again every interval.

    Example:
        >>> import catalog
        >>> recycler = catalog.Recycler(max_tasks=1000, max_lifetime="6h")
        >>> recycler.settings.max_lifetime
        21600.0
        >>> # client.register_plugin(recycler); also catalog.SchedulerRecycler()
    """

    entry = ENTRY
    _thread: threading.Thread | None = None

    def on_setup(self, worker: Any) -> None:
        settings = self.settings
        self.worker = worker
        self.started = time.monotonic()
        stagger = settings.lifetime_stagger or 0.0
        self.lifetime = (
            None
            if settings.max_lifetime is None
            else settings.max_lifetime + random.uniform(0, stagger)
        )
        self.tasks_done = 0
        self.requested: str | None = None
        self.deferred = 0
        self._above_since: float | None = None
        self._unmanaged_limit = self._unmanaged_bytes(worker)
        self._said_missing = False
        self._quiet_until = 0.0
        self._requested_at = 0.0
        worker.handlers[RUNNING_OP] = self._running
        self._stop = threading.Event()
        if all(
            v is None
            for v in (settings.max_tasks, self.lifetime, self._unmanaged_limit)
        ):
            # No limit set: nothing will ever be recycled, so nothing to warn of.
            return
        if not getattr(worker, "nanny", None):
            logger.warning(
                "catalog.recycle: worker %s has no nanny, so a recycled worker does "
                "not come back: it retires (its results moved to other workers) and "
                "closes; only a deployment that starts workers again (Kubernetes, a "
                "job queue) replaces it. Start it with --nanny to have it restarted.",
                worker.address,
            )
        self._thread = threading.Thread(
            target=self._loop, name="catalog-recycle", daemon=True
        )
        self._thread.start()

    def on_teardown(self, worker: Any) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        handlers = getattr(worker, "handlers", {})
        if handlers.get(RUNNING_OP) == getattr(self, "_running", None):
            handlers.pop(RUNNING_OP, None)

    def _unmanaged_bytes(self, worker: Any) -> int | None:
        value = self.settings.max_unmanaged
        if not isinstance(value, float):
            return value
        limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        if not limit:
            logger.info(
                "max-unmanaged %s is a fraction and the worker has no memory limit: "
                "max-unmanaged is off",
                value,
            )
            return None
        return int(value * limit)

    # -- hot path ---------------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start in RUNNING_STATES and finish in ("memory", "error"):
            self.tasks_done += 1

    def _running(self, *args: Any, **kwargs: Any) -> int:
        """Tasks holding a thread here (the scheduler half asks while draining)."""
        return sum(
            1 for ts in self.worker.state.tasks.values() if ts.state in RUNNING_STATES
        )

    # -- the checker thread -------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval):
            try:
                due = self.check()
            except Exception as exc:
                self.report_error("checking the recycle limits", exc)
                continue
            self._forget_failed_request()
            if due is not None and time.monotonic() >= self._quiet_until:
                run_soon(self.worker, self._request, *due)

    def _forget_failed_request(self) -> None:
        """Ask again when an accepted recycle left this worker running (it failed)."""
        if (
            self.requested is not None
            and time.monotonic() - self._requested_at > FAILED_AFTER
            and getattr(self.worker.status, "name", "") == "running"
        ):
            self.requested = None

    def unmanaged(self) -> int:
        """Process memory minus the data this worker holds in memory, in bytes."""
        worker = self.worker
        rss = worker.monitor.get_process_memory()
        fast = getattr(worker.data, "fast", None)
        managed = getattr(fast, "total_weight", None)
        if managed is None:
            managed = worker.state.nbytes
        return max(int(rss) - int(managed), 0)

    def check(self) -> tuple[str, str] | None:
        """The limit reached, as (reason, detail), or None (the thread calls this)."""
        settings = self.settings
        if settings.max_tasks is not None and self.tasks_done >= settings.max_tasks:
            return "max-tasks", (
                f"{self.tasks_done} tasks computed (max-tasks {settings.max_tasks})"
            )
        age = time.monotonic() - self.started
        if self.lifetime is not None and age >= self.lifetime:
            return "max-lifetime", (
                f"running for {format_time(age)} (max-lifetime "
                f"{format_time(settings.max_lifetime)}, this worker's "
                f"{format_time(self.lifetime)} with its stagger)"
            )
        limit = self._unmanaged_limit
        if limit is not None:
            unmanaged = self.unmanaged()
            now = time.monotonic()
            if unmanaged <= limit:
                self._above_since = None
            elif self._above_since is None:
                self._above_since = now
            elif now - self._above_since >= settings.max_unmanaged_for:
                return "max-unmanaged", (
                    f"unmanaged memory {format_bytes(unmanaged)} above max-unmanaged "
                    f"{format_bytes(limit)} for {format_time(now - self._above_since)}"
                )
        return None

    async def _request(self, reason: str, detail: str) -> None:
        worker = self.worker
        if self.requested is not None or not self.active:
            return
        self.requested = reason
        self._requested_at = time.monotonic()
        try:
            answer = await asyncio.wait_for(
                worker.scheduler.catalog_recycle(
                    worker=worker.address, reason=reason, detail=detail
                ),
                REQUEST_TIMEOUT,
            )
        except asyncio.TimeoutError:
            answer = None
        except Exception as exc:
            self.requested = None
            self.report_error("asking the scheduler to recycle", exc)
            return
        status = answer.get("status") if isinstance(answer, dict) else None
        if status not in ("accepted", "deferred"):
            # A scheduler without the handler logs "No handler catalog_recycle"
            # and answers None (or, over some comms, nothing at all).
            self.requested = None
            self._quiet_until = time.monotonic() + RETRY_MISSING
            if not self._said_missing:
                self._said_missing = True
                logger.warning(
                    "catalog.recycle: worker %s reached %s (%s) but the scheduler did "
                    "not answer its request: does it run the catalog.recycle half? "
                    "Start it with --preload catalog.recycle (or register "
                    "catalog.SchedulerRecycler()); asking again every %s",
                    worker.address,
                    reason,
                    detail,
                    format_time(RETRY_MISSING),
                )
            return
        if status == "deferred":
            self.requested = None
            self.deferred += 1
            if self.deferred == 1:
                logger.info(
                    "catalog.recycle: worker %s reached %s (%s); deferred: %s",
                    worker.address,
                    reason,
                    detail,
                    answer.get("why"),
                )
            return
        logger.warning(
            "catalog.recycle: recycling worker %s: %s (%s)",
            worker.address,
            reason,
            detail,
        )

    def status(self) -> dict[str, Any]:
        """The base status plus tasks computed and the request made, if any."""
        out = super().status()
        out["tasks_done"] = getattr(self, "tasks_done", 0)
        out["requested"] = getattr(self, "requested", None)
        out["deferred"] = getattr(self, "deferred", 0)
        return out


class SchedulerRecycler(SchedulerEntryPlugin):
    """Recycle the workers that ask, within the fleet limits.

    A worker whose :class:`Recycler` reached a limit asks here. The request is
    deferred when it would take the last running worker, or more than
    ``max_retiring`` of the workers at once. Otherwise the worker is retired
    through ``Scheduler.retire_workers`` (its results are copied to other
    workers; it starts no new task), its running tasks are left to finish, the
    results they made are copied too, and the worker is removed from the
    scheduler as an expected departure (nothing recomputed, no task counted as
    suspicious) and killed through its nanny, which starts a fresh worker
    process. A worker without a nanny is closed instead.

    Example:
        >>> import catalog
        >>> catalog.SchedulerRecycler(max_retiring=0.1).settings.max_retiring
        0.1
    """

    entry = ENTRY

    def on_setup(self, scheduler: Any) -> None:
        self.retiring: dict[str, str] = {}
        self.recycled = 0
        self.deferred = 0
        self._tasks: set[asyncio.Task] = set()
        scheduler.handlers[REQUEST_OP] = self.request

    def on_teardown(self, scheduler: Any) -> None:
        handlers = getattr(scheduler, "handlers", {})
        if handlers.get(REQUEST_OP) == getattr(self, "request", None):
            handlers.pop(REQUEST_OP, None)
        for task in list(getattr(self, "_tasks", ())):
            task.cancel()

    def decide(self, address: str) -> str | None:
        """Why ``address`` may not retire now (None: it may)."""
        scheduler = self.server
        if address in self.retiring:
            return "already being recycled"
        running = [
            a
            for a, ws in scheduler.workers.items()
            if ws.status.name == "running" and a not in self.retiring
        ]
        if address not in running:
            return "the worker is not running (paused or closing)"
        if len(running) <= 1:
            return "it is the last running worker"
        allowed = max(1, int(self.settings.max_retiring * len(scheduler.workers)))
        if len(self.retiring) >= allowed:
            return (
                f"{len(self.retiring)} of {len(scheduler.workers)} workers are being "
                f"recycled already (max-retiring {self.settings.max_retiring})"
            )
        return None

    def request(
        self, worker: str = "", reason: str = "", detail: str = "", **kwargs: Any
    ) -> dict[str, Any]:
        """The scheduler handler a worker's :class:`Recycler` calls."""
        try:
            why = self.decide(worker)
        except Exception as exc:
            self.report_error("deciding a recycle", exc)
            why = "the scheduler half failed to decide (see dask catalog status)"
        if why is not None:
            self.deferred += 1
            return {"status": "deferred", "why": why}
        self.retiring[worker] = reason
        task = asyncio.ensure_future(self._recycle(worker, reason, detail))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"status": "accepted"}

    def _event(self, action: str, **fields: Any) -> None:
        self.server.log_event(EVENT_TOPIC, {"action": action, **fields})

    async def _recycle(self, address: str, reason: str, detail: str) -> None:
        scheduler = self.server
        stimulus_id = f"catalog-recycle-{reason}-{time.time()}"
        ws = scheduler.workers.get(address)
        nanny = ws.nanny if ws is not None else None
        name = str(ws.name) if ws is not None else None
        began = time.monotonic()
        logger.warning(
            "catalog.recycle: recycling worker %s (name %s): %s (%s); %s",
            address,
            name,
            reason,
            detail,
            "its nanny starts a fresh one"
            if nanny
            else "it has no nanny and closes for good",
        )
        common = {"worker": address, "name": name, "reason": reason, "detail": detail}
        self._event("retiring", **common, nanny=bool(nanny))
        try:
            await scheduler.retire_workers(
                workers=[address],
                close_workers=False,
                remove=False,
                stimulus_id=stimulus_id,
            )
            waited = await self._drain(address)
            # The tasks queued there (it starts none while closing gracefully) go
            # back to the scheduler, which tells the worker to drop them and gives
            # them to others: the kill below then finds nothing processing there,
            # so no task is counted as suspicious, however often workers recycle.
            ws = scheduler.workers.get(address)
            if ws is not None and ws.processing:
                scheduler.transitions(
                    {ts.key: "released" for ts in ws.processing}, stimulus_id
                )
            # Results made while draining are copied too.
            retired = await scheduler.retire_workers(
                workers=[address],
                close_workers=nanny is None,
                remove=nanny is None,
                stimulus_id=stimulus_id,
            )
            if address not in retired:
                raise RuntimeError("its results could not be moved to other workers")
            if nanny:
                # Not retire_workers(close_workers=True): the worker would close
                # its nanny too. Killed through the nanny, whose status is still
                # running, the worker process is started again.
                await scheduler.rpc(nanny).kill(reason=stimulus_id, timeout=30)
            self.recycled += 1
            _count(scheduler, reason)
            self._event(
                "recycled",
                **common,
                nanny=bool(nanny),
                drained=round(waited, 3),
                duration=round(time.monotonic() - began, 3),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.report_error(f"recycling worker {address}", exc)
            self._event("failed", **common, error=f"{type(exc).__name__}: {exc}")
            self._resume(address, stimulus_id)
        finally:
            self.retiring.pop(address, None)

    def _resume(self, address: str, stimulus_id: str) -> None:
        """Put a worker whose recycle failed back to work, as retire_workers does."""
        ws = self.server.workers.get(address)
        if ws is None or ws.status.name != "closing_gracefully":
            return
        try:
            self.server.handle_worker_status_change("running", ws, stimulus_id)
            self.server.stream_comms[address].send(
                {
                    "op": "worker-status-change",
                    "status": "running",
                    "stimulus_id": stimulus_id,
                }
            )
        except Exception as exc:
            self.report_error(f"resuming worker {address}", exc)

    async def _drain(self, address: str) -> float:
        """Wait until the worker runs no task (or drain-timeout); seconds waited."""
        began = time.monotonic()
        timeout = self.settings.drain_timeout
        while address in self.server.workers:
            try:
                running = await self.server.rpc(address).catalog_recycle_running()
            except Exception:
                return time.monotonic() - began  # gone, or no worker half
            waited = time.monotonic() - began
            if not running:
                return waited
            if timeout is not None and waited >= timeout:
                logger.warning(
                    "catalog.recycle: worker %s still runs %d tasks after "
                    "drain-timeout %s: restarting it anyway (they run again elsewhere)",
                    address,
                    running,
                    format_time(timeout),
                )
                return waited
            await asyncio.sleep(DRAIN_POLL)
        return time.monotonic() - began

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        # A worker that leaves by itself no longer counts against max-retiring;
        # its recycle coroutine then finds it gone.
        if worker in getattr(self, "retiring", {}):
            self.retiring.pop(worker, None)

    def status(self) -> dict[str, Any]:
        """The base status plus the workers recycled, retiring and deferred."""
        out = super().status()
        out["recycled"] = getattr(self, "recycled", 0)
        out["retiring"] = dict(getattr(self, "retiring", {}))
        out["deferred"] = getattr(self, "deferred", 0)
        return out


dask_setup, dask_teardown = entry_preload(
    ENTRY, worker=Recycler, scheduler=SchedulerRecycler
)
