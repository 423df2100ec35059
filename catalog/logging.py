"""Structured logs: one JSON (or logfmt) line per record, saying where it came from."""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import socket
import string
import sys
import threading
from typing import Any

import structlog

# The entry's own helper module (a rule of catalog.entry's): the processors.
from catalog._log_format import ServerContext, _name_of, formatter
from catalog.entry import (
    MAX_BACKUPS,
    Choice,
    Entry,
    Integer,
    LogLevel,
    NameValue,
    NannyEntryPlugin,
    Option,
    RotateSize,
    SchedulerEntryPlugin,
    Settings,
    Text,
    WorkerEntryPlugin,
    entry_preload,
    expand_path,
    open_private,
    role_of,
    safe_filename,
)

__all__ = [
    "ENTRY",
    "FIELDS",
    "LogPath",
    "LoggerLevel",
    "NannyStructuredLogging",
    "SchedulerStructuredLogging",
    "ServerContext",
    "StructuredLogging",
    "dask_setup",
    "dask_teardown",
    "formatter",
]

logger = logging.getLogger("catalog.logging")

#: The fields every line carries (plus ``key`` and ``prefix`` inside a task,
#: ``exception`` with an exception, and a record's ``extra`` fields).
FIELDS = (
    "timestamp",
    "level",
    "logger",
    "event",
    "role",
    "address",
    "name",
    "host",
    "pid",
)

#: Placeholders a ``file`` path may use, so that processes sharing a path
#: (a nanny and its worker, several workers on a host) get a file each.
PATH_FIELDS = ("role", "pid", "host", "name")


class LoggerLevel(NameValue):
    """``NAME=LEVEL``: a logger name and a standard logging level."""

    name = "logger=level"

    def __init__(self) -> None:
        super().__init__(
            "NAME=LEVEL with NAME a logger name such as distributed.worker and "
            "LEVEL one of " + ", ".join(LogLevel.LEVELS)
        )

    def parse(self, value: Any) -> str:
        name, _, level = super().parse(value).partition("=")
        return f"{name}={LogLevel().parse(level)}"

    def check(self, name: str, value: str) -> None:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"{name!r} is not a logger name")
        LogLevel().parse(value)


class LogPath(Text):
    """A file path, with optional ``{role}``, ``{pid}``, ``{host}``, ``{name}``."""

    def __init__(self) -> None:
        super().__init__(
            "a file path; may contain " + ", ".join(f"{{{f}}}" for f in PATH_FIELDS)
        )

    def parse(self, value: Any) -> str:
        text = super().parse(value)
        try:
            fields = {
                f for _, f, _, _ in string.Formatter().parse(text) if f is not None
            }
        except ValueError as exc:
            raise ValueError(f"bad placeholder: {exc}") from None
        unknown = sorted(fields - set(PATH_FIELDS))
        if unknown:
            raise ValueError(f"unknown placeholder(s) {unknown}")
        return text


ENTRY = Entry(
    name="logging",
    summary="structured JSON / logfmt logs from every server and from the tasks",
    runs_on={
        "worker": "formats the worker process's logs; a task's lines carry its key",
        "scheduler": "formats the scheduler process's logs",
        "nanny": "formats the nanny process's logs",
        "client": "registers the entry on the scheduler, workers and nannies",
    },
    options=[
        Option(
            "format",
            Choice("json", "logfmt", "console"),
            "json",
            "How each line is rendered: json, logfmt, or console (for a person).",
        ),
        Option(
            "level",
            LogLevel(),
            "INFO",
            "Level of the root logger and of the catalog's loggers.",
        ),
        Option(
            "logger",
            LoggerLevel(),
            [],
            "Level of one logger, as NAME=LEVEL (e.g. distributed.worker=DEBUG).",
            multiple=True,
        ),
        Option(
            "file",
            LogPath(),
            None,
            "Write to this file instead of stderr ({role}, {pid}, {host}, {name} "
            "are filled in).",
        ),
        Option(
            "rotate-bytes",
            RotateSize(),
            0,
            "Rotate the file when it reaches this size (0: never).",
        ),
        Option(
            "backups",
            Integer(0, maximum=MAX_BACKUPS),
            5,
            "How many rotated files to keep.",
        ),
    ],
    examples=(
        "dask worker tcp://127.0.0.1:8786 --preload catalog.logging "
        "--logging-format json",
        "dask scheduler --preload catalog.logging --logging-logger "
        "distributed.scheduler=DEBUG",
    ),
)


