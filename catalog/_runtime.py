"""Shared run-time pieces: task prefixes, failing a task from a thread, JSON lines."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from dask.utils import key_split
from distributed import worker as _worker_module

__all__ = [
    "UNKNOWN_PREFIX",
    "JsonLinesFile",
    "TaskInterrupt",
    "cancel_undelivered",
    "interrupt_task",
    "json_line",
    "log_worker_event",
    "prefix_of",
    "run_soon",
]

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


# ---------------------------------------------------------------------------
# Failing a running task from another thread
# ---------------------------------------------------------------------------

#: Messages for exceptions fired with PyThreadState_SetAsyncExc, by thread id.
#: CPython raises an async exception by calling its class with no arguments, so
#: the message waits here and the instance picks it up in the target thread.
_PENDING: dict[int, str] = {}


class TaskInterrupt(Exception):
    """Base of the exceptions the catalog raises inside a running task.

    Built with no arguments inside the target thread, it takes the message the
    firing thread left for it; built with a message (unpickling), it keeps it.
    """

    def __init__(self, *args: Any) -> None:
        if not args:
            message = _PENDING.pop(threading.get_ident(), None)
            args = (message,) if message else ()
        super().__init__(*args)


def _task_call_line() -> int | None:
    """The line of ``_run_task_simple`` that calls the user's task."""
    try:
        lines, first = inspect.getsourcelines(_worker_module._run_task_simple)
    except (OSError, TypeError):
        return None
    for offset, line in enumerate(lines):
        if "task(data)" in line:
            return first + offset
    return None


_RUN_TASK_CODE = _worker_module._run_task_simple.__code__
_TASK_CALL_LINE = _task_call_line()


def _inside_user_code(thread_id: int) -> bool:
    """Whether the thread is inside the task's own call, not distributed's bookkeeping.

    An exception landing in the bookkeeping around the call (after the task
    returned) would kill the executor thread for good.
    """
    frame = sys._current_frames().get(thread_id)
    innermost = frame
    while frame is not None:
        if frame.f_code is _RUN_TASK_CODE:
            if frame is innermost:
                return False
            return _TASK_CALL_LINE is None or frame.f_lineno == _TASK_CALL_LINE
        frame = frame.f_back
    return False


def _set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> int:
    target = ctypes.py_object(exc_type) if exc_type is not None else None
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


def interrupt_task(
    worker: Any, thread_id: int, key: Any, exc_type: type[TaskInterrupt], message: str
) -> bool:
    """Raise ``exc_type(message)`` in the thread running ``key``, if it still runs it.

    The check and the firing happen under ``worker.active_threads_lock``, which the
    executor thread takes to leave a task, and only while the thread is inside the
    task's own call. A thread blocked in C code receives it when the call returns.

    Returns:
        True when the exception was fired.
    """
    with worker.active_threads_lock:
        if worker.active_threads.get(thread_id) != key:
            return False
        if thread_id in _PENDING or not _inside_user_code(thread_id):
            return False
        _PENDING[thread_id] = message
        fired = _set_async_exc(thread_id, exc_type)
        if fired == 1 and thread_id in _PENDING and not _inside_user_code(thread_id):
            # The GIL passed to the thread between the check and the firing and
            # it left the task's call: withdraw before it lands in distributed's
            # bookkeeping (seen ~1 in 300 fires with a 1 us switch interval).
            _set_async_exc(thread_id, None)
            fired = 0
        if fired != 1:
            if fired > 1:  # cannot happen for one id, but undo it if it does
                _set_async_exc(thread_id, None)
            _PENDING.pop(thread_id, None)
            return False
    return True


def cancel_undelivered(worker: Any, thread_id: int) -> bool:
    """Withdraw an exception fired at ``thread_id`` that has not been raised yet.

    Called when the task left ``executing`` by itself (it finished inside C code
    before the exception could land), so the exception never hits the next task.
    """
    with worker.active_threads_lock:
        if thread_id not in _PENDING:
            return False
        _set_async_exc(thread_id, None)
        _PENDING.pop(thread_id, None)
        return True


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
# JSON-lines files that survive stops
# ---------------------------------------------------------------------------


def json_line(obj: Any) -> str:
    """One JSON object on one line, whatever newlines or quotes its strings hold."""
    return (
        json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False) + "\n"
    )


class JsonLinesFile:
    """An append-only file of JSON lines, written in whole lines.

    Lines are buffered in memory and written by ``flush`` with ``os.write`` on an
    ``O_APPEND`` descriptor, so after a SIGKILL the file is valid up to its last
    complete line. ``flush_interval`` starts a thread that flushes periodically;
    ``None`` writes every line through at once. Size rotation keeps ``backups``
    older files as ``PATH.1`` ... ``PATH.N``.

    Args:
        path: the file.
        mode: permission bits for a new file (0o600: keys may be sensitive).
        rotate_bytes: rotate when the file would grow past this size (0: never).
        backups: how many rotated files to keep.
        flush_interval: seconds between background flushes, or None.
        on_error: called with (what, exception) when a write fails at run time.
    """

    def __init__(
        self,
        path: str,
        *,
        mode: int = 0o600,
        rotate_bytes: int = 0,
        backups: int = 0,
        flush_interval: float | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.mode = mode
        self.rotate_bytes = rotate_bytes
        self.backups = backups
        self.flush_interval = flush_interval
        self.on_error = on_error
        self.dropped = 0
        self.written = 0
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> JsonLinesFile:
        """Open (create) the file; raise OSError when it cannot be written."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
        self._size = os.fstat(self._fd).st_size
        if self.flush_interval is not None:
            self._thread = threading.Thread(
                target=self._flush_loop,
                name=f"catalog-flush-{os.path.basename(self.path)}",
                daemon=True,
            )
            self._thread.start()
        return self

    def write(self, obj: Any) -> None:
        """Queue one JSON object (write it through when there is no flush thread)."""
        self._buffer.append(json_line(obj))
        if self._thread is None:
            self.flush()

    def extend(self, lines: list[str]) -> None:
        """Queue lines already encoded with :func:`json_line`, without flushing."""
        with self._lock:
            self._buffer.extend(lines)

    def flush(self) -> None:
        """Write every queued line; a failure is reported and those lines dropped."""
        with self._lock:
            if self._fd is None or not self._buffer:
                return
            lines, self._buffer = self._buffer, []
            data = "".join(lines).encode()
            try:
                if (
                    self.rotate_bytes
                    and self._size
                    and self._size + len(data) > self.rotate_bytes
                ):
                    self._rotate()
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                    self._size += written
                self.written += len(lines)
            except OSError as exc:
                self.dropped += len(lines)
                if self.on_error is not None:
                    self.on_error(f"writing {self.path}", exc)

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
        self._size = 0

    def _flush_loop(self) -> None:
        assert self.flush_interval is not None
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except Exception as exc:  # one bad record must not end the flushing
                if self.on_error is not None:
                    self.on_error(f"flushing {self.path}", exc)

    def close(self) -> None:
        """Stop the flush thread, write what is queued, close the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        try:
            self.flush()
        finally:  # the descriptor is released even when the last flush fails
            with self._lock:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None


def safe_filename(text: str) -> str:
    """A name derived from a worker address or name, safe on any filesystem."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
    return out.strip("._") or "worker"
