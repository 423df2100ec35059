"""Shared fixtures. catalog is imported before distributed.utils_test on purpose.

gen_cluster resets dask config to a snapshot taken when distributed.utils_test is
imported; importing catalog first puts the catalog's defaults in that snapshot.
"""

from __future__ import annotations

import distributed.utils_test  # noqa: F401

import catalog  # noqa: F401  (must come before distributed.utils_test)

pytest_plugins = ["tests.procs"]
