"""Untrusted text in the catalog's human log lines: control characters escaped."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["LOG_ESCAPE", "comma_items", "escape_control", "escape_log_lines"]

#: C0 and C1 controls (newlines, ESC of terminal colours, NUL, DEL), the
#: Unicode line and paragraph separators, and the bidirectional overrides that
#: reorder what a terminal shows: what could forge or hide a log line.
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)

#: Attributes every LogRecord has; the others are a call's ``extra`` fields.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}


def comma_items(values: Iterable[object]) -> list[str]:
    """The items of repeatable, comma-separated values, stripped, empty ones dropped.

    ``["a,b", " c ", ""]`` gives ``["a", "b", "c"]``: how ``--enable`` and the
    other list options are given on a command line and in config.
    """
    items = (item.strip() for value in values for item in str(value).split(","))
    return [item for item in items if item]


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def escape_control(text: str) -> str:
    r"""``text`` with control characters written as Python escapes.

    Example:
        >>> print(escape_control("t\n<forged line>\x1b[31m"))
        t\n<forged line>\x1b[31m
    """
    return _CONTROL.sub(_escaped, text)


class _EscapeControl(logging.Filter):
    """Escapes control characters in a record's message and text ``extra`` fields.

    A logger filter runs once, where the record is made, before any handler
    formats it: every handler (distributed's stderr, the logging entry's JSON
    or console) then shows one line per record, whatever a task key, an event
    topic or an exception message holds. A traceback (``exc_info``) stays as
    Python prints it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if isinstance(record.msg, str):
                message = record.getMessage()
                escaped = escape_control(message)
                if escaped != message:
                    record.msg, record.args = escaped, ()
            for name, value in list(vars(record).items()):
                if isinstance(value, str) and name not in _RECORD_ATTRS:
                    setattr(record, name, escape_control(value))
        except Exception:  # a bad format string is logging's to report, not ours
            pass
        return True


#: The one filter instance, so installing it twice adds it once.
LOG_ESCAPE = _EscapeControl()


def escape_log_lines(names: Iterable[str]) -> None:
    """Put the escaping filter on the loggers the catalog writes with."""
    for name in names:
        log = logging.getLogger(name)
        if LOG_ESCAPE not in log.filters:
            log.addFilter(LOG_ESCAPE)
