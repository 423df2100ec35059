"""Secrets: which names and values look secret, and the one helper that masks them.

Every place that shows a value to a person (repr, log lines, errors,
``dask catalog status``, ``last_error``) passes it through :func:`mask` or
:func:`mask_text`, so a secret is hidden the same way everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "SECRET_WORDS", "looks_secret", "mask", "mask_text"]

MASK = "****"

#: Parts of a name that mark its value as secret (matched case-insensitively
#: anywhere in the name): ``PASS`` covers PASSWORD, PASSWD and PASSPHRASE,
#: ``PWD`` covers MYSQL_PWD, ``AUTH`` covers REDIS_AUTH and OAUTH, ``DSN`` covers
#: SENTRY_DSN. A harmless name that matches (``AUTHOR``) is masked too: hiding a
#: plain value costs less than showing a secret one.
SECRET_WORDS = (
    "TOKEN",
    "SECRET",
    "PASS",
    "PWD",
    "AUTH",
    "KEY",
    "CREDENTIAL",
    "DSN",
    "COOKIE",
    "SESSION",
    "PRIVATE",
    "SIGNATURE",
)

_SECRET_NAME = re.compile("|".join(SECRET_WORDS), re.IGNORECASE)

#: A whole ``NAME=value`` assignment (an environment variable, a logger level).
_ASSIGNMENT = re.compile(r"\s*[A-Za-z0-9_.-]+\s*")

#: ``scheme://userinfo@`` inside any text; the userinfo runs to the last ``@``
#: before the host, so an unescaped ``@`` in a password is hidden too.
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s'\"]*)@"
)

#: ``name=value`` inside free text: an assignment, a query parameter
#: (``?access_token=...``), a flag (``--x-password=...``).
_PAIR = re.compile(
    r"(?<![A-Za-z0-9_])(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)=(?P<value>[^\s&,;'\"]*)"
)


def looks_secret(name: str) -> bool:
    """Whether a variable, option or parameter called ``name`` holds a secret."""
    return _SECRET_NAME.search(name) is not None


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    # user:password keeps the user (it helps to debug); a lone userinfo is
    # often a token (https://TOKEN@host, a Sentry DSN's key): hide all of it.
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{match['scheme']}{shown}@"


def _mask_pair(match: re.Match[str]) -> str:
    if match["value"] and looks_secret(match["name"]):
        return f"{match['name']}={MASK}"
    return match[0]


def mask_text(text: str) -> str:
    """``text`` with secrets hidden: URL credentials and secret-looking pairs.

    A whole ``NAME=value`` string whose NAME looks secret loses its whole value
    (spaces included); otherwise credentials inside URLs (``user:****@``) and
    the values of secret-looking ``name=value`` pairs are replaced by ``****``.

    Example:
        >>> mask_text("DATABASE_URL=postgres://app:hunter2@db/prod")
        'DATABASE_URL=postgres://app:****@db/prod'
        >>> mask_text("DB_PASSWD=correct horse")
        'DB_PASSWD=****'
    """
    name, sep, _ = text.partition("=")
    if sep and _ASSIGNMENT.fullmatch(name) and looks_secret(name):
        return f"{name}={MASK}"
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    return _PAIR.sub(_mask_pair, text)


def mask(value: Any) -> Any:
    """A copy of ``value`` fit to show: strings through :func:`mask_text`.

    Lists, tuples and mappings are masked item by item; a mapping's string value
    under a secret-looking key is replaced whole. Other values come back as they
    are.
    """
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {
            key: (
                MASK
                if isinstance(key, str)
                and looks_secret(key)
                and isinstance(item, str)
                and item
                else mask(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [mask(item) for item in value]
    if isinstance(value, tuple):
        return tuple(mask(item) for item in value)
    return value