# ---------------------------------------------------------------------------
# The process-wide pipeline
# ---------------------------------------------------------------------------


class _Once(logging.Filter):
    """Let each record through the handler once, however many loggers it is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_catalog_logged", False):
            return False
        record._catalog_logged = True
        return True


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are readable by their owner only."""

    def _open(self) -> Any:
        fd = open_private(self.baseFilename, os.O_WRONLY | os.O_APPEND)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def _is_console(handler: logging.Handler) -> bool:
    """A handler printing to a stream (stderr, stdout), not a file or a buffer."""
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and not isinstance(getattr(handler, "stream", None), io.StringIO | io.BytesIO)
    )


def _console_stream() -> Any:
    """Where console lines go: the stream of distributed's own stderr handler.

    distributed binds its handler's stream when it is imported; the entry's
    lines go to the same stream, not to whatever ``sys.stderr`` is at set-up
    time (a notebook's or a test's capture may have replaced it since).
    """
    for handler in logging.getLogger("distributed").handlers:
        if _is_console(handler):
            return getattr(handler, "stream", sys.stderr)
    return sys.stderr


class _Pipeline:
    """The one handler of a process, and what it replaced."""

    def __init__(self, settings: Settings, first: Any) -> None:
        self.settings = settings
        self.servers: list[Any] = []
        self.saved: dict[str, tuple[list[logging.Handler], int, bool]] = {}
        #: The level this pipeline left on each logger it changed: teardown
        #: puts the old level back only where nobody changed it since.
        self.set_levels: dict[str, int] = {}
        self.structlog_config: dict[str, Any] | None = None
        if settings.file:
            role = role_of(first)
            path = expand_path(
                settings.file.format(
                    role=role,
                    pid=os.getpid(),
                    host=safe_filename(socket.gethostname()),
                    name=safe_filename(_name_of(first, role) or role),
                )
            )
            self.path: str | None = path
            self.handler: logging.Handler = _PrivateRotatingFileHandler(
                path,
                maxBytes=settings.rotate_bytes,
                backupCount=settings.backups,
                encoding="utf-8",
            )
            colors = False
        else:
            self.path = None
            stream = _console_stream()
            self.handler = logging.StreamHandler(stream)
            isatty = getattr(stream, "isatty", None)
            colors = bool(isatty and isatty())
        self.handler.addFilter(_Once())
        self.context = ServerContext(self.servers)
        self.handler.setFormatter(formatter(settings.format, self.context, colors))

    def _save(self, log: logging.Logger) -> None:
        if log.name not in self.saved:
            self.saved[log.name] = (list(log.handlers), log.level, log.propagate)
        self.set_levels.setdefault(log.name, log.level)

    def install(self) -> None:
        root = logging.getLogger()
        loggers = [root] + [
            log
            for log in list(logging.Logger.manager.loggerDict.values())
            if isinstance(log, logging.Logger)
        ]
        for log in loggers:
            if any(_is_console(h) for h in log.handlers) or log is root:
                self._save(log)
                kept = [h for h in log.handlers if not _is_console(h)]
                log.handlers[:] = [*kept, self.handler]
        level = LogLevel.number(self.settings.level)
        for log in (root, logging.getLogger("catalog")):
            self._save(log)
            log.setLevel(level)
            self.set_levels[log.name] = level
        for assignment in self.settings.logger:
            name, _, value = assignment.partition("=")
            log = logging.getLogger(name)
            self._save(log)
            log.setLevel(LogLevel.number(value))
            self.set_levels[log.name] = log.level
        self.structlog_config = (
            structlog.get_config() if structlog.is_configured() else None
        )
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.filter_by_level,
                structlog.stdlib.PositionalArgumentsFormatter(),
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=False,
        )

    def uninstall(self) -> None:
        # Undo only what this pipeline did: handlers and levels that others
        # set since install (a test's captured_logger, a user's own handler)
        # stay. The handler list is changed in place, as others hold it.
        for name, (handlers, level, propagate) in self.saved.items():
            log = logging.getLogger(name or None)
            others = [h for h in log.handlers if h is not self.handler]
            if len(others) < len(log.handlers):
                # Ours is still in place: put back, in their old order, the
                # console handlers it replaced and the others still there.
                others = [
                    *(h for h in handlers if h in others or _is_console(h)),
                    *(h for h in others if h not in handlers),
                ]
            log.handlers[:] = others
            if log.level == self.set_levels.get(name, level):
                log.setLevel(level)
            log.propagate = propagate
        self.saved.clear()
        self.set_levels.clear()
        if self.structlog_config is None:
            structlog.reset_defaults()
        else:
            structlog.configure(**self.structlog_config)
        self.handler.close()


