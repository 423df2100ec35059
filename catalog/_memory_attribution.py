"""The memory guard's worker-free part: how growth is split, RSS, per-prefix stats.

Everything here is plain Python over numbers (and /proc on Linux): it is tested
without a worker. :mod:`catalog.memory` re-exports the public names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = [
    "HAVE_FAULTS",
    "RESUME_FACTOR",
    "RssReader",
    "host_decision",
    "merge_reports",
    "split_growth",
]

#: Available host memory must come back above this multiple of the threshold.
RESUME_FACTOR = 1.25


# ---------------------------------------------------------------------------
# Attribution (pure functions, documented in docs/entries/memory.md)
# ---------------------------------------------------------------------------


def split_growth(
    delta: float,
    held: Sequence[float],
    weights: Sequence[float | None],
) -> list[float]:
    """Split one sampling interval's RSS change among the tasks that ran in it.

    Args:
        delta: RSS now minus RSS at the previous sample (bytes).
        held: each task's attributed growth so far.
        weights: each task's thread's new page faults in the interval, or None
            when unknown (not Linux, or the thread's first interval).

    Returns:
        Each task's share. One task gets all of ``delta``. Growth is split in
        proportion to page faults (a thread that touches new memory faults it
        in), unknown weights taking the mean of the known ones, and equally when
        nothing is known. A drop is split in proportion to what each task holds.
    """
    n = len(held)
    if n == 0:
        return []
    if n == 1:
        return [delta]
    if delta >= 0:
        known = [w for w in weights if w is not None]
        mean = sum(known) / len(known) if known else 1.0
        parts = [mean if w is None else float(w) for w in weights]
    else:
        parts = [max(h, 0.0) for h in held]
    total = sum(parts)
    if total <= 0:
        return [delta / n] * n
    return [delta * p / total for p in parts]


def host_decision(paused: bool, available: int, threshold: int) -> str | None:
    """``"pause"``, ``"resume"`` or None, with the 1.25x hysteresis."""
    if not paused and available < threshold:
        return "pause"
    if paused and available > RESUME_FACTOR * threshold:
        return "resume"
    return None


# ---------------------------------------------------------------------------
# Per-thread page faults (Linux)
# ---------------------------------------------------------------------------

_TASK_DIR = "/proc/self/task"
HAVE_FAULTS = os.path.isdir(_TASK_DIR)


def _minor_faults(native_id: int) -> int | None:
    try:
        with open(f"{_TASK_DIR}/{native_id}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # Fields after the ")" closing the thread name: state is 3, minflt is 10.
    return int(text.rsplit(b")", 1)[1].split()[7])


class RssReader:
    """The process's RSS in bytes, the figure of psutil's ``memory_info().rss``.

    Read once per count of finished tasks (and by readers), so it should be
    cheap. On Linux, psutil opens, reads and closes ``/proc/<pid>/statm`` on
    every call (about 95 us on the 2-core CI machine, where opening a /proc file
    is slow); this keeps the file open and re-reads it with one ``pread`` (about
    8 us), the same pages times the same page size. Elsewhere, and if the read
    ever fails, psutil.
    """

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
        self.fd: int | None = None
        if hasattr(os, "pread"):
            try:
                self.fd = os.open(f"/proc/{process.pid}/statm", os.O_RDONLY)
            except OSError:
                self.fd = None

    def __call__(self) -> int:
        fd = self.fd
        if fd is not None:
            try:
                return int(os.pread(fd, 256, 0).split()[1]) * self.page
            except (OSError, IndexError, ValueError):
                pass
        return int(self.process.memory_info().rss)

    def close(self) -> None:
        """Close the kept-open file; later readings fall back to psutil."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


@dataclass(slots=True)
class _PrefixStats:
    count: int = 0
    total: float = 0.0
    max: int = 0
    shared: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.total / self.count if self.count else 0.0,
            "max": self.max,
            "shared": self.shared,
            "failed": self.failed,
        }


def merge_reports(
    reports: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """Merge per-worker per-prefix stats into one mapping per prefix."""
    merged: dict[str, dict[str, Any]] = {}
    for per_prefix in reports.values():
        for prefix, st in per_prefix.items():
            out = merged.setdefault(
                prefix, {"count": 0, "mean": 0.0, "max": 0, "shared": 0, "failed": 0}
            )
            total = out["mean"] * out["count"] + st["mean"] * st["count"]
            out["count"] += st["count"]
            out["mean"] = total / out["count"] if out["count"] else 0.0
            out["max"] = max(out["max"], st["max"])
            out["shared"] += st["shared"]
            out["failed"] += st["failed"]
    return dict(sorted(merged.items()))
