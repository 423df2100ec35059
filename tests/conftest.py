"""Shared fixtures. catalog is imported before distributed.utils_test on purpose.

gen_cluster resets dask config to a snapshot taken when distributed.utils_test is
imported; importing catalog first puts the catalog's defaults in that snapshot.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

# isort: off
import catalog  # noqa: F401  (must come before distributed.utils_test)
import distributed.utils_test  # noqa: F401

# isort: on

pytest_plugins = ["tests.procs"]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> SimpleNamespace:
    """A test CA and a certificate for 127.0.0.1 signed by it, as PEM files.

    ``ca``: the CA certificate; ``cert`` / ``key``: the server's chain and key in
    files of their own; ``combined``: key and chain in one file.
    """
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    where = tmp_path_factory.mktemp("tls")
    files = SimpleNamespace(
        ca=str(where / "ca.pem"),
        cert=str(where / "cert.pem"),
        key=str(where / "key.pem"),
        combined=str(where / "combined.pem"),
    )
    ca.cert_pem.write_to_path(files.ca)
    issued.private_key_pem.write_to_path(files.key)
    for i, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(files.cert, append=i > 0)
    issued.private_key_and_cert_chain_pem.write_to_path(files.combined)
    return files


@pytest.fixture
def slow_interrupter(monkeypatch) -> None:
    """The thread that delivers an interrupt pauses half a second right after.

    The task fails, and its client hears of it, while that thread has not yet
    done its bookkeeping: what the client sees must already be counted.
    """
    import threading
    import time

    from catalog._runtime import Firing

    fire = Firing.fire

    def fire_then_pause(self, *args, **kwargs):
        delivered = fire(self, *args, **kwargs)
        if delivered and threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        return delivered

    monkeypatch.setattr(Firing, "fire", fire_then_pause)
