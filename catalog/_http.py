"""A bounded /metrics HTTP server: a cap on connections, timeouts, TLS, basic auth.

prometheus_client's ``start_http_server`` spends one thread per connection and
never times one out: 300 idle connections made 300 threads in a worker. This
server serves the same WSGI app (``prometheus_client.make_wsgi_app``) with at most
``max_connections`` connections at a time (more are closed at once) and a
``timeout`` on every socket read and write, TLS handshake included.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.registry import Collector

__all__ = ["MetricsServer"]

#: Connections served at once; Prometheus scrapes one at a time per target.
MAX_CONNECTIONS = 8
#: Seconds a connection may stay silent (handshake, request, reading the answer).
TIMEOUT = 10.0

_REALM = 'Basic realm="dask-catalog metrics", charset="UTF-8"'


class _Handler(WSGIRequestHandler):
    """One request per connection, with the server's timeout, logging nothing."""

    server: _Server

    def setup(self) -> None:
        self.request.settimeout(self.server.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            # Deferred from accept() (see MetricsServer): a client that
            # connects and says nothing holds this thread only, for `timeout`.
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a scrape every few seconds is no news."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # A burst of connections waits in the kernel, not refused, while the
    # accept loop closes those over the cap.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        timeout: float,
        max_connections: int,
    ) -> None:
        self.address_family = family
        self.timeout = timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.rejected = 0
        self.failed = 0
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.rejected += 1  # over the cap: closed without a thread
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread could be started
            self.slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out, reset or failed its handshake: counted, not
        # printed (socketserver prints a traceback to stderr by default).
        self.failed += 1


def _basic_auth(
    app: Callable[..., Iterable[bytes]], username: str, password: str
) -> Callable[..., Iterable[bytes]]:
    """``app`` behind HTTP basic authentication (RFC 7617)."""
    expected = (username.encode(), password.encode())

    def authenticated(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        try:
            user, _, given = base64.b64decode(token, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            user, given = b"", b""
        # Compare both halves, always, in constant time.
        ok = hmac.compare_digest(user, expected[0])
        ok &= hmac.compare_digest(given, expected[1])
        if scheme.lower() == "basic" and ok:
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", _REALM), ("Content-Type", "text/plain")],
        )
        return [b"401 Unauthorized\n"]

    return authenticated


class MetricsServer:
    """Serve a registry's ``/metrics`` on ``host:port`` in a daemon thread.

    Args:
        registry: what to expose (a ``CollectorRegistry``).
        host: the address to bind.
        port: the port; 0 picks a free one.
        certfile: a PEM certificate chain: serve https (with ``keyfile``).
        keyfile: the certificate's PEM private key.
        username: require HTTP basic authentication with this user...
        password: ...and this password.
        timeout: seconds a connection may stay silent.
        max_connections: connections served at once; more are closed at once.
        name: the serving thread's name (the address is appended).

    Raises:
        OSError: the port cannot be bound, or the certificate or key cannot be
            loaded (``ssl.SSLError`` is an ``OSError``).
    """

    def __init__(
        self,
        registry: Collector,
        host: str,
        port: int,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        name: str = "catalog.metrics http",
    ) -> None:
        context = None
        if certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(certfile, keyfile)
            except OSError as exc:  # ssl.SSLError too; neither names the file
                files = certfile + (f" and {keyfile}" if keyfile else "")
                msg = f"cannot load the certificate {files}: {exc.strerror or exc}"
                raise OSError(msg) from exc
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.httpd = _Server((host, port), family, timeout, max_connections)
        app = make_wsgi_app(registry)
        if username is not None:
            app = _basic_auth(app, username, password or "")
        self.httpd.set_app(app)
        if context is not None:
            # The handshake happens in the connection's thread, under its
            # timeout, not in accept() where one silent client would stall all.
            self.httpd.socket = context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        address, bound = str(self.httpd.server_address[0]), self.httpd.server_port
        shown = f"[{address}]" if ":" in address else address  # IPv6
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://{shown}:{bound}/metrics"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            name=f"{name} {shown}:{bound}",
            daemon=True,
        )
        self.thread.start()

    @property
    def rejected(self) -> int:
        """Connections closed at once because ``max_connections`` were open."""
        return self.httpd.rejected

    @property
    def failed(self) -> int:
        """Connections that timed out, reset or failed their TLS handshake."""
        return self.httpd.failed

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
