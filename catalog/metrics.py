"""Prometheus histograms and counters per task prefix, on /metrics, by pull or push."""

from __future__ import annotations

import base64
import logging
import re
import ssl
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import HTTPSHandler, Request, build_opener

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

# Metrics-private helper modules, and the exposition side of _prom that only
# the entry serving /metrics uses (see catalog.entry's docstring for the rule).
import catalog._fine_metrics as _fine_metrics
import catalog._prom as _prom
from catalog._http import MetricsServer
from catalog.entry import (
    Boolean,
    Duration,
    Entry,
    FloatList,
    Integer,
    Option,
    OptionError,
    SchedulerEntryPlugin,
    Text,
    WorkerEntryPlugin,
    address_of,
    entry_preload,
    guards_itself,
    mask_text,
    prefix_of,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "ENTRY",
    "OUTPUT_BUCKETS",
    "Metrics",
    "SchedulerMetrics",
    "dask_setup",
    "dask_teardown",
]

logger = logging.getLogger("catalog.metrics")

#: A log-spaced ladder from 1 ms to 1 h (seconds).
DEFAULT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

#: Buckets of ``task_output_bytes``: powers of 8 from 1 KiB to 16 GiB.
OUTPUT_BUCKETS = tuple(float(2**n) for n in range(10, 35, 3))

#: Distinct ``exception`` label values before ``"other"``.
MAX_EXCEPTIONS = 100

#: Worker states in which a task's code is still running in a thread.
_RUNNING = frozenset({"executing", "long-running", "cancelled", "resumed"})

#: Scheduler states of a task that is ready to run (its inputs are in memory).
_READY = frozenset({"processing", "queued", "no-worker"})

#: Prefix names remembered with their numbers, past which a task's label is
#: looked up each time (names past max-prefixes can be unbounded).
_MAX_NAMES = 4096

#: The scheduler's clock (``time.time``, as distributed stamps tasks), bound once.
_now = time.time
_monotonic = time.monotonic

_EXCEPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")

PUSH_TIMEOUT = 10.0
FINAL_PUSH_TIMEOUT = 0.7


class MetricName(Text):
    """A Prometheus metric name prefix."""

    name = "metric-name"

    def __init__(self) -> None:
        super().__init__('a Prometheus name such as "dask_catalog"', nullable=False)

    def parse(self, value: Any) -> str:
        text = super().parse(value)
        if not re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
            raise ValueError(
                "letters, digits, '_' and ':' only, not starting with a digit"
            )
        return text


class Port(Integer):
    """A TCP port; 0 picks a free one."""

    name = "port"

    def __init__(self) -> None:
        super().__init__(0, nullable=True)
        self.accepted = "a TCP port from 0 to 65535 (0 picks a free port)"

    def parse(self, value: Any) -> int:
        port = super().parse(value)
        if port > 65535:
            raise ValueError("must be <= 65535")
        return port


class Url(Text):
    """An http(s) URL, optionally with ``user:password@`` for basic auth."""

    name = "url"

    def __init__(self) -> None:
        super().__init__('an http(s) URL such as "https://pushgateway:9091"')

    def parse(self, value: Any) -> str:
        text = super().parse(value)
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL with a host")
        return text


