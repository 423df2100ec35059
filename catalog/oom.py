"""Name the tasks that were running on a worker its nanny killed for memory."""

from __future__ import annotations

import logging
import pickle
import time
from collections import OrderedDict
from typing import Any

from dask.sizeof import sizeof
from dask.utils import format_bytes
from distributed.scheduler import KilledWorker

from catalog.entry import (
    Entry,
    Integer,
    Option,
    SchedulerEntryPlugin,
    bounded,
    entry_preload,
    families_for,
    prefix_of,
    run_soon,
)

__all__ = [
    "ENTRY",
    "EVENT_TOPIC",
    "OOMKilledWorker",
    "OOMReporter",
    "dask_setup",
    "dask_teardown",
]

logger = logging.getLogger("catalog.oom")

#: The scheduler event topic of every kill this entry records.
EVENT_TOPIC = "catalog.oom"
#: The topic distributed's nanny reports a memory kill on ({worker, pid, rss}).
NANNY_TOPIC = "worker-restart-memory"
#: Distinct prefixes whose kills are counted; later ones share ``"other"``.
MAX_PREFIXES = 1000
#: Recent worker removals remembered, for a nanny report that arrives late.
RECENT_REMOVALS = 100

ENTRY = Entry(
    name="oom",
    summary="name the tasks that were running on a worker killed for memory",
    runs_on={
        "scheduler": "records the tasks running on each worker the nanny kills for "
        "memory; names them in KilledWorker",
        "worker": "nothing (the scheduler knows what ran where)",
        "nanny": "nothing (the nanny's report reaches the scheduler)",
        "client": "registers the OOM reporter on the scheduler",
    },
    options=[
        Option(
            "retries",
            Integer(0, nullable=True),
            None,
            "Fail a task once workers killed for memory while running its prefix "
            "exceed this count, instead of after distributed.scheduler."
            "allowed-failures deaths (none: distributed's behaviour).",
        ),
    ],
    examples=(
        "dask scheduler --preload catalog.oom",
        "dask scheduler --preload catalog --enable oom,events --oom-retries 1",
    ),
)


class OOMKilledWorker(KilledWorker):
    """A ``KilledWorker`` that says the worker was killed for memory, and by whom.

    Raised on the client by ``future.result()`` like distributed's own
    ``KilledWorker`` (``except KilledWorker`` catches it); its message names the
    task, the tasks that were running on the worker, the worker's memory when
    its nanny killed it, and why the task is not retried.
    """

    def __init__(
        self,
        task: Any,
        last_worker: Any,
        allowed_failures: int,
        suspects: list[dict[str, Any]] | None = None,
        rss: int | None = None,
        memory_limit: int | None = None,
        why: str = "",
    ) -> None:
        Exception.__init__(
            self, task, last_worker, allowed_failures, suspects, rss, memory_limit, why
        )

    @property
    def suspects(self) -> list[dict[str, Any]]:
        """``[{"key", "prefix", "executing", "attempt"}, ...]`` on the killed worker."""
        return self.args[3] or []

    @property
    def rss(self) -> int | None:
        """The worker's process memory (bytes) when its nanny killed it."""
        return self.args[4]

    @property
    def memory_limit(self) -> int | None:
        """The worker's memory limit (bytes)."""
        return self.args[5]

    def __str__(self) -> str:
        address = getattr(self.last_worker, "address", self.last_worker)
        rss = format_bytes(self.rss) if self.rss is not None else "unknown memory"
        limit = (
            f" of a {format_bytes(self.memory_limit)} limit"
            if self.memory_limit
            else ""
        )
        running = ", ".join(
            f"{s['key']} ({s['prefix']}{', executing' if s.get('executing') else ''})"
            for s in self.suspects
        )
        return (
            f"Task {self.task!r} was running on worker {address} when its nanny "
            f"killed it for memory ({rss}{limit}); running there: "
            f"{running or 'nothing the scheduler knew of'}. {self.args[6]} "
            "See catalog.oom events (topic catalog.oom) for every kill."
        )


