"""Cluster-wide status: which catalog entries are active where, and their errors."""

from __future__ import annotations

from typing import Any

from dask.utils import format_bytes

from catalog._runtime import client_call
from catalog._secrets import mask, mask_text
from catalog._text import escape_control

__all__ = ["local_status", "status", "status_text"]

NOT_INSTALLED = "catalog is not installed on this server"


def local_status(
    dask_server: Any = None, dask_worker: Any = None, dask_scheduler: Any = None
) -> dict:
    """The catalog's status on one server (run there by ``client.run``)."""
    from catalog._entry import active_plugins
    from catalog._version import __version__

    server = dask_server or dask_worker or dask_scheduler
    return {
        "catalog": __version__,
        "entries": {
            plugin.entry.name: plugin.status()
            for plugin in active_plugins(server).values()
        },
    }


def _as_status(result: Any) -> dict:
    if isinstance(result, dict):
        return result
    # client.run(on_error="return") gives the exception of a server that could
    # not run the function: most often one without the catalog installed, whose
    # ModuleNotFoundError may arrive wrapped in a plain Exception.
    cause = f"{type(result).__name__}: {result}"
    missing = "No module named 'catalog" in cause
    return {
        "catalog": None,
        "entries": {},
        "error": NOT_INSTALLED if missing else cause,
    }


def status(client: Any) -> Any:
    """Which entries are active on the scheduler and on every worker.

    Returns a plain dict::

        {"scheduler": {"address": ..., "catalog": "0.1.0",
                       "entries": {"events": {"active": True, "options": {...},
                                              "last_error": None, "errors": 0, ...}}},
         "workers": {"tcp://...": {"catalog": "0.1.0", "entries": {...}}, ...},
         "nannies": {"tcp://...": {...}}}

    A worker without the catalog installed shows ``"catalog": None`` and an
    ``"error"`` saying so, rather than failing the call. Secrets are masked
    (``****``): values of secret options, of secret-looking ``NAME=value`` pairs,
    and credentials inside URLs, here too for servers running an older catalog.

    With ``Client(asynchronous=True)`` an awaitable of the dict is returned, as
    distributed's own client methods do.
    """
    return client_call(client, _status, client)


async def _status(client: Any) -> dict:
    try:
        scheduler = _as_status(await client.run_on_scheduler(local_status))
    except Exception as exc:  # a scheduler without the catalog
        scheduler = _as_status(exc)
    scheduler["address"] = client.scheduler.address
    workers = await client.run(local_status, on_error="return")
    out = {
        "scheduler": scheduler,
        "workers": {
            addr: _as_status(result) for addr, result in sorted(workers.items())
        },
    }
    try:
        nannies = await client.run(local_status, nanny=True, on_error="return")
    except Exception:  # no nannies at all
        nannies = {}
    out["nannies"] = {
        addr: _as_status(result)
        for addr, result in sorted(nannies.items())
        if not isinstance(result, dict) or result.get("entries")
    }
    return mask(out)


def status_text(data: dict) -> str:
    """A table of :func:`status` output for people."""
    lines = []

    def server(role: str, address: str, info: dict) -> None:
        version = info.get("catalog") or "-"
        lines.append(f"{role} {address}  (catalog {version})")
        if info.get("error"):
            lines.append(f"  {mask_text(info['error'])}")
        if not info.get("entries") and not info.get("error"):
            lines.append("  no catalog entry active")
        for name, entry in sorted(info.get("entries", {}).items()):
            state = "active" if entry["active"] else "INACTIVE"
            options = ", ".join(f"{k}={v!r}" for k, v in mask(entry["options"]).items())
            lines.append(f"  {name:<9} {state:<8} {options}")
            if entry.get("memory") is not None:
                lines.append(f"            holds {format_bytes(entry['memory'])}")
            if entry.get("last_error"):
                error = mask_text(entry["last_error"])
                lines.append(f"            last error ({entry['errors']}): {error}")

    server("scheduler", data["scheduler"]["address"], data["scheduler"])
    for address, info in data["workers"].items():
        server("worker", address, info)
    for address, info in data.get("nannies", {}).items():
        server("nanny", address, info)
    # Errors and option values can carry a task's or a worker's text.
    return "\n".join(escape_control(line) for line in lines)