def _check_transport(settings: Any) -> None:
    """Options of the port and the Pushgateway that only make sense together."""

    def flag(name: str) -> str:
        return ENTRY.flag(ENTRY.option(name))

    problems = []
    for needs, given in (
        ("port", ("port-certfile", "port-keyfile", "port-username", "port-password")),
        (
            "pushgateway",
            ("pushgateway-username", "pushgateway-password", "pushgateway-cafile"),
        ),
    ):
        for name in given:
            if getattr(settings, ENTRY.option(name).keyword) is not None and (
                getattr(settings, needs) is None
            ):
                problems.append(f"{flag(name)} needs {flag(needs)}")
    if settings.port_keyfile is not None and settings.port_certfile is None:
        problems.append(f"{flag('port-keyfile')} needs {flag('port-certfile')}")
    for prefix in ("port", "pushgateway"):
        user = getattr(settings, f"{prefix}_username")
        password = getattr(settings, f"{prefix}_password")
        if (user is None) != (password is None):
            problems.append(
                f"{flag(prefix + '-username')} and {flag(prefix + '-password')} "
                "go together"
            )
    gateway = settings.pushgateway
    if gateway is not None:
        parts = urlsplit(gateway)
        if parts.username is not None and settings.pushgateway_username is not None:
            problems.append(
                f"credentials in {flag('pushgateway')} and "
                f"{flag('pushgateway-username')}: give them once"
            )
        if settings.pushgateway_cafile is not None and parts.scheme != "https":
            problems.append(f"{flag('pushgateway-cafile')} needs an https URL")
    if problems:
        msg = "invalid metrics options: " + "; ".join(dict.fromkeys(problems))
        raise OptionError(msg)


ENTRY = Entry(
    name="metrics",
    summary=(
        "Prometheus histograms and counters per task prefix on the existing /metrics, "
        "by pull or push"
    ),
    runs_on={
        "worker": "per-prefix task duration, outcome, output size, compute time, "
        "executing tasks and the memory limit on the worker's /metrics",
        "scheduler": "per-prefix task wait time and outcomes on the scheduler's "
        "/metrics",
        "nanny": "nothing (the nanny serves no /metrics; preload on the worker)",
        "client": "installs the worker and scheduler halves on the whole cluster",
    },
    options=[
        Option(
            "namespace",
            MetricName(),
            "dask_catalog",
            "Prefix of every metric family name.",
        ),
        Option(
            "buckets",
            FloatList(),
            list(DEFAULT_BUCKETS),
            "Histogram buckets in seconds for task durations and wait times.",
        ),
        Option(
            "max-prefixes",
            Integer(1),
            200,
            "Distinct task prefixes per server before the rest are reported as "
            'prefix="other".',
        ),
        Option(
            "prefix-buckets",
            Boolean(),
            False,
            "Keep every histogram bucket per task prefix (task_duration_seconds, "
            "task_output_bytes, task_peak_memory_bytes, scheduler_task_wait_seconds); "
            "off: those families are summaries, a count and a sum per prefix.",
        ),
        Option(
            "fine-metrics",
            Boolean(),
            True,
            "On the scheduler, also export distributed's fine performance metrics "
            "(time and bytes by task prefix, span and activity).",
        ),
        Option(
            "port",
            Port(),
            None,
            "Also serve this server's catalog families on a standalone HTTP server "
            "on this port (0 picks a free one), e.g. for --no-dashboard workers.",
        ),
        Option(
            "host",
            Text("a host name or IP address to bind", nullable=False),
            "127.0.0.1",
            "Address the standalone port binds to; 0.0.0.0 exposes it on every "
            "interface.",
        ),
        Option(
            "port-certfile",
            Text("a PEM certificate file"),
            None,
            "Serve the standalone port over https with this PEM certificate "
            "(chain); the key comes from port-keyfile or the same file.",
        ),
        Option(
            "port-keyfile",
            Text("a PEM private key file"),
            None,
            "The private key of port-certfile, when it is in a file of its own.",
        ),
        Option(
            "port-username",
            Text("a user name"),
            None,
            "Require HTTP basic authentication on the standalone port: this user, "
            "with port-password.",
        ),
        Option(
            "port-password",
            Text("a password"),
            None,
            "The password of port-username (pass it by config or environment "
            "variable, not on a command line).",
            secret=True,
        ),
        Option(
            "pushgateway",
            Url(),
            None,
            "URL of a Prometheus Pushgateway to push this server's metrics to; "
            "user:password@ in it is sent as basic authentication.",
        ),
        Option(
            "pushgateway-username",
            Text("a user name"),
            None,
            "Basic-authentication user for the Pushgateway, with pushgateway-password.",
        ),
        Option(
            "pushgateway-password",
            Text("a password"),
            None,
            "The password of pushgateway-username (pass it by config or environment "
            "variable, not on a command line).",
            secret=True,
        ),
        Option(
            "pushgateway-cafile",
            Text("a PEM file of CA certificates"),
            None,
            "CA certificates that an https Pushgateway's certificate must chain to "
            "(default: the system's).",
        ),
        Option(
            "push-interval",
            Duration(minimum="10ms", maximum="1d"),
            "15s",
            "Time between pushes to the Pushgateway (a final push happens at "
            "teardown).",
        ),
    ],
    examples=[
        "dask worker tcp://scheduler:8786 --preload catalog.metrics",
        "dask worker tcp://scheduler:8786 --no-dashboard --preload catalog.metrics "
        "--metrics-port 9100 --metrics-host 0.0.0.0",
        "dask scheduler --preload catalog.metrics --metrics-max-prefixes 50",
    ],
    check=_check_transport,
)


