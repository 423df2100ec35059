"""Output files: owner-only, no symbolic links unless asked; durable JSON lines."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

from dask.sizeof import sizeof

__all__ = [
    "FOLLOW_SYMLINKS_KEY",
    "MAX_BACKUPS",
    "MAX_BUFFERED_LINES",
    "JsonLinesFile",
    "expand_path",
    "json_line",
    "open_private",
    "private_dir",
    "safe_filename",
]

logger = logging.getLogger("catalog")

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