#: The process's pipeline, shared by every server of the process that installs
#: the entry (several in a LocalCluster with processes=False).
_PIPELINE: _Pipeline | None = None
_LOCK = threading.RLock()


class _Logging:
    """The implementation shared by the worker, scheduler and nanny plugins."""

    settings: Settings
    _pipeline: _Pipeline | None
    #: Set up inside ``dask_setup`` rather than with the worker's queued
    #: plugins, so the worker's startup lines are structured too.
    setup_in_preload = True

    def on_setup(self, server: Any) -> None:
        global _PIPELINE
        with _LOCK:
            pipeline = _PIPELINE
            if pipeline is None:
                pipeline = _Pipeline(self.settings, server)
                pipeline.install()
                _PIPELINE = pipeline
            elif vars(pipeline.settings) != vars(self.settings):
                logger.warning(
                    "structured logging is already set up in this process with %s; "
                    "keeping it (one pipeline per process)",
                    vars(pipeline.settings),
                )
            pipeline.servers.append(server)
            self._pipeline = pipeline

    def on_teardown(self, server: Any) -> None:
        global _PIPELINE
        with _LOCK:
            pipeline = getattr(self, "_pipeline", None)
            if pipeline is None:
                return
            self._pipeline = None
            if server in pipeline.servers:
                pipeline.servers.remove(server)
            if not pipeline.servers:
                pipeline.uninstall()
                if _PIPELINE is pipeline:
                    _PIPELINE = None


class StructuredLogging(_Logging, WorkerEntryPlugin):
    """Structured logs on a worker process, with each task's ``key`` and ``prefix``.

    The process's records (``distributed.*``, ``catalog.*``, user libraries,
    structlog loggers) go through one handler whose structlog
    ``ProcessorFormatter`` renders one JSON (or logfmt) line per record.
    Teardown puts back the handlers, levels and ``propagate`` of every logger
    it changed. The same logic runs on the scheduler
    (:class:`SchedulerStructuredLogging`) and on nannies
    (:class:`NannyStructuredLogging`); it also works in a client process with
    ``StructuredLogging().setup(client)``.

    Args:
        format: ``"json"`` (default), ``"logfmt"`` or ``"console"``.
        level: level of the root and ``catalog`` loggers (default ``"INFO"``).
        logger: ``["NAME=LEVEL", ...]`` levels of single loggers.
        file: write here instead of stderr.
        rotate_bytes: rotate the file at this size (0: never).
        backups: rotated files to keep.

    Example:
        >>> import catalog
        >>> plugin = catalog.StructuredLogging(logger=["distributed.worker=debug"])
        >>> plugin.settings.logger
        ('distributed.worker=DEBUG',)
    """

    entry = ENTRY


class SchedulerStructuredLogging(_Logging, SchedulerEntryPlugin):
    """Structured logs on the scheduler process (see :class:`StructuredLogging`)."""

    entry = ENTRY


class NannyStructuredLogging(_Logging, NannyEntryPlugin):
    """Structured logs on a nanny process (see :class:`StructuredLogging`)."""

    entry = ENTRY


dask_setup, dask_teardown = entry_preload(
    ENTRY,
    worker=StructuredLogging,
    scheduler=SchedulerStructuredLogging,
    nanny=NannyStructuredLogging,
    client=StructuredLogging,
)