class _Exporter:
    """The standalone HTTP server and the Pushgateway pusher of one server."""

    def __init__(self, plugin: Any, server: Any) -> None:
        self.plugin = plugin
        self.settings = plugin.settings
        self.instance = address_of(server)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_prom.ProcessCollector(only=server))
        self.http: MetricsServer | None = None
        self.url: str | None = None
        self.pusher: threading.Thread | None = None
        self.stop_pushing = threading.Event()
        self.pushes = 0
        self.last_push: float | None = None

    def start(self) -> None:
        s = self.settings
        if s.port is not None:
            try:
                self.http = MetricsServer(
                    self.registry,
                    s.host,
                    s.port,
                    certfile=s.port_certfile,
                    keyfile=s.port_keyfile,
                    username=s.port_username,
                    password=s.port_password,
                    name=f"catalog.metrics http {self.plugin.role}",
                )
            except OSError as exc:
                flags = "--metrics-port" + (
                    ", --metrics-port-certfile" if s.port_certfile else ""
                )
                msg = f"cannot serve metrics on {s.host}:{s.port} ({flags}): {exc}"
                raise OSError(msg) from exc
            self.url = self.http.url
            logger.info("serving metrics of %s on %s", self.instance, self.url)
            if s.port_username is not None and s.port_certfile is None:
                _warn_cleartext("--metrics-port-username", self.url)
        if s.pushgateway is not None:
            self.gateway, username, password = _push_credentials(s)
            try:
                self.handler = _PushHandler(username, password, s.pushgateway_cafile)
            except OSError as exc:  # ssl.SSLError too
                msg = (
                    f"cannot load {s.pushgateway_cafile} "
                    f"(--metrics-pushgateway-cafile): {exc.strerror or exc}"
                )
                raise OSError(msg) from exc
            if username is not None and urlsplit(self.gateway).scheme == "http":
                _warn_cleartext("the Pushgateway's credentials", self.gateway)
            self.pusher = threading.Thread(
                target=self._push_loop,
                name=f"catalog.metrics pusher {self.instance}",
                daemon=True,
            )
            self.pusher.start()

    def push(self, timeout: float = PUSH_TIMEOUT) -> None:
        try:
            push_to_gateway(
                self.gateway,
                job="dask",
                registry=self.registry,
                grouping_key={"instance": self.instance},
                timeout=timeout,
                handler=self.handler,
            )
        except Exception as exc:
            self.plugin.report_error(f"push to {self.settings.pushgateway}", exc)
        else:
            self.pushes += 1
            self.last_push = time.time()

    def _push_loop(self) -> None:
        self.push()
        while not self.stop_pushing.wait(self.settings.push_interval):
            self.push()
        # The final push, so that a batch job's last numbers stay; short, so a
        # gateway that hangs never holds the server's shutdown.
        self.push(timeout=FINAL_PUSH_TIMEOUT)

    def stop(self) -> None:
        if self.pusher is not None:
            self.stop_pushing.set()
            # A periodic push still in flight finishes on its own (the thread is
            # a daemon); teardown waits for the final push only.
            self.pusher.join(FINAL_PUSH_TIMEOUT + 0.2)
            self.pusher = None
        if self.http is not None:
            self.http.close()
            self.http = None


