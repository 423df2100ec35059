"""Shared run-time pieces: task prefixes, failing a task from a thread, JSON lines."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import inspect
import json
import logging
import os
import stat
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar

from dask.sizeof import sizeof
from dask.utils import key_split
from distributed import worker as _worker_module

from catalog._entry import Option
from catalog._options import Duration, Integer

__all__ = [
    "FOLLOW_SYMLINKS_KEY",
    "MAX_BACKUPS",
    "MAX_BUFFERED_LINES",
    "RETRY_INTERVAL",
    "UNKNOWN_PREFIX",
    "Firing",
    "JsonLinesFile",
    "TaskInterrupt",
    "arm",
    "at_safe_point",
    "bounded",
    "cancel_undelivered",
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
    "server_running",
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


class TaskInterrupt(BaseException):
    """Base of the exceptions the catalog raises inside a running task.

    A ``BaseException``, so that library code's ``except Exception`` (logging's
    ``handleError``, retry loops) cannot swallow it; distributed's task runner
    catches ``BaseException`` and reports it as the task's error. Outside the
    task (pickled to the scheduler and the client) it becomes its ``Reported``
    twin, which is also an ``Exception`` (and the ``reported_as`` classes), so
    ``future.result()`` raises it like any task error and
    ``except TaskTimeoutError`` / ``except TimeoutError`` both catch it there.
    """

    #: Exception classes the client-side twin also derives from.
    reported_as: ClassVar[tuple[type[Exception], ...]] = ()
    #: The twin that pickling turns an instance into (an ``Exception``).
    Reported: ClassVar[type[TaskInterrupt]]
    #: The public class (for the twin and the per-firing subclasses).
    public: ClassVar[type[TaskInterrupt]]
    #: Only on a per-firing subclass: its message, and whether it was raised.
    message: ClassVar[str]
    landed: ClassVar[bool]

    def __init_subclass__(cls, kind: str = "public", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind == "public":
            _make_public(cls)

    def __init__(self, *args: Any) -> None:
        # CPython raises an asynchronous exception by calling its class with no
        # arguments in the target thread: the message rides on the class.
        cls = type(self)
        if "landed" in cls.__dict__:
            cls.landed = True
            if not args and cls.message:
                args = (cls.message,)
        super().__init__(*args)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reported, (self.public, self.args))


def _make_public(cls: type[TaskInterrupt]) -> None:
    cls.public = cls
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": f"{cls.__name__} as the client sees it: also an Exception.",
    }
    if any(issubclass(base, MemoryError) for base in cls.reported_as):
        # MemoryError.__new__ refuses a subclass with another layout ("is not
        # safe"), and tblib, which distributed ships exceptions with, calls
        # cls.__new__ directly.
        namespace["__new__"] = lambda c, *a: Exception.__new__(c, *a)
    cls.Reported = types.new_class(
        cls.__name__,
        (cls, *cls.reported_as, Exception),
        {"kind": "reported"},
        lambda ns: ns.update(namespace),
    )


_make_public(TaskInterrupt)


def _reported(cls: type[TaskInterrupt], args: tuple[Any, ...]) -> TaskInterrupt:
    """Unpickle an interrupt as its ``Reported`` twin (an ``Exception``)."""
    return cls.Reported(*args)


def _unsafe_roots() -> tuple[str, ...]:
    """Where code runs that an exception must never land in: it holds locks.

    logging's handlers take a lock and enter ``try`` one instruction later;
    threading, queue and concurrent.futures keep their invariants across a few
    bytecodes; the import machinery holds the import lock; distributed's own
    code is the worker's bookkeeping. (The catalog's own code that runs in a
    task thread, the logging entry's handler, runs inside logging's frames.)
    """
    import concurrent.futures
    import importlib
    import queue

    import distributed

    def directory(module: Any) -> str:
        return os.path.dirname(os.path.abspath(module.__file__)) + os.sep

    return (
        directory(logging),
        os.path.abspath(threading.__file__),
        os.path.abspath(queue.__file__),
        directory(concurrent.futures),
        directory(importlib),
        "<frozen importlib",  # importlib._bootstrap is frozen into the interpreter
        directory(distributed),
    )


_UNSAFE_ROOTS = _unsafe_roots()


@functools.lru_cache(maxsize=4096)
def _unsafe_file(filename: str) -> bool:
    if filename.startswith(_UNSAFE_ROOTS):
        return True
    # A relative or unnormalised co_filename still names the same file.
    return not filename.startswith("<") and os.path.abspath(filename).startswith(
        _UNSAFE_ROOTS
    )


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


def at_safe_point(frame: FrameType | None) -> bool:
    """Whether an exception raised at ``frame`` lands in the task's own code only.

    Every frame from ``frame`` out to distributed's ``_run_task_simple`` must be
    outside :data:`_UNSAFE_ROOTS`, and ``_run_task_simple`` must be in the task's
    call (not in the bookkeeping after it: an exception there would kill the
    executor thread for good).
    """
    innermost = frame
    while frame is not None:
        code = frame.f_code
        if code is _RUN_TASK_CODE:
            if frame is innermost:
                return False
            return _TASK_CALL_LINE is None or frame.f_lineno == _TASK_CALL_LINE
        if _unsafe_file(code.co_filename):
            return False
        frame = frame.f_back
    return False


def _position(thread_id: int) -> tuple[FrameType | None, int]:
    """Where the thread is: its innermost frame and that frame's last instruction."""
    frame = sys._current_frames().get(thread_id)
    return frame, (frame.f_lasti if frame is not None else -1)


