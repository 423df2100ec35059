"""Failing a running task from another thread, at a safe point, and escalating."""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar

from distributed import worker as _worker_module

from catalog._declare import Option
from catalog._options import Duration, Integer

__all__ = [
    "RETRY_INTERVAL",
    "Firing",
    "TaskInterrupt",
    "arm",
    "at_safe_point",
    "cancel_undelivered",
    "interrupt_options",
    "interrupt_task",
    "is_task_runner",
    "pending",
]

logger = logging.getLogger("catalog")


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


def is_task_runner(frame: FrameType) -> bool:
    """Whether ``frame`` is distributed's own task runner, which calls a task.

    Walking a task's stack outward, the user's code ends at this frame: what
    lies beyond it is distributed's executor and threads.
    """
    return frame.f_code is _RUN_TASK_CODE


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
