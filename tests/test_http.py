"""The standalone /metrics server (catalog._http): bounded, with TLS and basic auth.

#22 point 6: prometheus_client's server spent one thread per connection with no
timeout (300 idle connections took a worker from 4 to 303 threads). And point 5:
the standalone port takes basic authentication and TLS.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import click
import pytest
from distributed.utils_test import captured_logger, gen_cluster
from prometheus_client import CollectorRegistry, Counter

from catalog import _http
from catalog._entry import EntrySetupError, OptionError
from catalog._http import MetricsServer
from catalog.metrics import Metrics
from tests.procs import LOOPBACK, worker_command
from tests.test_metrics import wait_until

# -- helpers -------------------------------------------------------------------


def get(
    url: str,
    cafile: str | None = None,
    auth: tuple[str, str] | None = None,
    timeout: float = 10,
) -> str:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
        return answer.read().decode()


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("catalog_test_things", "Things.", registry=reg).inc(3)
    return reg


def address_of(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


# -- the server alone ----------------------------------------------------------------


def test_serves_the_registry():
    server = MetricsServer(registry(), LOOPBACK, 0)
    try:
        assert server.url.startswith(f"http://{LOOPBACK}:")
        assert "catalog_test_things_total 3.0" in get(server.url)
    finally:
        server.close()
    with pytest.raises(OSError):
        get(server.url, timeout=2)


def test_silent_connections_time_out_and_free_their_slot():
    server = MetricsServer(registry(), LOOPBACK, 0, timeout=0.3, max_connections=2)
    silent = [socket.create_connection(address_of(server.url)) for _ in range(2)]
    try:
        # Both slots are taken by clients that say nothing; the server hangs
        # up on them after its timeout, and a scrape gets through again.
        text = wait_until(lambda: get(server.url, timeout=5), timeout=30, interval=0.05)
        assert "catalog_test_things_total" in text
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""  # closed by the server
    finally:
        for sock in silent:
            sock.close()
        server.close()


def test_over_the_cap_connections_are_closed_without_a_thread():
    server = MetricsServer(registry(), LOOPBACK, 0, max_connections=3)
    before = threading.active_count()
    socks = [socket.create_connection(address_of(server.url)) for _ in range(50)]
    try:
        wait_until(
            lambda: server.rejected >= 47,
            timeout=30,
            interval=0.05,
            why=lambda: f"{server.rejected=}",
        )
        assert threading.active_count() - before <= 3
    finally:
        for sock in socks:
            sock.close()
    assert "catalog_test_things_total" in wait_until(lambda: get(server.url), 30, 0.05)
    server.close()


def test_tls_handshake_of_a_silent_client_stalls_nobody(tls_files):
    # prometheus_client's TLS server shakes hands inside accept(): one client
    # that connects and says nothing stalls every later scrape.
    server = MetricsServer(registry(), LOOPBACK, 0, certfile=tls_files.combined)
    silent = socket.create_connection(address_of(server.url))
    try:
        assert server.url.startswith("https://")
        text = get(server.url, cafile=tls_files.ca, timeout=5)
        assert "catalog_test_things_total" in text
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(server.url, timeout=5)  # a client without the CA refuses
    finally:
        silent.close()
        server.close()


@pytest.mark.parametrize(
    "auth",
    [None, ("scraper", "wrong"), ("other", "right-pw"), ("scraper", "")],
)
def test_basic_auth_refuses_missing_or_wrong_credentials(auth):
    server = MetricsServer(
        registry(), LOOPBACK, 0, username="scraper", password="right-pw"
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            get(server.url, auth=auth)
        assert info.value.code == 401
        assert info.value.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert "catalog_test" not in info.value.read().decode()
        text = get(server.url, auth=("scraper", "right-pw"))
        assert "catalog_test_things_total 3.0" in text
    finally:
        server.close()


def test_a_bad_certificate_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        MetricsServer(registry(), LOOPBACK, 0, certfile=str(tmp_path / "none.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(OSError):
        MetricsServer(registry(), LOOPBACK, 0, certfile=str(bad))


# -- in the metrics entry --------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_idle_connections_do_not_take_a_thread_each(c, s, a):
    # The review's finding: 300 idle connections took a worker from 4 to 303
    # threads. Now at most MAX_CONNECTIONS threads serve connections.
    await c.register_plugin(Metrics(port=0))
    plugin = a.plugins[Metrics.name]
    url = plugin.status()["url"]
    before = threading.active_count()
    socks = [socket.create_connection(address_of(url), timeout=10) for _ in range(300)]
    try:
        over = 300 - _http.MAX_CONNECTIONS
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rejected = plugin.status().get("http_rejected", 0)
            if rejected >= over or threading.active_count() - before >= 300:
                break
            await asyncio.sleep(0.05)
        grown = threading.active_count() - before
        assert grown <= _http.MAX_CONNECTIONS + 2, f"{grown} more threads"
        assert plugin.status()["http_rejected"] >= over
    finally:
        for sock in socks:
            sock.close()

    def scrape():
        return wait_until(lambda: get(url), timeout=30, interval=0.05)

    assert "dask_catalog_" in await asyncio.to_thread(scrape)
    await c.unregister_worker_plugin(Metrics.name)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_port_with_tls_and_basic_auth(c, s, a, tls_files):
    files = tls_files
    await c.register_plugin(
        Metrics(
            port=0,
            port_certfile=files.cert,
            port_keyfile=files.key,
            port_username="scraper",
            port_password="right-pw",
        )
    )
    plugin = a.plugins[Metrics.name]
    url = plugin.status()["url"]
    assert url.startswith(f"https://{LOOPBACK}:")
    text = await asyncio.to_thread(get, url, files.ca, ("scraper", "right-pw"))
    assert "dask_catalog_worker_memory_limit_bytes" in text
    with pytest.raises(urllib.error.HTTPError, match="401"):
        await asyncio.to_thread(get, url, files.ca)
    with pytest.raises(OSError):  # plain http to a TLS port
        await asyncio.to_thread(get, url.replace("https", "http"), None, None, 5)
    assert "right-pw" not in repr(plugin) and "right-pw" not in str(plugin.status())
    await c.unregister_worker_plugin(Metrics.name)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_basic_auth_over_plain_http_warns(c, s, a):
    with captured_logger("catalog.metrics", level=logging.WARNING) as log:
        await c.register_plugin(
            Metrics(port=0, port_username="scraper", port_password="right-pw")
        )
    assert "plain http" in log.getvalue() and "right-pw" not in log.getvalue()
    await c.unregister_worker_plugin(Metrics.name)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_unreadable_certificate_is_a_setup_failure(c, s, a):
    missing = "/nonexistent/catalog-test/cert.pem"
    with pytest.raises(EntrySetupError, match="--metrics-port") as info:
        await c.register_plugin(Metrics(port=0, port_certfile=missing))
    assert "could not set up" in str(info.value) and missing in str(info.value)
    assert not a.plugins[Metrics.name].active
    await c.unregister_worker_plugin(Metrics.name)
    with pytest.raises(EntrySetupError, match="--metrics-pushgateway-cafile") as info:
        await c.register_plugin(
            Metrics(pushgateway="https://127.0.0.1:1", pushgateway_cafile=missing)
        )
    assert missing in str(info.value)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"port_username": "u", "port_password": "p"}, "needs --metrics-port"),
        ({"port": 0, "port_keyfile": "k.pem"}, "needs --metrics-port-certfile"),
        ({"port": 0, "port_username": "u"}, "go together"),
        ({"port": 0, "port_password": "p"}, "go together"),
        ({"pushgateway_cafile": "ca.pem"}, "needs --metrics-pushgateway"),
        (
            {"pushgateway": "http://g:9091", "pushgateway_cafile": "ca.pem"},
            "needs an https URL",
        ),
        (
            {
                "pushgateway": "https://u:p@g:9091",
                "pushgateway_username": "u",
                "pushgateway_password": "p",
            },
            "give them once",
        ),
    ],
)
def test_transport_options_that_go_together(options, problem):
    with pytest.raises(OptionError, match=problem) as info:
        Metrics(**options)
    assert "'p'" not in str(info.value) and "u:p@" not in str(info.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--preload", "catalog.metrics", "--metrics-port-password", "right-pw"],
        [
            *("--preload", "catalog", "--enable", "metrics"),
            *("--metrics-port", "0", "--metrics-port-username", "scraper"),
        ],
    ],
    ids=["entry", "umbrella"],
)
def test_cli_transport_options_that_go_together_are_a_usage_error(argv):
    from distributed.cli.dask_worker import main

    with pytest.raises(click.UsageError) as info:
        main.make_context("dask worker", [f"tcp://{LOOPBACK}:1", *argv])
    message = info.value.format_message()
    assert "invalid metrics options" in message and "--metrics-port" in message
    assert "right-pw" not in message


@pytest.mark.slow
def test_cli_worker_exits_2_on_options_that_go_together():
    result = subprocess.run(
        [
            *worker_command(f"tcp://{LOOPBACK}:1"),
            *("--preload", "catalog.metrics", "--metrics-port-username", "scraper"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "--metrics-port-username needs --metrics-port" in result.stderr
