"""The logging entry's processor chain: where a line came from, and its renderer."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from distributed.utils import thread_state

from catalog.entry import (
    Choice,
    prefix_of,
    role_of,
)

# ---------------------------------------------------------------------------
# The processor chain
# ---------------------------------------------------------------------------


class ServerContext:
    """A structlog processor adding where a line came from.

    Adds ``role``, ``address``, ``name``, ``host`` and ``pid`` of the server the
    process's pipeline belongs to and, inside a running task, the task's
    ``key`` and ``prefix`` (and the executing worker's address and name).
    Values already in the event (bound by the caller) are kept.

    Args:
        servers: the servers of this process, first one first; a live list.
        host: the host name to report (default: ``socket.gethostname()``).
        pid: the process id to report (default: ``os.getpid()``).

    Example:
        >>> ctx = ServerContext([], host="h", pid=1)
        >>> ctx(None, "info", {"event": "hi"})["role"] is None
        True
    """

    def __init__(
        self, servers: Sequence[Any], host: str | None = None, pid: int | None = None
    ) -> None:
        self.servers = servers
        self.host = host if host is not None else socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self._addresses: dict[int, str] = {}

    def __call__(self, _: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        server = self.servers[0] if self.servers else None
        key = getattr(thread_state, "key", None)
        if key is not None:
            event_dict.setdefault("key", key if isinstance(key, str) else str(key))
            event_dict.setdefault("prefix", prefix_of(key))
            state = getattr(thread_state, "execution_state", None) or {}
            server = state.get("worker", server)
        role = role_of(server) if server is not None else None
        event_dict.setdefault("role", role)
        event_dict.setdefault("address", self._address(server, role))
        event_dict.setdefault("name", _name_of(server, role))
        event_dict.setdefault("host", self.host)
        event_dict.setdefault("pid", self.pid)
        return event_dict

    def _address(self, server: Any, role: str | None) -> str | None:
        if server is None or role == "client":
            return None
        found = self._addresses.get(id(server))
        if found is None:
            try:
                found = str(server.address)
            except Exception:  # not listening yet: ask again next line
                return None
            self._addresses[id(server)] = found
        return found


def _name_of(server: Any, role: str | None) -> str | None:
    if role in ("worker", "nanny"):
        name = getattr(server, "name", None)
    elif role == "client":
        name = getattr(server, "id", None)
    else:
        return None
    return None if name is None else str(name)


def _drop_record_internals(
    _: Any, __: str, event_dict: dict[str, Any]
) -> dict[str, Any]:
    # ExtraAdder copies every non-standard attribute of a record: keep the
    # user's ``extra`` fields, drop what logging and other handlers left there.
    for k in [k for k in event_dict if k.startswith("_") and k not in _META]:
        del event_dict[k]
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    return event_dict


_META = frozenset({"_record", "_from_structlog"})


def _renderer(fmt: str, colors: bool) -> Callable[..., Any]:
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    if fmt == "logfmt":
        return structlog.processors.LogfmtRenderer(
            key_order=["timestamp", "level", "logger", "event"], drop_missing=True
        )
    return structlog.dev.ConsoleRenderer(
        colors=colors, exception_formatter=structlog.dev.plain_traceback
    )


def formatter(
    format: str = "json",
    context: ServerContext | None = None,
    colors: bool = False,
) -> structlog.stdlib.ProcessorFormatter:
    """The ``logging.Formatter`` of the pipeline: structlog's ``ProcessorFormatter``.

    Records from the standard library and from structlog loggers (configured
    to end in ``ProcessorFormatter.wrap_for_formatter``) come out alike.

    Args:
        format: ``"json"``, ``"logfmt"`` or ``"console"``.
        context: the processor adding server fields (default: no server).
        colors: colour the console format.

    Example:
        >>> import json, logging
        >>> record = logging.makeLogRecord({"msg": "hi %s", "args": ("x",)})
        >>> json.loads(formatter("json").format(record))["event"]
        'hi x'
    """
    fmt = Choice("json", "logfmt", "console").parse(format)
    exceptions: list[Any] = (
        [] if fmt == "console" else [structlog.processors.format_exc_info]
    )
    processors: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        context if context is not None else ServerContext([]),
        structlog.processors.StackInfoRenderer(),
        *exceptions,
        _drop_record_internals,
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        _renderer(fmt, colors),
    ]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder()],
        processors=processors,
    )