_SET_ASYNC_EXC = ctypes.pythonapi.PyThreadState_SetAsyncExc

#: The interrupt last fired at each thread, until it lands or is withdrawn.
_IN_FLIGHT: dict[int, type[TaskInterrupt]] = {}


def arm(exc_type: type[TaskInterrupt], message: str) -> type[TaskInterrupt]:
    """A subclass of ``exc_type`` for one firing, carrying ``message``.

    CPython raises an asynchronous exception by calling its class with no
    arguments in the target thread, so the message rides on the class, and the
    class records whether it was raised (``landed``).
    """
    return types.new_class(
        exc_type.__name__,
        (exc_type,),
        {"kind": "fired"},
        lambda ns: ns.update(
            message=message,
            landed=False,
            __module__=exc_type.__module__,
            __qualname__=exc_type.__qualname__,
        ),
    )


def interrupt_task(
    worker: Any, thread_id: int, key: Any, exc_type: type[TaskInterrupt], message: str
) -> type[TaskInterrupt] | None:
    """Raise ``exc_type(message)`` in the thread running ``key``, at a safe point.

    Under ``worker.active_threads_lock`` (which the executor thread takes to
    leave a task) the thread must still run ``key`` and stand at a safe point
    (:func:`at_safe_point`); otherwise nothing is fired and the caller tries again
    on its next tick. The check and the firing are separate steps, so the thread
    may move in between: its position (innermost frame and instruction) is read
    before the check and after the firing, and when it moved the exception is
    withdrawn. What remains is the rare case where the thread moves after the
    first reading and also runs right after the firing, before the second
    (docs/security.md). A thread blocked in C code receives the exception when
    the call returns.

    Args:
        worker: the worker.
        thread_id: the thread running ``key``.
        key: the task.
        exc_type: the exception class, or a class from :func:`arm` (reused
            while it has not been fired, so that retries build nothing).
        message: the exception's message (unused with an armed class).

    Returns:
        The class fired (a subclass of ``exc_type`` made for this firing, whose
        ``landed`` turns true once it is raised), or None.
    """
    target = ctypes.c_ulong(thread_id)
    fired_type = exc_type if "landed" in exc_type.__dict__ else arm(exc_type, message)
    payload = ctypes.py_object(fired_type)
    with worker.active_threads_lock:
        if worker.active_threads.get(thread_id) != key:
            return None
        before = _position(thread_id)
        if not at_safe_point(before[0]) or _position(thread_id) != before:
            return None
        fired = _SET_ASYNC_EXC(target, payload)
        if fired == 1 and _position(thread_id) == before:
            _IN_FLIGHT[thread_id] = fired_type
            return fired_type
        if fired:
            # The thread moved between the check and the firing (or this is
            # not one thread): withdraw before it lands outside the task.
            _SET_ASYNC_EXC(target, None)
        return None


def cancel_undelivered(
    worker: Any, thread_id: int, fired: type[TaskInterrupt] | None = None
) -> bool:
    """Withdraw an interrupt fired at ``thread_id`` that has not been raised yet.

    Called when the task left ``executing`` by itself (it finished inside C code
    before the exception could land), so the exception never hits the next task.
    With ``fired``, only that firing is withdrawn.
    """
    with worker.active_threads_lock:
        current = _IN_FLIGHT.get(thread_id)
        if current is None or (fired is not None and current is not fired):
            return False
        del _IN_FLIGHT[thread_id]
        if current.landed:
            return False
        _SET_ASYNC_EXC(ctypes.c_ulong(thread_id), None)
        return True


