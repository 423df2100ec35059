"""Replay a real cluster's transition stream against each plugin's ``transition``.

Run by hand (never as a timed test; the machine is shared and noisy)::

    python benchmarks/hook_replay.py --tasks 4000 --leaves 2000 --repeats 7
    python benchmarks/hook_replay.py --plugins memory,watchdog,recycle,oom,otel

CI runs ``--short`` only to show that it still runs; nothing is asserted.

An in-process cluster (a real scheduler and real workers on one event loop)
runs a map of tiny tasks and a reduction tree once, with a recording plugin on
the scheduler and on every worker that keeps each ``transition`` call's
arguments, exactly as distributed passed them (the scheduler's keyword
arguments, the worker's ``key, start, finish``). Then the recorded calls are
replayed, one whole batch at a time under ``perf_counter``, against fresh
instances of each named entry's scheduler and worker plugins (set up on the
same scheduler and worker), against distributed's own ``WorkStealing`` bound to
the same scheduler, and against a no-op. The plugins run interleaved, and the
median batch of ``--repeats`` is taken; the no-op's batch (the loop and the
call) is subtracted. Timing a whole batch, not each call, keeps the timer's own
cost (~60 ns, more than a cheap hook) out of the figures.

During the replay the recorded TaskStates are put back into the scheduler's and
workers' task dicts (the tree's inner tasks were forgotten when the graph
finished), so that each hook finds what it would have found live; for
``WorkStealing`` each task's ``processing_on`` is set back to its worker while
it replays (it was cleared when the task finished). Both are undone after.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import inspect
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

#: The scheduler entries of the catalog, replayed by default.
DEFAULT_PLUGINS = ("metrics", "tracer", "events")

#: Calls recorded on one side: (key, start, finish, args, kwargs).
Call = tuple[Any, str, str, tuple, dict]


class SchedulerRecorder(SchedulerPlugin):
    """Keeps every scheduler ``transition`` call and each task's TaskState."""

    name = "bench.record"

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.calls: list[Call] = []
        self.tasks: dict[Any, Any] = {}
        self.worker_of: dict[Any, Any] = {}

    def transition(self, key: Any, start: str, finish: str, *args, **kwargs) -> None:
        self.calls.append((key, start, finish, args, dict(kwargs)))
        ts = self.scheduler.tasks.get(key)
        if ts is not None:
            self.tasks.setdefault(key, ts)
            if ts.processing_on is not None:
                self.worker_of[key] = ts.processing_on


class WorkerRecorder(WorkerPlugin):
    """Keeps every worker ``transition`` call and each task's TaskState."""

    name = "bench.record"

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.tasks: dict[Any, Any] = {}

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        self.calls.append((key, start, finish, (), dict(kwargs)))
        ts = self.worker.state.tasks.get(key)
        if ts is not None:
            self.tasks.setdefault(key, ts)


def inc(x: int) -> int:
    return x + 1


def add(*xs: int) -> int:
    return sum(xs)


def tree(leaves: int) -> tuple[Any, int]:
    """A 4-ary reduction tree over ``leaves`` tiny tasks: (its root, its tasks)."""
    import dask

    layer = [dask.delayed(inc)(i, dask_key_name=f"leaf-{i}") for i in range(leaves)]
    count = leaves
    level = 0
    while len(layer) > 1:
        level += 1
        layer = [
            dask.delayed(add)(*layer[i : i + 4], dask_key_name=f"node{level}-{i}")
            for i in range(0, len(layer), 4)
        ]
        count += len(layer)
    return layer[0], count