class OOMReporter(SchedulerEntryPlugin):
    """Record, on the scheduler, what ran on each worker killed for memory.

    When a nanny kills its worker for memory it reports ``worker-restart-memory``
    ``{worker, pid, rss}`` to the scheduler, a few tens of milliseconds before
    the scheduler notices the worker is gone. The reporter then takes the tasks
    processing on that worker (those the last heartbeat saw executing marked),
    logs a WARNING, publishes a ``catalog.oom`` scheduler event, counts the kill
    per prefix, and fails now, with :class:`OOMKilledWorker`, each task that
    this death would fail anyway (``allowed-failures``) or whose prefix has
    killed more than ``retries`` workers. The other tasks are retried by
    distributed as usual.

    Args:
        retries: workers killed for memory while a prefix runs before its
            tasks are failed early; None keeps distributed's rule.

    Example:
        >>> import catalog
        >>> reporter = catalog.OOMReporter(retries=1)
        >>> reporter.settings.retries
        1
        >>> # client.register_plugin(reporter) starts it on the scheduler
    """

    entry = ENTRY

    def on_setup(self, scheduler: Any) -> None:
        self.kills = 0
        self.failed_early = 0
        self.late_reports = 0
        self._prefix_kills: dict[str, int] = {}
        self._removals: OrderedDict[str, list[str]] = OrderedDict()

    # -- hooks ------------------------------------------------------------------
    def log_event(self, topic: str, msg: Any) -> None:
        if not self.active or not isinstance(msg, dict):
            return
        if topic == NANNY_TOPIC:
            # Acted on at the next loop turn, outside whatever published it.
            run_soon(self.server, self._on_kill, dict(msg))
        elif msg.get("action") == "remove-worker" and "://" in str(topic):
            keys = [str(k) for k in msg.get("processing-tasks") or ()]
            self._removals[str(topic)] = keys
            while len(self._removals) > RECENT_REMOVALS:
                self._removals.popitem(last=False)

    # -- a kill -------------------------------------------------------------------
    def _on_kill(self, msg: dict[str, Any]) -> None:
        try:
            self._kill(msg)
        except Exception as exc:
            self.report_error("recording a memory kill", exc)

    def _kill(self, msg: dict[str, Any]) -> None:
        scheduler = self.server
        address = str(msg.get("worker"))
        rss = msg.get("rss")
        ws = scheduler.workers.get(address)
        self.kills += 1
        if ws is None:
            # The scheduler removed the worker before the nanny's report came:
            # distributed has already rescheduled (or failed) its tasks.
            self.late_reports += 1
            late = True
            suspects: list[dict[str, Any]] = [
                {"key": k, "prefix": prefix_of(k), "executing": None, "attempt": None}
                for k in self._removals.get(address, ())
            ]
            tasks: list[Any] = []
            name, limit = None, None
        else:
            late = False
            executing = ws.executing
            tasks = sorted(ws.processing, key=lambda ts: ts not in executing)
            suspects = [
                {
                    "key": str(ts.key),
                    "prefix": ts.prefix.name,
                    "executing": ts in executing,
                    "attempt": ts.suspicious + 1,
                }
                for ts in tasks
            ]
            name, limit = ws.name, ws.memory_limit
        # Blame what the last heartbeat saw executing; without it, all processing.
        blamed = [s for s in suspects if s["executing"]] or suspects
        prefixes = sorted({s["prefix"] for s in blamed})
        for prefix in prefixes:
            if bounded(self._prefix_kills, prefix, MAX_PREFIXES):
                self._prefix_kills[prefix] = self._prefix_kills.get(prefix, 0) + 1
        failed = [] if late else self._fail_due(ws, tasks, blamed, rss)
        logger.warning(
            "Worker %s (pid %s) was killed by its nanny for memory (%s%s) while "
            "running: %s%s",
            address,
            msg.get("pid"),
            format_bytes(rss) if isinstance(rss, int) else "unknown memory",
            f" of a {format_bytes(limit)} limit" if limit else "",
            ", ".join(
                f"{s['key']} (prefix {s['prefix']}"
                + (", executing" if s["executing"] else "")
                + (f", attempt {s['attempt']}" if s["attempt"] else "")
                + ")"
                for s in suspects
            )
            or "no task the scheduler knew of",
            f"; failed now: {', '.join(failed)}" if failed else "",
        )
        scheduler.log_event(
            EVENT_TOPIC,
            {
                "action": "kill",
                "worker": address,
                "name": str(name) if name is not None else None,
                "pid": msg.get("pid"),
                "rss": rss,
                "memory_limit": limit,
                "suspects": suspects,
                "prefixes": prefixes,
                "failed": failed,
                "late": late,
            },
        )
        fam = families_for(scheduler)
        if fam is not None:
            counter = fam.counter(
                "oom_kills",
                "Workers killed by their nanny for memory, by the prefixes running.",
                ["prefix"],
            )
            for prefix in prefixes or ["none"]:
                counter.labels(fam.prefix(prefix)).inc()

    def _fail_due(
        self, ws: Any, tasks: list[Any], blamed: list[dict[str, Any]], rss: Any
    ) -> list[str]:
        """Fail the blamed tasks this death would fail, or whose prefix kills too much.

        The scheduler would fail them with a bare ``KilledWorker`` a moment later,
        when it notices the worker is gone; failing them first, through the same
        ``processing -> erred`` transition, puts the memory and the suspects in
        the exception the client sees.
        """
        scheduler = self.server
        allowed = scheduler.allowed_failures
        retries = self.settings.retries
        blamed_keys = {s["key"] for s in blamed}
        suspects = [{k: v for k, v in s.items()} for s in blamed]
        failed = []
        stimulus_id = f"catalog-oom-{time.time()}"
        for ts in tasks:
            if str(ts.key) not in blamed_keys:
                continue
            if ts.state != "processing" or ts.processing_on is not ws:
                continue
            kills = self._prefix_kills.get(ts.prefix.name, 0)
            if ts.suspicious + 1 > allowed:
                why = (
                    f"{ts.suspicious + 1} workers died while running it "
                    f"(distributed.scheduler.allowed-failures is {allowed})."
                )
            elif retries is not None and kills > retries:
                why = (
                    f"Failed early: workers killed for memory while running prefix "
                    f"{ts.prefix.name!r}: {kills} (catalog.oom retries is "
                    f"{retries})."
                )
            else:
                continue
            ts.suspicious += 1
            ts.prefix.suspicious += 1
            exc = OOMKilledWorker(
                ts.key, ws.clean(), allowed, suspects, rss, ws.memory_limit, why
            )
            recs = scheduler.transition(
                ts.key,
                "erred",
                stimulus_id=stimulus_id,
                exception=pickle.dumps(exc),
                exception_text=str(exc),
                cause=ts.key,
                worker=ws.address,
            )
            scheduler.transitions(recs, stimulus_id=stimulus_id)
            failed.append(str(ts.key))
            if retries is not None and kills > retries:
                self.failed_early += 1
        return failed

    def memory(self) -> int:
        """Bytes of the per-prefix kill counts and the recent removals."""
        held = (getattr(self, "_prefix_kills", {}), getattr(self, "_removals", {}))
        return sum(sizeof(dict(part)) for part in held)

    def status(self) -> dict[str, Any]:
        """The base status plus the kills recorded and the tasks failed early."""
        out = super().status()
        for name in ("kills", "failed_early", "late_reports"):
            out[name] = getattr(self, name, 0)
        out["prefix_kills"] = dict(getattr(self, "_prefix_kills", {}))
        return out


dask_setup, dask_teardown = entry_preload(ENTRY, scheduler=OOMReporter)
