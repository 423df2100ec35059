"""Option types: one parser per kind of value, shared by CLI, Python and config."""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import click
from dask.utils import format_bytes, parse_bytes, parse_timedelta

from catalog._secrets import MASK, looks_secret, mask_text

__all__ = [
    "MIN_MEMORY",
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
    "bare_number",
    "to_bytes",
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


#: The smallest memory amount a memory option takes: anything less is a unit
#: forgotten ("4" meant as 4GiB), never a limit anyone means.
MIN_MEMORY = 2**20
#: A number with no unit: dask's ``parse_bytes`` reads it as bytes.
_BARE_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?|[+-]?(nan|inf)")


def bare_number(value: Any) -> float | None:
    """``value`` as a float when it is a number without a unit, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    return float(text) if _BARE_NUMBER.fullmatch(text.lower()) else None


def to_bytes(value: Any) -> int:
    """A whole number of bytes from dask's spellings, as ``parse_bytes`` reads them.

    A bare whole number is bytes (``20000``, ``"20000"``), as in dask. Refused:
    booleans, negative sizes, a bare number that is not whole (dask would read
    ``"1.5"`` as 1 byte) and unknown units.
    """
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        nbytes = value
    else:
        text = str(value).strip()
        number = bare_number(text)
        if re.fullmatch(r"[+-]?\d+", text):
            nbytes = int(text)  # exact, however large
        elif number is not None:
            if not number.is_integer():
                raise ValueError(
                    "a bare number is a whole number of bytes; give a unit, "
                    'such as "1.5GiB"'
                )
            nbytes = int(number)
        else:
            try:
                nbytes = int(parse_bytes(text))
            except (ValueError, OverflowError, TypeError, KeyError) as exc:
                raise ValueError(f"not a known size or unit: {exc}") from None
    if nbytes < 0:
        raise ValueError("a size cannot be negative")
    return nbytes


class Size(OptionType):
    """A number of bytes: dask's spellings (``"4GiB"``, ``"500MB"``) or bare bytes.

    Args:
        nullable: ``None`` (or "none") means "not set".
        memory: the option is an amount of memory, not a file size: less than
            :data:`MIN_MEMORY` is refused as a forgotten unit.
    """

    name = "size"

    def __init__(self, nullable: bool = False, memory: bool = False) -> None:
        self.nullable = nullable
        self.memory = memory
        self.accepted = 'a size such as "300MiB" or "2GB", or a whole number of bytes'
        if memory:
            self.accepted += " (at least 1 MiB)"

    def parse(self, value: Any) -> int:
        nbytes = to_bytes(value)
        self.check(value, nbytes)
        return nbytes

    def check(self, value: Any, nbytes: int) -> None:
        """Refuse sizes the option cannot mean; subclasses allow more."""
        if nbytes == 0:
            raise ValueError("must be more than 0 bytes")
        if self.memory and nbytes < MIN_MEMORY:
            text = str(value).strip()
            if bare_number(value) is not None:
                raise ValueError(
                    f"{text} is {nbytes} bytes, below the 1 MiB a memory amount "
                    f"needs; did you mean {text}MiB or {text}GiB?"
                )
            raise ValueError(
                f"{format_bytes(nbytes)}, below the 1 MiB a memory amount needs"
            )


class RotateSize(Size):
    """A file size at which a file rotates, or 0 for never."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = (
            'a size such as "100MiB" or a whole number of bytes, or 0 for never'
        )

    def check(self, value: Any, nbytes: int) -> None:
        if nbytes:
            super().check(value, nbytes)


class SizeOrFraction(OptionType):
    """A float in (0, 1], a fraction of some total; or a memory amount.

    A bare number in (0, 1] is a fraction (``1`` is the whole total); a bare
    whole number above 1 is bytes, as everywhere in dask, so the 1 MiB floor of
    a memory amount applies to it (``4`` is refused, suggesting ``4GiB``). A
    bare number above 1 that is not whole (``1.5``) is refused:
    ``parse_bytes("1.5")`` is 1 byte in dask, which is never what anyone meant.
    """

    name = "size-or-fraction"

    def __init__(self, of: str, nullable: bool = False) -> None:
        self.nullable = nullable
        self.size = Size(memory=True)
        self.accepted = (
            f"a fraction of the {of} in (0, 1] such as 0.9, or {self.size.accepted}"
        )

    def parse(self, value: Any) -> float | int:
        number = bare_number(value)
        if number is not None:
            if 0 < number <= 1:
                return number
            if number < 0:
                raise ValueError("a size cannot be negative")
            if not number.is_integer() or number == 0:
                raise ValueError(
                    "a bare number must be a fraction in (0, 1] or a whole number "
                    'of bytes; give a unit, such as "1.5GiB"'
                )
        return self.size.parse(value)


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
