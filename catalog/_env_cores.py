"""The env entry's core counting: cgroup CPU quota, usable cores, auto threads."""

from __future__ import annotations

import math
import os

import psutil

# ---------------------------------------------------------------------------
# Cores and thread limits
# ---------------------------------------------------------------------------


def cgroup_cpu_limit(
    root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
) -> int | None:
    """Whole cores allowed by the cgroup CPU quota of this process, or None.

    Reads cgroup v2 ``cpu.max`` of the process's group and of every ancestor up
    to ``root`` (the tightest wins), and cgroup v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``; a fractional quota rounds up (1.5 CPUs is 2 cores).
    """
    candidates: list[tuple[str, str]] = []  # (v2 cpu.max) or (v1 quota, period)
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        path = path.strip("/")
        parts = path.split("/") if path else []
        if hierarchy == "0" and not controllers:
            for depth in range(len(parts), -1, -1):
                group = os.path.join(root, *parts[:depth])
                candidates.append((os.path.join(group, "cpu.max"), ""))
        elif "cpu" in controllers.split(","):
            for dirname in (controllers, "cpu,cpuacct", "cpuacct,cpu", "cpu"):
                for group in (
                    os.path.join(root, dirname, *parts),
                    os.path.join(root, dirname),
                ):
                    candidates.append(
                        (
                            os.path.join(group, "cpu.cfs_quota_us"),
                            os.path.join(group, "cpu.cfs_period_us"),
                        )
                    )
    if not lines:
        candidates.append((os.path.join(root, "cpu.max"), ""))
    limits = []
    for first, second in dict.fromkeys(candidates):
        try:
            with open(first) as f:
                text = f.read().split()
            if second:
                with open(second) as f:
                    text = [text[0], f.read().strip()]
        except (OSError, IndexError):
            continue
        if len(text) != 2 or text[0] in ("max", "-1"):
            continue
        try:
            quota, period = int(text[0]), int(text[1])
        except ValueError:
            continue
        if quota > 0 and period > 0:
            limits.append(math.ceil(quota / period))
    return min(limits) if limits else None


def usable_cores() -> int:
    """Cores this process may use: CPU affinity, then the cgroup quota, at least 1."""
    if hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = os.cpu_count() or 1
    try:
        affinity = psutil.Process().cpu_affinity()
    except (AttributeError, psutil.Error, OSError):
        affinity = None
    if affinity:
        count = min(count, len(affinity))
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def auto_threads(nthreads: int, cores: int | None = None) -> int:
    """``threads=auto``: ``max(1, usable cores // nthreads)``.

    Args:
        nthreads: the worker's task threads (1 on a scheduler or client).
        cores: the usable cores; :func:`usable_cores` when None.
    """
    if cores is None:
        cores = usable_cores()
    return max(1, cores // max(1, nthreads))