def pending(fired: type[TaskInterrupt] | None) -> bool:
    """Whether a firing returned by :func:`interrupt_task` has not been raised yet."""
    return fired is not None and not fired.landed


def bounded(mapping: Any, key: Any, cap: int) -> bool:
    """Whether ``key`` has, or may take, a place in ``mapping`` of at most ``cap``.

    State keyed by what tasks bring (prefixes, annotation values) is capped like
    the metrics' prefix labels, so a stream of distinct values cannot grow it.
    """
    return key in mapping or len(mapping) < cap


def interrupt_options(grace: str, escalation: str) -> list[Option]:
    """The options of an entry that interrupts tasks: declared here once."""
    return [
        Option(
            "interrupt-grace",
            Duration(),
            grace,
            "How long an interrupted task may go on running (it swallowed the "
            "interrupt, or sits in C code) before it is interrupted again.",
        ),
        Option(
            "interrupt-attempts",
            Integer(1),
            3,
            f"Interrupts a task gets before {escalation}.",
        ),
    ]


#: How soon an interrupt that found its thread outside a safe point is tried
#: again (the thread may stand at one only for a moment, e.g. between two
#: logging calls that each wait for a handler's lock).
RETRY_INTERVAL = 0.002


@dataclass(slots=True)
class Firing:
    """The interrupts fired at one running task, and what comes next.

    The task is interrupted as soon as its thread stands at a safe point, again
    every ``grace`` seconds while it goes on running, and once ``attempts *
    grace`` seconds have passed since the first try, whether or not an interrupt
    could ever be delivered, :meth:`due` says ``"escalate"``, once.
    """

    thread: int
    #: The last interrupt delivered (see :func:`interrupt_task`).
    fired: type[TaskInterrupt] | None = None
    #: Interrupts delivered.
    count: int = 0
    #: ``time.monotonic()`` of the first try and of the last delivery.
    first: float = field(default_factory=time.monotonic)
    at: float = 0.0
    escalated: bool = False
    #: The class the next delivery raises, built once for all its retries.
    armed: type[TaskInterrupt] | None = None
    #: The last :meth:`fire` found the previous interrupt still pending (the
    #: thread sits in C code) and left it in place: nothing new was raised.
    kept_pending: bool = False
    #: :meth:`claim_first_report` has said yes.
    reported: bool = False
    _report_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fire(
        self,
        worker: Any,
        key: Any,
        exc_type: type[TaskInterrupt],
        message: str,
    ) -> bool:
        """Interrupt the task; False when its thread is not at a safe point now.

        An earlier interrupt that has not landed (the thread sits in C code)
        stays in place and counts as this attempt: firing again would change
        nothing.
        """
        self.kept_pending = False
        if self.settle():
            return True
        if pending(self.fired):
            self.kept_pending = True
        else:
            if self.armed is None:
                self.armed = arm(exc_type, message)
            fired = interrupt_task(worker, self.thread, key, self.armed, message)
            if fired is None:
                return False
            self.fired, self.armed = fired, None
        self.count += 1
        self.at = time.monotonic()
        return True

    def settle(self) -> bool:
        """Count an interrupt reported withdrawn that was raised after all.

        :func:`interrupt_task` withdraws when the thread moved right after the
        firing; it may have moved because it was already raising the exception.
        The class then says ``landed``.
        """
        if self.armed is None or not self.armed.landed:
            return False
        self.fired, self.armed = self.armed, None
        self.count += 1
        self.at = time.monotonic()
        return True

    def claim_first_report(self) -> bool:
        """True once, to the first caller after an interrupt was delivered.

        The first delivery is reported (logged, counted) by whichever comes
        first: the checker thread that fired it, or the task's leaving
        transition on the event loop. The exception can fail the task, and the
        client hear of it, before the checker thread gets to its bookkeeping;
        the transition runs before the worker tells the scheduler, so a client
        that saw the failure also sees it counted.
        """
        if self.count == 0:
            return False
        with self._report_lock:
            if self.reported:
                return False
            self.reported = True
            return True

    def due(self, grace: float, attempts: int) -> str | None:
        """``"fire"``, ``"escalate"`` (once) or None (waiting out ``grace``)."""
        if self.escalated:
            return None
        current = time.monotonic()
        if current - self.first >= grace * attempts:
            self.escalated = True
            return "escalate"
        if self.count == 0 or current - self.at >= grace:
            return "fire"
        return None

    def cancel(self, worker: Any) -> None:
        """The task left by itself: withdraw an interrupt that has not landed."""
        if self.fired is not None:
            cancel_undelivered(worker, self.thread, self.fired)


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
# Output files: owner-only, no symlinks unless asked
# ---------------------------------------------------------------------------

