"""The dashboard entry's shared table of the workers' entry settings."""

from __future__ import annotations

import json
from typing import Any


class SharedSettings:
    """The workers' entry settings, each distinct one kept once.

    A fleet runs the same settings on every worker: sent once per worker, they
    were two thirds of ``data.json`` (320 kB at 100 workers). Each worker's
    entry status names its settings by reference into :attr:`table` instead.
    """

    def __init__(self) -> None:
        self.table: dict[str, Any] = {}
        self._refs: dict[str, str] = {}

    def refer(self, entries: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``entries`` whose ``options`` are references (``settings``)."""
        out: dict[str, Any] = {}
        for name, status in entries.items():
            if not isinstance(status, dict) or "options" not in status:
                out[name] = status
                continue
            status = dict(status)
            options = status.pop("options")
            text = json.dumps(options, sort_keys=True, default=str)
            ref = self._refs.get(text)
            if ref is None:
                ref = self._refs[text] = f"s{len(self._refs)}"
                self.table[ref] = options
            status["settings"] = ref
            out[name] = status
        return out
