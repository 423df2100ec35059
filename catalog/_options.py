"""Option types: one parser per kind of value, shared by CLI, Python and config."""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import click
from dask.utils import parse_bytes, parse_timedelta

from catalog._secrets import MASK, looks_secret, mask_text

__all__ = [
    "Boolean",
    "Choice",
    "Duration",
    "FloatList",
    "Integer",
    "LogLevel",
    "NameValue",
    "OptionType",
    "RotateSize",
    "Size",
    "SizeOrFraction",
    "Text",
]

NONE_WORDS = frozenset({"none", "off", "never", "null"})
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OptionType(click.ParamType):
    """A click type whose ``convert`` also parses Python and config values.

    ``convert`` must be idempotent: a value it returned converts to itself, because
    a CLI value is parsed by click first and checked again when the plugin is built.
    """

    #: What the option accepts, for error messages and the docs table.
    accepted: str = ""
    #: Whether ``None`` (or "none" / "off") means "not set".
    nullable: bool = False
    #: Whether values are secrets: a rejected value is never shown (``Option``
    #: sets it on its own copy of the type when declared ``secret=True``).
    secret: bool = False

    def parse(self, value: Any) -> Any:
        """Turn one value into its setting; raise ValueError with a short reason."""
        raise NotImplementedError

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if self.nullable and (
            value is None or (isinstance(value, str) and value.lower() in NONE_WORDS)
        ):
            return None
        try:
            return self.parse(value)
        except Exception as exc:  # dask's parsers raise IndexError, KeyError, ...
            shown = self.shown(value, str(exc))
            self.fail(f"{shown}; accepted: {self.accepted}", param, ctx)

    def shown(self, value: Any, reason: str = "") -> str:
        """A rejected value and why, for an error message, with secrets hidden.

        A secret is never echoed, not even inside the parser's reason; a value of
        the wrong shape (a mapping or list where one value belongs) shows only its
        type, since its items may be secrets that no name marks as such.
        """
        if self.secret:
            text = str(value)
            if text and reason:
                reason = reason.replace(repr(text), MASK).replace(text, MASK)
            shown = MASK
        elif isinstance(value, str):
            shown = repr(self.mask_rejected(value))
        elif value is None or isinstance(value, bool | int | float):
            shown = repr(value)
        else:
            shown = f"a {type(value).__name__}"
        return shown + (f" ({mask_text(reason)})" if reason else "")

    def mask_rejected(self, text: str) -> str:
        """A rejected string as an error message shows it."""
        return mask_text(text)

    def describe(self) -> str:
        """Accepted values, with the 'none' spelling where it applies."""
        return self.accepted + ("; or none" if self.nullable else "")