#: Config key that lets output files and directories be symbolic links.
FOLLOW_SYMLINKS_KEY = "catalog.follow-symlinks"


def expand_path(path: str | os.PathLike[str]) -> str:
    """A path option's value as the server uses it: ``~`` expanded there.

    Expanded where the file is opened, not when the option is parsed, so a
    plugin registered from a client resolves ``~`` on the server it runs on.
    """
    return os.path.expanduser(os.fspath(path))


def _follow_symlinks() -> bool:
    import dask.config

    return bool(dask.config.get(FOLLOW_SYMLINKS_KEY, default=False))


def _symlink_error(path: str) -> OSError:
    return OSError(
        errno.ELOOP,
        "refusing to write through a symbolic link "
        f"(set config {FOLLOW_SYMLINKS_KEY}: true to allow it)",
        path,
    )


def private_dir(path: str | os.PathLike[str]) -> str:
    """Create a directory and its missing parents owner-only (0o700).

    An existing directory is used as it is, unless it is a symbolic link and
    ``catalog.follow-symlinks`` is false.

    Returns:
        The path with ``~`` expanded.
    """
    path = expand_path(path)
    if not _follow_symlinks() and os.path.islink(path):
        raise _symlink_error(path)
    missing = []
    here = os.path.abspath(path)
    while not os.path.isdir(here):
        missing.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for directory in reversed(missing):
        # makedirs' mode only reaches the last level: each level is made here.
        with contextlib.suppress(FileExistsError):  # made meanwhile by a sibling
            os.mkdir(directory, 0o700)
    return path


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` for an output file: created 0o600, never through a symlink.

    A symbolic link at the final path component is refused (``O_NOFOLLOW``)
    unless ``catalog.follow-symlinks`` is true. An existing regular file that
    others can read or write is tightened to 0o600, with one WARNING; one that
    cannot be tightened (another user's) is refused.

    Args:
        path: the file (``~`` is expanded).
        flags: ``os.O_WRONLY | os.O_APPEND`` and the like; ``O_CREAT`` and
            ``O_CLOEXEC`` are added.

    Returns:
        The open descriptor.
    """
    path = expand_path(path)
    follow = _follow_symlinks()
    flags |= os.O_CREAT | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise _symlink_error(path) from None
        raise
    try:
        info = os.fstat(fd)
        loose = stat.S_IMODE(info.st_mode) & 0o077
        if loose and stat.S_ISREG(info.st_mode):
            try:
                os.fchmod(fd, stat.S_IMODE(info.st_mode) & 0o700)
            except PermissionError:
                raise OSError(
                    errno.EPERM,
                    f"the file exists with mode {stat.S_IMODE(info.st_mode):04o}, "
                    "which lets other users read it, and cannot be made owner-only",
                    path,
                ) from None
            logger.warning(
                "catalog: %s had mode %04o; made it owner-only (%04o)",
                path,
                stat.S_IMODE(info.st_mode),
                stat.S_IMODE(info.st_mode) & 0o700,
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------------------
# JSON-lines files that survive stops
# ---------------------------------------------------------------------------


def json_line(obj: Any) -> str:
    """One JSON object on one line, whatever newlines or quotes its strings hold."""
    return (
        json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False) + "\n"
    )


#: The most rotated files an output file keeps: each rotation renames every
#: one of them, on the event loop for the events entry.
MAX_BACKUPS = 100

#: Lines a JsonLinesFile keeps while its file cannot be written, before it
#: drops new ones (and counts them).
MAX_BUFFERED_LINES = 10_000


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


class JsonLinesFile:
    """An append-only file of JSON lines, written in whole lines.

    Lines are buffered in memory and written by ``flush`` with ``os.write`` on an
    ``O_APPEND`` descriptor, so after a SIGKILL the file is valid up to its last
    complete line. ``flush_interval`` starts a thread that flushes periodically;
    ``None`` writes every line through at once. Size rotation keeps ``backups``
    older files as ``PATH.1`` ... ``PATH.N``.

    The file is opened with :func:`open_private`. When a write or a rotation
    fails, the next flush opens the file again; meanwhile at most
    ``max_buffered`` lines wait in memory and later ones are dropped and
    counted in ``dropped``, with one ERROR line per outage.

    Args:
        path: the file (``~`` is expanded).
        rotate_bytes: rotate when the file would grow past this size (0: never).
        backups: how many rotated files to keep.
        flush_interval: seconds between background flushes, or None.
        on_error: called with (what, exception) when a write fails at run time.
        max_buffered: lines kept while the file cannot be written.
        while_running: asked before each background flush; once it answers
            False the thread writes what is queued and ends (see
            :func:`server_running`). ``close`` still writes anything later.
    """

    def __init__(
        self,
        path: str,
        *,
        rotate_bytes: int = 0,
        backups: int = 0,
        flush_interval: float | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        max_buffered: int = MAX_BUFFERED_LINES,
        while_running: Callable[[], bool] | None = None,
    ) -> None:
        self.path = expand_path(path)
        self.while_running = while_running
        self.rotate_bytes = rotate_bytes
        self.backups = backups
        self.flush_interval = flush_interval
        self.on_error = on_error
        self.max_buffered = max_buffered
        self.dropped = 0
        self.written = 0
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._opened = False
        self._failing = False
        self._size = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> JsonLinesFile:
        """Open (create) the file; raise OSError when it cannot be written."""
        self._open_fd()
        self._opened = True
        if self.flush_interval is not None:
            self._thread = threading.Thread(
                target=self._flush_loop,
                name=f"catalog-flush-{os.path.basename(self.path)}",
                daemon=True,
            )
            self._thread.start()
        return self

    @property
    def buffered(self) -> int:
        """Lines queued and not yet written."""
        return len(self._buffer)

    def memory(self) -> int:
        """Bytes of the lines queued and not yet written."""
        return sizeof(list(self._buffer))

    def _open_fd(self) -> None:
        self._fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size

    def write(self, obj: Any) -> None:
        """Queue one JSON object (write it through when there is no flush thread)."""
        self.extend([json_line(obj)])
        if self._thread is None:
            self.flush()

    def extend(self, lines: list[str]) -> None:
        """Queue lines already encoded with :func:`json_line`, without flushing."""
        with self._lock:
            # Bounded after each failed flush (_failed), not here: the next
            # flush may well succeed.
            self._buffer.extend(lines)

    def _trim(self) -> None:
        # Lock held. The file cannot be written: keep the oldest lines up to
        # the bound and count the rest.
        excess = len(self._buffer) - self.max_buffered
        if excess > 0:
            del self._buffer[self.max_buffered :]
            self.dropped += excess

    def _failed(self, exc: OSError) -> None:
        # Lock held: say so once per outage (through on_error where given,
        # which logs an entry's first error), then only count.
        self._lost_file()
        self._trim()
        first, self._failing = not self._failing, True
        what = (
            f"writing {self.path} (keeping up to {self.max_buffered} lines "
            "in memory, reopening it at each flush)"
        )
        if self.on_error is not None:
            self.on_error(what, exc)
        elif first:
            logger.error("catalog: %s: %s", what, exc)

    def flush(self) -> None:
        """Write every queued line; on failure keep them and reopen next time."""
        with self._lock:
            if not self._opened or not self._buffer:
                return
            lines = self._buffer
            try:
                # "replace": a lone surrogate in a key must not wedge the buffer.
                data = "".join(lines).encode(errors="replace")
            except Exception:  # not a line at all: drop it rather than retry it
                self._buffer = []
                self.dropped += len(lines)
                raise
            try:
                if self._fd is None:  # an earlier write or rotation failed
                    self._open_fd()
                if (
                    self.rotate_bytes
                    and self._size
                    and self._size + len(data) > self.rotate_bytes
                ):
                    self._rotate()
                self._write_all(data)
            except OSError as exc:
                self._failed(exc)
                return
            self.written += len(lines)
            self._buffer = []
            if self._failing:
                self._failing = False
                logger.warning(
                    "catalog: %s is written again (%d lines dropped so far)",
                    self.path,
                    self.dropped,
                )

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self._size += written

    def _lost_file(self) -> None:
        """Close the descriptor after a failure; the next flush opens the path."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _rotate(self) -> None:
        self._lost_file()
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            # The file may be gone (deleted by hand): start a new one anyway.
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, f"{self.path}.1")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(self.path, 0)
        self._open_fd()
        self._size = 0

    def _flush_loop(self) -> None:
        assert self.flush_interval is not None
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
                if self.while_running is not None and not self.while_running():
                    return
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
                self._opened = False
                self._lost_file()


def safe_filename(text: str) -> str:
    """A name derived from a worker address or name, safe on any filesystem."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
    return out.strip("._") or "worker"
