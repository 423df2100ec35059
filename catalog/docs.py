"""Docs generated from the entries' declarations (options tables, config reference)."""

from __future__ import annotations

import json

from catalog._config import GLOBAL_DEFAULTS
from catalog._registry import builtin_names, entry_module

__all__ = ["config_reference", "options_table"]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def options_table(name: str) -> str:
    """The Markdown options table of entry ``name``: one row per option."""
    entry = entry_module(name).dask_setup.entry
    rows = [
        "| option | CLI flag | Python | config key / env var | default | accepts |",
        "|---|---|---|---|---|---|",
    ]
    for opt in entry.options:
        flag = f"`{entry.flag(opt)}`" + (" (repeatable)" if opt.multiple else "")
        rows.append(
            "| "
            + " | ".join(
                [
                    f"**{opt.name}**"
                    + (" (secret: shown as `****`)" if opt.secret else "")
                    + f"<br>{_cell(opt.help)}",
                    flag,
                    f"`{opt.keyword}=`",
                    f"`{entry.config_key(opt)}`<br>`{entry.env_var(opt)}`",
                    f"`{_cell(json.dumps(opt.default))}`",
                    _cell(opt.type.describe()),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def config_reference() -> str:
    """Every config key of the catalog, for docs/reference/config.md."""
    parts = ["| key | default |", "|---|---|"]
    parts += [
        f"| `catalog.{key}` | `{_cell(json.dumps(value))}` |"
        for key, value in GLOBAL_DEFAULTS.items()
    ]
    for name in builtin_names():
        entry = entry_module(name).dask_setup.entry
        for opt in entry.options:
            default = _cell(json.dumps(opt.default))
            parts.append(f"| `{entry.config_key(opt)}` | `{default}` |")
    return "\n".join(parts)