class Size(OptionType):
    """A number of bytes, spelled as dask spells sizes (``"4GiB"``, ``"500MB"``)."""

    name = "size"

    def __init__(self, nullable: bool = False) -> None:
        self.nullable = nullable
        self.accepted = 'a size such as "300MiB" or "2GB"'

    def parse(self, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("not a size")
        if isinstance(value, str) and not re.search(r"[A-Za-z]", value):
            # dask reads a bare "1.5" as 1 byte; a size must carry its unit.
            raise ValueError("a size needs a unit")
        nbytes = parse_bytes(value)
        if nbytes <= 0:
            raise ValueError("must be more than 0 bytes")
        return int(nbytes)


class RotateSize(Size):
    """A size with a unit at which a file rotates, or 0 for never."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = 'a size such as "100MiB", or 0 for never'

    def parse(self, value: Any) -> int:
        if not isinstance(value, bool) and str(value).strip() in ("0", "0.0"):
            return 0
        return super().parse(value)


class SizeOrFraction(OptionType):
    """A size with a unit, or a float in (0, 1]: a fraction of some total.

    A bare number above 1 is refused: ``parse_bytes("1.5")`` is 1 byte in dask,
    which is never what anyone meant.
    """

    name = "size-or-fraction"

    def __init__(self, of: str, nullable: bool = False) -> None:
        self.nullable = nullable
        self.accepted = (
            f'a fraction of the {of} in (0, 1] such as 0.9, or a size such as "2GiB"'
        )

    def parse(self, value: Any) -> float | int:
        if isinstance(value, bool):
            raise ValueError("not a size")
        if isinstance(value, int) and value > 1:
            return value  # already bytes (a value this type returned)
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            return Size().parse(text)
        if not 0 < number <= 1 or math.isnan(number):
            raise ValueError("a bare number must be a fraction in (0, 1]")
        return number


class Duration(OptionType):
    """Seconds, spelled as dask spells durations (``"500ms"``, ``"5m"``, ``2``).

    Args:
        nullable: whether none / off means "not set".
        minimum: the shortest accepted duration, in dask's spelling (``"10ms"``):
            a polling interval of ``"1ns"`` would spin a thread.
        maximum: the longest accepted duration, in dask's spelling.
    """

    name = "duration"

    def __init__(
        self,
        nullable: bool = False,
        minimum: str | None = None,
        maximum: str | None = None,
    ) -> None:
        self.nullable = nullable
        self.minimum, self.maximum = minimum, maximum
        self._range = (
            parse_timedelta(minimum) if minimum is not None else 0.0,
            parse_timedelta(maximum) if maximum is not None else math.inf,
        )
        self.accepted = 'a duration such as "500ms", "30s" or "5m"' + _range_text(
            minimum, maximum
        )

    def parse(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("not a duration")
        try:
            seconds = parse_timedelta(value, default="seconds")
        except KeyError:  # dask's message lists every spelling of every unit
            raise ValueError("unknown time unit") from None
        if seconds is None or not seconds > 0 or math.isinf(seconds):
            raise ValueError("must be more than 0")
        low, high = self._range
        if not low <= seconds <= high:
            raise ValueError("out of range")
        return float(seconds)


def _range_text(minimum: Any, maximum: Any) -> str:
    """``", from 10ms to 1h"``: the bounds of an option, for its messages and docs."""
    if minimum is not None and maximum is not None:
        return f", from {minimum} to {maximum}"
    if minimum is not None:
        return f", at least {minimum}"
    if maximum is not None:
        return f", at most {maximum}"
    return ""


class Integer(OptionType):
    """A whole number with a lower bound and, where huge values hurt, an upper one."""

    name = "integer"

    def __init__(
        self, minimum: int = 0, nullable: bool = False, maximum: int | None = None
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.nullable = nullable
        self.accepted = (
            f"a whole number >= {minimum}"
            if maximum is None
            else f"a whole number from {minimum} to {maximum}"
        )

    def parse(self, value: Any) -> int:
        if isinstance(value, bool) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise ValueError("not a whole number")
        try:
            number = int(str(value).strip()) if isinstance(value, str) else int(value)
        except ValueError:
            raise ValueError("not a whole number") from None
        if number < self.minimum:
            raise ValueError(f"must be >= {self.minimum}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"must be <= {self.maximum}")
        return number


class Choice(OptionType):
    """One word from a fixed list (case-insensitive)."""

    name = "choice"

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.accepted = "one of " + ", ".join(choices)

    def parse(self, value: Any) -> str:
        word = str(value).strip().lower()
        if word not in self.choices:
            raise ValueError("not a known choice")
        return word


class Text(OptionType):
    """Free text (a path, a URL, a host name)."""

    name = "text"

    def __init__(self, accepted: str = "text", nullable: bool = True) -> None:
        self.accepted = accepted
        self.nullable = nullable

    def parse(self, value: Any) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError("not text")
        text = str(value)
        if not text:
            raise ValueError("empty")
        return text


class Boolean(OptionType):
    """true / false, yes / no, 1 / 0."""

    name = "boolean"
    accepted = "true or false"
    TRUE = frozenset({"true", "yes", "on", "1"})
    FALSE = frozenset({"false", "no", "off", "0"})

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in self.TRUE:
            return True
        if word in self.FALSE:
            return False
        raise ValueError("not a boolean")


class LogLevel(OptionType):
    """A standard logging level name (DEBUG, INFO, WARNING, ERROR, CRITICAL)."""

    name = "level"
    LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    accepted = "one of " + ", ".join(LEVELS)

    def parse(self, value: Any) -> str:
        word = str(value).strip().upper()
        if word == "WARN":
            word = "WARNING"
        if word not in self.LEVELS:
            raise ValueError("not a logging level")
        return word

    @staticmethod
    def number(level: str) -> int:
        """The logging module's number for a parsed level name."""
        return logging.getLevelName(level)


class NameValue(OptionType):
    """``NAME=VALUE``: an environment variable assignment or a logger level."""

    name = "name=value"

    def __init__(
        self, accepted: str = "NAME=VALUE with NAME a valid environment variable name"
    ) -> None:
        self.accepted = accepted

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or "=" not in value:
            raise ValueError("missing '='")
        name, _, val = value.partition("=")
        name = name.strip()
        self.check(name, val)
        return f"{name}={val}"

    def check(self, name: str, value: str) -> None:
        """Validate the two halves; subclasses narrow what is accepted."""
        if not ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid variable name")

    def mask_rejected(self, text: str) -> str:
        # "API_TOKEN hunter2" (a space for the '='): whatever follows a
        # secret-looking name is hidden although no '=' marks it as a value.
        lead = re.match(r"\s*[A-Za-z0-9_]*", text)
        name = lead.group(0) if lead else ""
        if name != text and "=" not in text and looks_secret(name):
            return f"{name} {MASK}"
        return mask_text(text)


class FloatList(OptionType):
    """Increasing positive numbers, as a list or a comma-separated string."""

    name = "numbers"
    accepted = 'increasing numbers > 0, such as "0.01,0.1,1,10"'

    def parse(self, value: Any) -> tuple[float, ...]:
        items: Sequence[Any]
        if isinstance(value, str):
            items = [v for v in value.replace(" ", "").split(",") if v]
        elif isinstance(value, list | tuple):
            items = value
        else:
            raise ValueError("not a list of numbers")
        numbers = tuple(float(v) for v in items)
        if not numbers:
            raise ValueError("empty")
        if any(not (n > 0) or math.isinf(n) for n in numbers):
            raise ValueError("numbers must be > 0 and finite")
        if any(b <= a for a, b in itertools.pairwise(numbers)):
            raise ValueError("numbers must increase")
        return numbers
