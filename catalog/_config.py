"""The catalog's dask config defaults (catalog.yaml) and its default log handler."""

from __future__ import annotations

import logging
import os
from typing import Any

import dask.config
import yaml

__all__ = [
    "YAML_PATH",
    "expected_defaults",
    "register_defaults",
    "share_distributed_log_handler",
]

YAML_PATH = os.path.join(os.path.dirname(__file__), "catalog.yaml")


def register_defaults() -> None:
    """Register catalog.yaml as dask config defaults (never in the user's dir)."""
    with open(YAML_PATH) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


def expected_defaults() -> dict[str, Any]:
    """What catalog.yaml must hold: derived from the entries' declarations."""
    import catalog

    section: dict[str, Any] = {"strict": True, "enable": []}
    for module in catalog.entry_modules():
        entry = module.dask_setup.entry
        section[entry.name] = entry.defaults()
    return {"catalog": section}


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