def _warn_cleartext(what: str, url: str) -> None:
    logger.warning(
        "catalog.metrics: %s over plain http (%s): the password crosses the "
        "network in clear; use https",
        what,
        mask_text(url),
    )


def _push_credentials(settings: Any) -> tuple[str, str | None, str | None]:
    """The Pushgateway URL without ``user:password@``, and the credentials.

    urllib cannot send credentials that are part of a URL: they become basic
    authentication, and the URL that is requested no longer carries them.
    """
    url = settings.pushgateway
    parts = urlsplit(url)
    if parts.username is None:
        return url, settings.pushgateway_username, settings.pushgateway_password
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, unquote(parts.username), unquote(parts.password or "")


class _PushHandler:
    """The ``handler=`` given to ``push_to_gateway``: basic auth and a CA file.

    prometheus_client's ``basic_auth_handler`` verifies TLS against the system's
    CAs only and its ``tls_auth_handler`` requires a client certificate; this
    handler follows their contract (build the request, raise on failure) with
    one ``ssl`` context that verifies against ``cafile`` when given.
    """

    def __init__(
        self, username: str | None, password: str | None, cafile: str | None
    ) -> None:
        self.authorization = None
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode())
            self.authorization = f"Basic {token.decode()}"
        context = ssl.create_default_context(cafile=cafile)
        self.opener = build_opener(HTTPSHandler(context=context))

    def __call__(
        self,
        url: str,
        method: str,
        timeout: float | None,
        headers: list[tuple[str, str]],
        data: bytes,
    ) -> Callable[[], None]:
        def handle() -> None:
            request = Request(url, data=data, method=method)
            for name, value in headers:
                request.add_header(name, value)
            if self.authorization is not None:
                request.add_header("Authorization", self.authorization)
            # urllib raises HTTPError for a 4xx or 5xx answer.
            with self.opener.open(request, timeout=timeout):
                pass

        return handle


class _MetricsBase:
    """What the worker and scheduler halves share: families, port, pusher."""

    settings: Any
    fam: _prom.Families | None
    exporter: _Exporter | None

    def _start_families(self, server: Any, labels: dict[str, str]) -> _prom.Families:
        s = self.settings
        self.fam = _prom.Families(
            s.namespace, labels, s.max_prefixes, prefix_buckets=s.prefix_buckets
        )
        _prom.attach(server, self.fam)
        _prom.register_process_collector()
        return self.fam

    def _start_export(self, server: Any) -> None:
        # Last in setup: the first push must already see every family.
        self.exporter = _Exporter(self, server)
        self.exporter.start()

    def _stop_families(self, server: Any) -> None:
        # The final push needs the families still attached: stop exporting first.
        exporter = getattr(self, "exporter", None)
        if exporter is not None:
            self.exporter = None
            exporter.stop()
        collector = getattr(self, "_collector", None)
        if collector is not None:
            _prom.remove_collector(server, collector)
        if _prom.families_for(server) is getattr(self, "fam", None):
            _prom.detach(server)
        self.fam = None

    def memory(self) -> int | None:
        """Bytes of the per-prefix numbers and of the tasks in flight."""
        stats = dict(getattr(self, "_stats", {}))
        total = sys.getsizeof(stats)
        for st in stats.values():
            total += sys.getsizeof(st) + sum(
                sys.getsizeof(part)
                for name in st.__slots__
                for part in _parts(getattr(st, name))
            )
        pending = getattr(self, "_running", None) or getattr(self, "_ready", {})
        # A key's own object belongs to distributed; the entry adds its slot.
        return total + sys.getsizeof(pending) + 64 * len(pending)

    def _export_status(self) -> dict[str, Any]:
        exporter = getattr(self, "exporter", None)
        if exporter is None:
            return {"url": None, "pushes": 0, "last_push": None, "http_rejected": 0}
        return {
            "url": exporter.url,
            "pushes": exporter.pushes,
            "last_push": exporter.last_push,
            "http_rejected": exporter.http.rejected if exporter.http else 0,
        }


