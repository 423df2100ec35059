"""The catalog's dask config defaults (catalog.yaml) and its default log handler."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable
from typing import Any

import dask.config
import yaml

__all__ = [
    "ENTRY_NAMES",
    "GLOBAL_DEFAULTS",
    "YAML_PATH",
    "expected_defaults",
    "register_defaults",
    "share_distributed_log_handler",
    "unknown_keys",
]

YAML_PATH = os.path.join(os.path.dirname(__file__), "catalog.yaml")

#: The keys directly under ``catalog`` that belong to no entry.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "strict": True,
    "enable": [],
    "follow-symlinks": False,
}


def register_defaults() -> None:
    """Register catalog.yaml as dask config defaults (never in the user's dir)."""
    with open(YAML_PATH) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


def expected_defaults() -> dict[str, Any]:
    """What catalog.yaml must hold: derived from the entries' declarations."""
    from catalog._registry import builtin_names, entry_module

    section: dict[str, Any] = dict(GLOBAL_DEFAULTS)
    for name in builtin_names():
        entry = entry_module(name).dask_setup.entry
        section[entry.name] = entry.defaults()
    return {"catalog": section}


def _kebab(key: Any) -> str:
    # dask config keeps an env var's key as given (lower-cased, underscores).
    return str(key).replace("_", "-")


#: Names of every entry made in this process, the catalog's and others'
#: (an entry author's ``Entry`` registers itself when it is built).
ENTRY_NAMES: set[str] = set()


def _unknown(
    where: str, given: Iterable[Any], known: list[str], only_close: bool = False
) -> list[str]:
    problems = []
    for key in given:
        if _kebab(key) in known:
            continue
        close = difflib.get_close_matches(_kebab(key), known, n=1)
        if only_close and not close:
            continue
        hint = (
            f"did you mean {where}.{close[0]}?"
            if close
            else f"the keys of {where} are: {', '.join(known)}"
        )
        problems.append(f"unknown config key {where}.{key} ({hint})")
    return problems


def unknown_keys(entry: str, options: Iterable[str]) -> list[str]:
    """Config keys under ``catalog`` and ``catalog.<entry>`` that nothing reads.

    Args:
        entry: the entry's name.
        options: its option names (kebab-case).

    Returns:
        One message per unknown key, naming the closest known key.
    """
    from catalog._registry import known_names

    section = dask.config.get("catalog", default=None)
    if not isinstance(section, dict):
        return []
    # A section of an entry from another package, not imported yet, is no typo:
    # at the top level only a near miss of a known name is reported.
    names = known_names()
    top = [*GLOBAL_DEFAULTS, *names, *sorted(ENTRY_NAMES - set(names))]
    problems = _unknown("catalog", section, top, only_close=True)
    own = next((v for k, v in section.items() if _kebab(k) == entry), None)
    if isinstance(own, dict):
        problems += _unknown(f"catalog.{entry}", own, list(options))
    return problems


def share_distributed_log_handler() -> None:
    """Let the ``catalog`` logger print where distributed's own lines go.

    distributed's default logging config puts a stderr handler on the
    ``distributed`` logger only; a guard's WARNING must reach the same stderr,
    in the same format, without the logging entry.
    """
    import distributed  # noqa: F401  (its import sets up its logging)

    ours = logging.getLogger("catalog")
    if ours.handlers:
        return
    theirs = [
        h
        for h in logging.getLogger("distributed").handlers
        if isinstance(h, logging.StreamHandler)
    ]
    if theirs:
        ours.addHandler(theirs[0])
        ours.setLevel(logging.INFO)
        ours.propagate = False


def write_yaml(path: str = YAML_PATH) -> None:
    """Regenerate catalog.yaml from the declarations (a maintainer's command)."""
    header = (
        "# dask-catalog's config defaults, registered on `import catalog`.\n"
        "# Generated from the entries' option declarations: do not edit by hand;\n"
        "# run python -c 'import catalog._config as c; c.write_yaml()'.\n"
    )
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(
            expected_defaults(), f, sort_keys=False, default_flow_style=False
        )