async def _call(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def _noop(key: Any = None, start: str = "", finish: str = "", *a: Any, **k: Any):
    return None


def _batch(hook: Callable[..., Any], calls: list[Call]) -> tuple[float, float]:
    """Seconds to make every recorded call, one after the other: (wall, CPU).

    The CPU time of this thread leaves out the time the OS gave the core to
    another process (the machine is shared): on a loaded machine it is the
    steadier of the two.
    """
    gc.collect()
    c0 = time.thread_time()
    t0 = time.perf_counter()
    for key, start, finish, args, kwargs in calls:
        hook(key, start, finish, *args, **kwargs)
    return time.perf_counter() - t0, time.thread_time() - c0


def _add(pair: tuple[float, float], other: tuple[float, float]) -> tuple[float, float]:
    return pair[0] + other[0], pair[1] + other[1]


def _median(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return (
        statistics.median(s[0] for s in samples),
        statistics.median(s[1] for s in samples),
    )


def _kwargs(name: str, tmp: str) -> dict[str, Any]:
    """Options an entry needs to run here (files go to a temporary directory)."""
    if name == "events":
        return {"file": f"{tmp}/events-{time.monotonic_ns()}.jsonl"}
    if name == "logging":
        return {"file": f"{tmp}/logs-{time.monotonic_ns()}.jsonl"}
    return {}


def plugin_classes(names: list[str]) -> dict[str, dict[str, type]]:
    """{entry name: {"scheduler": class, "worker": class}} of each named entry."""
    out = {}
    for name in names:
        module = importlib.import_module(f"catalog.{name}")
        plugins = module.dask_setup.plugins
        out[name] = {
            role: plugins[role] for role in ("scheduler", "worker") if role in plugins
        }
    return out


class _Stealing:
    """distributed's WorkStealing on the same scheduler, not installed in it."""

    def __init__(self, scheduler: Any, recorder: SchedulerRecorder) -> None:
        from distributed.stealing import WorkStealing

        self.scheduler = scheduler
        self.recorder = recorder
        plugins = dict(scheduler.plugins)
        handler = scheduler.stream_handlers.get("steal-response")
        # Its constructor installs it in the scheduler: put the real one back.
        self.plugin = WorkStealing(scheduler)
        scheduler.plugins.clear()
        scheduler.plugins.update(plugins)
        if handler is not None:
            scheduler.stream_handlers["steal-response"] = handler

    def __enter__(self) -> Callable[..., Any]:
        for key, ws in self.recorder.worker_of.items():
            self.recorder.tasks[key].processing_on = ws
        return self.plugin.transition

    def __exit__(self, *exc: Any) -> None:
        for key in self.recorder.worker_of:
            self.recorder.tasks[key].processing_on = None


async def record(args: argparse.Namespace) -> dict[str, Any]:
    """Run the graphs once on a real cluster; replay on it while it is up."""
    from distributed import Client, LocalCluster

    async with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=False,
            asynchronous=True,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
    ):
        scheduler = cluster.scheduler
        recorder = SchedulerRecorder(scheduler)
        scheduler.add_plugin(recorder)
        workers = list(cluster.workers.values())
        worker_recorders = []
        for worker in workers:
            wr = WorkerRecorder()
            await worker.plugin_add(wr, name=wr.name)
            worker_recorders.append(worker.plugins[wr.name])

        futures = client.map(inc, range(args.tasks), pure=False)
        await client.gather(futures)
        del futures
        root, count = tree(args.leaves)
        await client.compute(root)
        tasks = args.tasks + count
        # Let the releases of the map's and the tree's keys arrive as well.
        while scheduler.tasks:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        scheduler.remove_plugin(name=recorder.name)
        for worker in workers:
            await worker.plugin_remove(WorkerRecorder.name)
        with tempfile.TemporaryDirectory() as tmp:
            return await replay(
                args, scheduler, recorder, workers, worker_recorders, tasks, tmp
            )


async def replay(
    args: argparse.Namespace,
    scheduler: Any,
    recorder: SchedulerRecorder,
    workers: list[Any],
    worker_recorders: list[WorkerRecorder],
    tasks: int,
    tmp: str,
) -> dict[str, Any]:
    classes = plugin_classes(args.plugins)
    Times = dict[str, list[tuple[float, float]]]
    sched_times: Times = {"no-op": [], "WorkStealing": []}
    worker_times: Times = {"no-op": []}
    worker_calls = sum(len(w.calls) for w in worker_recorders)
    stealing = _Stealing(scheduler, recorder)

    for _ in range(args.repeats):
        # Scheduler side: the recorded tasks are back in scheduler.tasks.
        scheduler.tasks.update(recorder.tasks)
        try:
            sched_times["no-op"].append(_batch(_noop, recorder.calls))
            with stealing as hook:
                sched_times["WorkStealing"].append(_batch(hook, recorder.calls))
            for name, roles in classes.items():
                cls = roles.get("scheduler")
                if cls is None:
                    continue
                plugin = cls(**_kwargs(name, tmp))
                await _call(plugin.start(scheduler))
                try:
                    took = _batch(plugin.transition, recorder.calls)
                finally:
                    await _call(plugin.close())
                sched_times.setdefault(f"catalog.{name}", []).append(took)
        finally:
            for key in recorder.tasks:
                scheduler.tasks.pop(key, None)
        # Worker side: each worker's own calls, on that worker.
        noop = (0.0, 0.0)
        for w in worker_recorders:
            noop = _add(noop, _batch(_noop, w.calls))
        worker_times["no-op"].append(noop)
        for name, roles in classes.items():
            cls = roles.get("worker")
            if cls is None:
                continue
            took = (0.0, 0.0)
            for worker, wr in zip(workers, worker_recorders, strict=True):
                worker.state.tasks.update(wr.tasks)
                plugin = cls(**_kwargs(name, tmp))
                await _call(plugin.setup(worker=worker))
                try:
                    took = _add(took, _batch(plugin.transition, wr.calls))
                finally:
                    await _call(plugin.teardown(worker=worker))
                    for key in wr.tasks:
                        worker.state.tasks.pop(key, None)
            worker_times.setdefault(f"catalog.{name}", []).append(took)
    return {
        "tasks": tasks,
        "scheduler_calls": len(recorder.calls),
        "worker_calls": worker_calls,
        "repeats": args.repeats,
        "scheduler": {n: _median(v) for n, v in sched_times.items()},
        "worker": {n: _median(v) for n, v in worker_times.items()},
    }


def report(result: dict[str, Any]) -> None:
    tasks = result["tasks"]
    print(f"median of {result['repeats']} interleaved batches; no-op subtracted")
    for side, calls in (
        ("scheduler", result["scheduler_calls"]),
        ("worker", result["worker_calls"]),
    ):
        times = result[side]
        base_wall, base_cpu = times["no-op"]
        print(f"\n{side}: {calls} recorded calls, {tasks} tasks; the no-op costs")
        print(
            f"{base_wall / calls * 1e9:.0f} ns per call (wall), "
            f"{base_cpu / calls * 1e9:.0f} ns (CPU), subtracted below"
        )
        print()
        print("| plugin | ns per call (wall) | ns per call (CPU) | us per task (CPU) |")
        print("|---|---|---|---|")
        total = 0.0
        for name, (wall, cpu) in times.items():
            if name == "no-op":
                continue
            net_wall, net_cpu = wall - base_wall, cpu - base_cpu
            if name.startswith("catalog."):
                total += net_cpu
            print(
                f"| {name} | {net_wall / calls * 1e9:,.0f} "
                f"| {net_cpu / calls * 1e9:,.0f} | {net_cpu / tasks * 1e6:.2f} |"
            )
        if side == "scheduler" and "WorkStealing" in times:
            steal = times["WorkStealing"][1] - base_cpu
            ratio = total / steal if steal > 0 else float("inf")
            print(
                f"\ncatalog scheduler total vs WorkStealing (CPU): "
                f"{total / tasks * 1e6:.2f} vs {steal / tasks * 1e6:.2f} us per task "
                f"({ratio:.2f}x)"
            )
        elif side == "worker":
            print(
                f"\ncatalog worker total (CPU): {total / tasks * 1e6:.2f} us per task"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--leaves", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--plugins",
        default=",".join(DEFAULT_PLUGINS),
        help="comma-separated entry names whose scheduler and worker plugins "
        f"are replayed (default: {','.join(DEFAULT_PLUGINS)})",
    )
    parser.add_argument(
        "--short", action="store_true", help="a quick run for CI (tiny graphs)"
    )
    args = parser.parse_args()
    args.plugins = [name.strip() for name in args.plugins.split(",") if name.strip()]
    if args.short:
        args.tasks, args.leaves, args.repeats = 200, 64, 1
    import catalog  # noqa: F401  (registers the entries' config defaults)

    result = asyncio.run(record(args))
    report(result)


if __name__ == "__main__":
    main()