def _parts(value: Any) -> Iterator[Any]:
    """The containers inside one per-prefix number (histogram lists, dicts)."""
    if isinstance(value, _prom.Histogram):
        yield value.counts
    elif isinstance(value, dict):
        yield value


class _WorkerPrefix:
    """Plain per-prefix counts of a worker, written by the event loop only."""

    __slots__ = (
        "compute",
        "duration",
        "error",
        "errors",
        "finished",
        "output",
        "seen",
        "success",
    )

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.success = 0
        self.error = 0
        self.finished = False  # the outcome and histogram series exist
        self.compute = 0.0  # seconds of finished runs
        self.seen = 0.0  # the compute total last scraped (never step back)
        self.duration = _prom.Histogram(buckets)
        self.output = _prom.Histogram(OUTPUT_BUCKETS)
        self.errors: dict[str, int] = {}


class Metrics(_MetricsBase, WorkerEntryPlugin):
    """Per-prefix task metrics of a worker, for Prometheus.

    Every series carries the label ``worker`` (the worker's address), so several
    workers in one process never collide. The families appear on the worker's
    dashboard ``/metrics``; ``port`` adds a standalone HTTP server and
    ``pushgateway`` pushes them.

    The hook only adds to plain per-prefix numbers; the Prometheus families are
    built from them when ``/metrics`` is scraped.

    Args:
        namespace: prefix of the family names (``dask_catalog``).
        buckets: histogram buckets in seconds.
        max_prefixes: distinct prefixes before ``prefix="other"``.
        prefix_buckets: keep histogram buckets per prefix (else count and sum).
        port: serve this worker's families on this port too (0: a free one).
        host: where ``port`` binds (``127.0.0.1``).
        pushgateway: URL of a Prometheus Pushgateway.
        push_interval: seconds between pushes (``"15s"``).

    Example:
        >>> from distributed import Client, LocalCluster
        >>> from prometheus_client import generate_latest
        >>> import catalog
        >>> cluster = LocalCluster(n_workers=1, processes=False, protocol="tcp",
        ...                        host="127.0.0.1", dashboard_address="127.0.0.1:0")
        >>> client = Client(cluster)
        >>> _ = client.register_plugin(catalog.Metrics(max_prefixes=50))
        >>> client.submit(sum, [1, 2]).result()
        3
        >>> b"dask_catalog_tasks_total" in generate_latest()
        True
        >>> client.close(); cluster.close()
    """

    entry = ENTRY

    def on_setup(self, worker: Any) -> None:
        self.worker = worker
        self._tasks = worker.state.tasks
        self._buckets = tuple(self.settings.buckets)
        # key -> (its prefix's numbers, monotonic start) while it runs.
        self._running: dict[Any, tuple[_WorkerPrefix, float]] = {}
        self._stats: dict[str, _WorkerPrefix] = {}
        self._by_name: dict[str, _WorkerPrefix] = {}
        self._exceptions: set[str] = set()
        fam = self._start_families(worker, {"worker": worker.address})
        self._prefix = fam.prefix
        self._collector = _WorkerCollector(self)
        _prom.add_collector(worker, self._collector)
        self._start_export(worker)

    def on_teardown(self, worker: Any) -> None:
        self._stop_families(worker)

    def _stats_of(self, name: str) -> _WorkerPrefix:
        """The numbers of prefix ``name`` (its label's: ``other`` past the limit)."""
        label = self._prefix(name)
        stats = self._stats.get(label)
        if stats is None:
            stats = self._stats[label] = _WorkerPrefix(self._buckets)
        # Remembered by name, so the next task of the prefix skips the label
        # lookup; bounded, as prefix names past the limit can be many.
        if len(self._by_name) < _MAX_NAMES:
            self._by_name[name] = stats
        return stats

    @guards_itself
    def transition(
        self,
        key: Any = None,
        start: str = "",
        finish: str = "",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        try:
            if finish == "executing":
                running = self._running
                if key not in running:
                    ts = self._tasks.get(key)
                    name = ts.prefix if ts is not None else prefix_of(key)
                    stats = self._by_name.get(name)
                    if stats is None:
                        stats = self._stats_of(name)
                    running[key] = (stats, _monotonic())
                return
            if finish in _RUNNING:
                return
            run = self._running.pop(key, None)
            if run is None:
                return
            stats, began = run
            elapsed = _monotonic() - began
            stats.compute += elapsed
            if finish == "memory":
                stats.finished = True
                ts = self._tasks.get(key)
                took = _compute_time(ts, elapsed)
                # Histogram.observe written out: one call less per task.
                h = stats.duration
                h.counts[bisect_left(h.buckets, took)] += 1
                h.sum += took
                stats.success += 1
                if ts is not None:
                    nbytes = ts.nbytes
                    if nbytes is not None:
                        h = stats.output
                        h.counts[bisect_left(h.buckets, nbytes)] += 1
                        h.sum += nbytes
            elif finish == "error":
                stats.finished = True
                ts = self._tasks.get(key)
                stats.duration.observe(_compute_time(ts, elapsed))
                stats.error += 1
                name = self._exception_label(ts)
                stats.errors[name] = stats.errors.get(name, 0) + 1
        except Exception as exc:
            self.report_error("transition", exc)

    def _exception_label(self, ts: Any) -> str:
        text = getattr(ts, "exception_text", "") or ""
        found = _EXCEPTION_NAME.match(text)
        name = found.group(0).rsplit(".", 1)[-1] if found else "Exception"
        if name not in self._exceptions:
            if len(self._exceptions) >= MAX_EXCEPTIONS:
                return _prom.OTHER
            self._exceptions.add(name)
        return name

    def status(self) -> dict[str, Any]:
        return {**super().status(), **self._export_status()}


def _compute_time(ts: Any, fallback: float) -> float:
    """The worker's own measure of the compute (no event-loop latency)."""
    if ts is not None:
        for startstop in reversed(ts.startstops):
            if startstop["action"] == "compute":
                return max(0.0, startstop["stop"] - startstop["start"])
    return fallback


class _WorkerCollector:
    """The worker's families, built from the plugin's plain numbers at scrape time."""

    def __init__(self, plugin: Metrics) -> None:
        self.plugin = plugin

    def collect(self, fam: _prom.Families) -> Iterator[Metric]:
        p = self.plugin
        ns, address = fam.namespace, p.worker.address
        now = time.monotonic()
        # The hook writes on the event loop; a scrape may run in another thread
        # (standalone port, pusher): dict copies are atomic, iterating is not.
        stats = dict(p._stats)
        running = list(p._running.values())
        totals = {label: st.compute for label, st in stats.items()}
        executing = dict.fromkeys(stats, 0)
        by_stats = {id(st): label for label, st in stats.items()}
        for st, began in running:
            label = by_stats.get(id(st))
            if label is not None:
                totals[label] += now - began
                executing[label] += 1
        finished = [(label, st) for label, st in stats.items() if st.finished]
        worker_prefix = ["worker", "prefix"]

        tasks = CounterMetricFamily(
            f"{ns}_tasks",
            "Tasks finished, by outcome (success or error).",
            labels=["worker", "prefix", "outcome"],
        )
        errors = CounterMetricFamily(
            f"{ns}_task_errors",
            "Tasks that raised, by exception type.",
            labels=["worker", "prefix", "exception"],
        )
        for label, st in finished:
            tasks.add_metric([address, label, "success"], st.success)
            if st.error:
                # 200 prefixes x a zero series each were an eighth of a scrape;
                # the error series starts with the first error, as
                # task_errors_total{exception} always did.
                tasks.add_metric([address, label, "error"], st.error)
            for name, count in list(st.errors.items()):
                errors.add_metric([address, label, name], count)
        yield tasks
        yield errors
        yield self._histogram(
            fam,
            "task_duration_seconds",
            "Execution time of finished tasks.",
            [(label, st.duration) for label, st in finished],
        )
        yield self._histogram(
            fam,
            "task_output_bytes",
            "Size of each task's result.",
            [(label, st.output) for label, st in finished],
        )
        compute = CounterMetricFamily(
            f"{ns}_task_compute_seconds",
            "Compute time of tasks, including the time so far of tasks still running.",
            labels=worker_prefix,
        )
        for label, value in totals.items():
            # A cancelled task's time moves from running to done: never let a
            # counter step back between two scrapes.
            st = stats[label]
            st.seen = value = max(value, st.seen)
            compute.add_metric([address, label], value)
        yield compute
        gauge = GaugeMetricFamily(
            f"{ns}_tasks_executing", "Tasks executing now.", labels=worker_prefix
        )
        for label, count in executing.items():
            gauge.add_metric([address, label], count)
        yield gauge
        limit = GaugeMetricFamily(
            f"{ns}_worker_memory_limit_bytes",
            "The worker's memory limit (absent when the worker has none).",
            labels=["worker"],
        )
        memory_limit = getattr(p.worker.memory_manager, "memory_limit", None)
        if memory_limit:
            limit.add_metric([address], memory_limit)
        yield limit

    def _histogram(
        self,
        fam: _prom.Families,
        name: str,
        doc: str,
        series: list[tuple[str, _prom.Histogram]],
    ) -> Metric:
        address = self.plugin.worker.address
        return _prom.histogram_family(
            f"{fam.namespace}_{name}",
            doc,
            ["worker", "prefix"],
            [((address, label), h) for label, h in series],
            per_bucket=fam.prefix_buckets,
        )


class _SchedulerPrefix:
    """Plain per-prefix counts of the scheduler, written by its event loop."""

    __slots__ = ("compute", "error", "success", "wait")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.success = 0
        self.error = 0
        self.wait = _prom.Histogram(buckets)
        #: Compute times as the scheduler hears of them, for the dashboard
        #: page (not a family: the workers export theirs).
        self.compute = _prom.Histogram(buckets)


class SchedulerMetrics(_MetricsBase, SchedulerEntryPlugin):
    """Per-prefix task wait times and outcomes on the scheduler, for Prometheus.

    The wait time runs from the moment a task is ready to run (all its inputs in
    memory) to the moment its computation starts on a worker, in the scheduler's
    clock (the worker's start time is corrected by the worker's clock offset).

    It takes the same options as :class:`Metrics`; ``port`` and
    ``pushgateway`` serve or push the scheduler's families.

    Example:
        >>> from distributed import Client, LocalCluster
        >>> from prometheus_client import generate_latest
        >>> import catalog
        >>> cluster = LocalCluster(n_workers=1, processes=False, protocol="tcp",
        ...                        host="127.0.0.1", dashboard_address="127.0.0.1:0")
        >>> client = Client(cluster)
        >>> _ = client.register_plugin(catalog.SchedulerMetrics())
        >>> client.submit(sum, [1, 2]).result()
        3
        >>> b"dask_catalog_scheduler_tasks_total" in generate_latest()
        True
        >>> client.close(); cluster.close()
    """

    entry = ENTRY

    def on_setup(self, scheduler: Any) -> None:
        self._tasks = scheduler.tasks
        self._workers = scheduler.workers
        self._buckets = tuple(self.settings.buckets)
        self._ready: dict[Any, float] = {}
        self._stats: dict[str, _SchedulerPrefix] = {}
        self._by_name: dict[str, _SchedulerPrefix] = {}
        self._prefix = self._start_families(scheduler, {}).prefix
        self._collector = _SchedulerCollector(self)
        _prom.add_collector(scheduler, self._collector)
        self._fine = _fine_metrics.install(self, scheduler)
        self._start_export(scheduler)

    def on_teardown(self, scheduler: Any) -> None:
        self._stop_families(scheduler)
        _fine_metrics.uninstall(scheduler, getattr(self, "_fine", None))
        self._ready = {}

    @guards_itself
    def transition(
        self,
        key: Any = None,
        start: str = "",
        finish: str = "",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Called for every transition of every task: decide on the two state
        # names first, and touch nothing else for the many that do not count.
        try:
            if finish in _READY:
                ready = self._ready
                if key not in ready:
                    ready[key] = _now()
                return
            if start not in _READY:
                return
            began_ready = self._ready.pop(key, None)
            if start != "processing" or (finish != "memory" and finish != "erred"):
                return
            ts = self._tasks.get(key)
            name = ts.prefix.name if ts is not None else prefix_of(key)
            stats = self._by_name.get(name)
            if stats is None:
                stats = self._stats_of(name)
            if finish == "memory":
                stats.success += 1
            else:
                stats.error += 1
            for startstop in kwargs.get("startstops") or ():
                if startstop["action"] == "compute":
                    # Histogram.observe written out: one call less per task.
                    began = startstop["start"]
                    took = startstop["stop"] - began
                    if took < 0.0:
                        took = 0.0
                    h = stats.compute
                    h.counts[bisect_left(h.buckets, took)] += 1
                    h.sum += took
                    if began_ready is not None:
                        ws = self._workers.get(kwargs.get("worker"))
                        offset = ws.time_delay if ws is not None else 0.0
                        wait = began + offset - began_ready
                        if wait < 0.0:
                            wait = 0.0
                        h = stats.wait
                        h.counts[bisect_left(h.buckets, wait)] += 1
                        h.sum += wait
                    break
        except Exception as exc:
            self.report_error("transition", exc)

    def _stats_of(self, name: str) -> _SchedulerPrefix:
        """The numbers of prefix ``name`` (its label's: ``other`` past the limit)."""
        label = self._prefix(name)
        stats = self._stats.get(label)
        if stats is None:
            stats = self._stats[label] = _SchedulerPrefix(self._buckets)
        # Remembered by name, so the next task of the prefix skips the label
        # lookup; bounded, as prefix names past the limit can be many.
        if len(self._by_name) < _MAX_NAMES:
            self._by_name[name] = stats
        return stats

    def status(self) -> dict[str, Any]:
        return {**super().status(), **self._export_status()}

    def snapshot(self) -> dict[str, dict]:
        """Per prefix label: ``{"success", "error", "wait": H, "compute": H}``.

        ``H`` is ``{"bounds", "counts" (per bucket, the last above every
        bound), "sum", "count"}``. ``compute`` is the compute time of each task
        from the worker's report (its ``compute`` startstop), in seconds.
        """
        buckets = list(getattr(self, "_buckets", ()))

        def plain(h: _prom.Histogram) -> dict[str, Any]:
            counts = list(h.counts)
            total = h.sum
            return {
                "bounds": buckets,
                "counts": counts,
                "sum": total,
                "count": sum(counts),
            }

        return {
            label: {
                "success": st.success,
                "error": st.error,
                "wait": plain(st.wait),
                "compute": plain(st.compute),
            }
            for label, st in dict(getattr(self, "_stats", {})).items()
        }


class _SchedulerCollector:
    """The scheduler's families, built from the plugin's numbers at scrape time."""

    def __init__(self, plugin: SchedulerMetrics) -> None:
        self.plugin = plugin

    def collect(self, fam: _prom.Families) -> Iterator[Metric]:
        stats = dict(self.plugin._stats)
        tasks = CounterMetricFamily(
            f"{fam.namespace}_scheduler_tasks",
            "Tasks finished on the scheduler, by outcome (success or error).",
            labels=["prefix", "outcome"],
        )
        for label, st in stats.items():
            tasks.add_metric([label, "success"], st.success)
            tasks.add_metric([label, "error"], st.error)
        yield _prom.histogram_family(
            f"{fam.namespace}_scheduler_task_wait_seconds",
            "Time from a task being ready on the scheduler to its computation "
            "starting on a worker.",
            ["prefix"],
            [((label,), st.wait) for label, st in stats.items()],
            per_bucket=fam.prefix_buckets,
        )
        yield tasks


dask_setup, dask_teardown = entry_preload(
    ENTRY, worker=Metrics, scheduler=SchedulerMetrics
)
