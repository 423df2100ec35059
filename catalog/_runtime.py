"""Shared run-time pieces: task prefixes, capped state, worker events, clients.

The rest of the run-time machinery lives in modules by concern and is
re-exported here so that ``catalog._runtime`` keeps its names:
:mod:`catalog._interrupt` (failing a running task from another thread) and
:mod:`catalog._files` (owner-only output files, JSON lines).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dask.utils import key_split

from catalog._files import (
    FOLLOW_SYMLINKS_KEY,
    MAX_BACKUPS,
    MAX_BUFFERED_LINES,
    JsonLinesFile,
    _follow_symlinks,
    _symlink_error,
    expand_path,
    json_line,
    open_private,
    private_dir,
    safe_filename,
)
from catalog._interrupt import (
    _RUN_TASK_CODE,
    _SET_ASYNC_EXC,
    _TASK_CALL_LINE,
    _UNSAFE_ROOTS,
    RETRY_INTERVAL,
    Firing,
    TaskInterrupt,
    _make_public,
    _position,
    _reported,
    _task_call_line,
    _unsafe_file,
    _unsafe_roots,
    arm,
    at_safe_point,
    cancel_undelivered,
    interrupt_options,
    interrupt_task,
    pending,
)

# Re-exported for code written against catalog._runtime before the split; new
# code imports catalog.entry (entries) or the concern's module (machinery).
from catalog._prom import families_for

__all__ = [
    "FOLLOW_SYMLINKS_KEY",
    "MAX_BACKUPS",
    "MAX_BUFFERED_LINES",
    "RETRY_INTERVAL",
    "RUNNING_STATES",
    "UNKNOWN_PREFIX",
    "Firing",
    "JsonLinesFile",
    "TaskInterrupt",
    "arm",
    "at_safe_point",
    "bounded",
    "cancel_undelivered",
    "client_call",
    "client_then",
    "count",
    "expand_path",
    "interrupt_options",
    "interrupt_task",
    "json_line",
    "log_worker_event",
    "open_private",
    "pending",
    "prefix_of",
    "private_dir",
    "run_soon",
    "safe_filename",
    "server_running",
]

#: Private names that tests of the interrupt and file machinery still reach
#: through this module; kept for this round only.
_PRIVATE_REEXPORTS = (
    _RUN_TASK_CODE,
    _SET_ASYNC_EXC,
    _TASK_CALL_LINE,
    _UNSAFE_ROOTS,
    _follow_symlinks,
    _make_public,
    _position,
    _reported,
    _symlink_error,
    _task_call_line,
    _unsafe_file,
    _unsafe_roots,
)

logger = logging.getLogger("catalog")

# ---------------------------------------------------------------------------
# Task prefixes
# ---------------------------------------------------------------------------

#: What dask's key_split itself answers for a key it cannot split.
UNKNOWN_PREFIX = "Other"


def prefix_of(key: Any) -> str:
    """The task prefix of ``key`` (``dask.utils.key_split``), for any key at all.

    key_split raises on keys dask accepts (bytes that are not UTF-8), and a
    hook or a flush thread must not: such a key gets dask's own ``"Other"``.
    Cached, because hooks ask for the same few prefixes again and again.
    """
    try:
        return _cached_prefix(key)
    except Exception:  # unhashable or unsplittable: not cached, rare
        return UNKNOWN_PREFIX


@functools.lru_cache(maxsize=65536)
def _cached_prefix(key: Any) -> str:
    return key_split(key)


def bounded(mapping: Any, key: Any, cap: int) -> bool:
    """Whether ``key`` has, or may take, a place in ``mapping`` of at most ``cap``.

    State keyed by what tasks bring (prefixes, annotation values) is capped like
    the metrics' prefix labels, so a stream of distinct values cannot grow it.
    """
    return key in mapping or len(mapping) < cap


def server_running(server: Any) -> Callable[[], bool]:
    """Whether ``server`` has been neither stopped nor closed, for ``while_running``.

    ``Server.stop()`` without ``close()`` (as some of distributed's own tests
    do) runs no plugin teardown: a flush thread would outlive its server and
    fail distributed's thread-leak check. ``stop()`` leaves only its private
    flag behind, so that is read, with the status as the public fallback.
    """

    def running() -> bool:
        if getattr(server, "_Server__stopped", False):
            return False
        status = getattr(getattr(server, "status", None), "name", "running")
        return status not in ("closing", "closed", "failed")

    return running


# ---------------------------------------------------------------------------
# Worker events
# ---------------------------------------------------------------------------


def run_soon(server: Any, func: Callable[..., Any], *args: Any) -> None:
    """Call ``func(*args)`` on the server's event loop, from any thread."""
    loop = getattr(server, "loop", None)
    if loop is None:
        return
    with contextlib.suppress(RuntimeError):  # loop closed during shutdown
        loop.add_callback(func, *args)


def log_worker_event(worker: Any, topic: str, msg: dict[str, Any]) -> None:
    """``worker.log_event`` from any thread (it must run on the event loop)."""
    run_soon(worker, worker.log_event, topic, msg)


# ---------------------------------------------------------------------------
# Counting beside the metrics entry
# ---------------------------------------------------------------------------

#: Worker task states in which the task's code is (or may still be) running.
RUNNING_STATES = frozenset({"executing", "long-running", "cancelled", "resumed"})


def count(server: Any, name: str, doc: str, amount: float = 1, **labels: str) -> None:
    """Add ``amount`` to counter ``name`` of ``server`` if metrics is active there.

    ``labels`` name the counter's own labels in order (the server's are added);
    a non-empty ``prefix`` label goes through the cap on distinct prefixes
    (``Families.prefix``), so a stream of task prefixes cannot grow it.
    """
    fam = families_for(server)
    if fam is None:
        return
    if labels.get("prefix"):
        labels["prefix"] = fam.prefix(labels["prefix"])
    counter = fam.counter(name, doc, list(labels))
    (counter.labels(*labels.values()) if labels else counter).inc(amount)


# ---------------------------------------------------------------------------
# Clients, synchronous or asynchronous
# ---------------------------------------------------------------------------

T = TypeVar("T")


def client_call(
    client: Any, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
) -> T | Awaitable[T]:
    """Run the coroutine function ``func(*args, **kwargs)`` for ``client``.

    The way distributed's own client methods behave: with a synchronous client
    the coroutine runs on the client's event loop and its result is returned;
    with ``Client(asynchronous=True)`` (or from a coroutine on the client's
    loop) an awaitable is returned instead. Inside ``func``, await the client's
    methods (``await client.run(...)``): they are asynchronous there either way.

    Args:
        client: a ``distributed.Client``, synchronous or asynchronous.
        func: an ``async def`` function.
        *args: positional arguments for ``func``.
        **kwargs: keyword arguments for ``func``.

    Returns:
        ``func``'s result, or an awaitable of it for an asynchronous client.
    """
    return client.sync(func, *args, **kwargs)


def client_then(value: T | Awaitable[T], func: Callable[[T], Any]) -> Any:
    """``func(value)``, or an awaitable of it when ``value`` is one.

    For the synchronous work that follows a :func:`client_call` (writing a
    file, shaping a result): done at once for a synchronous client, after the
    await for an asynchronous one.
    """
    if inspect.isawaitable(value):
        awaitable = value

        async def finish() -> Any:
            return func(await awaitable)

        return finish()
    return func(value)  # type: ignore[arg-type]
