"""A running task's Python stack, as plain dicts and as traceback-style text.

Worker-free (tested on the current thread); :mod:`catalog.watchdog` re-exports
:func:`format_stack`.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from catalog.entry import is_task_runner

__all__ = ["format_stack"]


def _task_frames(frame: Any, depth: int) -> list[dict[str, Any]]:
    """The innermost ``depth`` frames of a task, outermost first, as plain dicts.

    Frames from distributed's own task runner outward are left out: the reader
    wants the user's code.
    """
    frames = []
    for f, lineno in traceback.walk_stack(frame):
        if is_task_runner(f):
            break
        frames.append((f, lineno))
    summary = traceback.StackSummary.extract(iter(frames), limit=depth)
    out = [
        {"filename": fs.filename, "lineno": fs.lineno, "name": fs.name, "line": fs.line}
        for fs in summary
    ]
    out.reverse()
    return out


def _stack_of(thread_id: int, depth: int) -> list[dict[str, Any]]:
    frame = sys._current_frames().get(thread_id)
    return [] if frame is None else _task_frames(frame, depth)


def format_stack(stack: list[dict[str, Any]]) -> str:
    """A stack from an event or ``catalog.watchdog.running``, as a traceback's text."""
    if not stack:
        return "  (no Python frames)"
    lines = []
    for fs in stack:
        lines.append(f'  File "{fs["filename"]}", line {fs["lineno"]}, in {fs["name"]}')
        if fs.get("line"):
            lines.append(f"    {fs['line']}")
    return "\n".join(lines)
