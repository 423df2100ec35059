"""Tests of the logging entry: options, formatter, in-process and real clusters."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys

import pytest
import structlog
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog._entry import OptionError
from catalog.logging import (
    FIELDS,
    SchedulerStructuredLogging,
    ServerContext,
    StructuredLogging,
    dask_setup,
    formatter,
)
from tests.procs import by_value, worker_command

NAME = "catalog.logging"


def logging_state() -> dict[str, tuple]:
    """Handlers, level and propagate of every logger, and structlog's config."""
    loggers = [logging.getLogger()] + [
        log
        for log in logging.Logger.manager.loggerDict.values()
        if isinstance(log, logging.Logger)
    ]
    # distributed adds a DequeHandler for every in-process server and never
    # removes it (servers of earlier tests may still be closing): its business.
    state = {
        log.name: (
            tuple(h for h in log.handlers if type(h).__name__ != "DequeHandler"),
            log.level,
            log.propagate,
        )
        for log in loggers
    }
    state["<structlog>"] = (structlog.is_configured(),)
    return state


def assert_restored(before: dict[str, tuple]) -> None:
    """Every logger that existed before is as it was; new ones are untouched."""
    after = logging_state()
    assert {k: after[k] for k in before} == before
    for name in set(after) - set(before):
        assert after[name] == ((), logging.NOTSET, True), name


def read_lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def record(msg, *args, exc_info=None, name="user"):
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, exc_info)


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def test_options_parse_and_normalise():
    plugin = StructuredLogging(
        format="LOGFMT",
        level="warn",
        logger=["distributed.worker=debug", "user=Error"],
        file="/tmp/x-{role}-{pid}.log",
        rotate_bytes="1KiB",
        backups=2,
    )
    s = plugin.settings
    assert s.format == "logfmt"
    assert s.level == "WARNING"
    assert s.logger == ("distributed.worker=DEBUG", "user=ERROR")
    assert s.file == "/tmp/x-{role}-{pid}.log"
    assert s.rotate_bytes == 1024
    assert s.backups == 2
    assert plugin.name == NAME
    assert StructuredLogging(rotate_bytes=0).settings.rotate_bytes == 0
    assert StructuredLogging(rotate_bytes="0").settings.rotate_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"format": "xml"}, "--logging-format"),
        ({"level": "LOUD"}, "--logging-level"),
        ({"logger": ["foo"]}, "--logging-logger"),
        ({"logger": ["foo=LOUD"]}, "--logging-logger"),
        ({"logger": ["a b=INFO"]}, "--logging-logger"),
        ({"rotate_bytes": "1.5"}, "--logging-rotate-bytes"),
        ({"backups": -1}, "--logging-backups"),
        ({"file": "/tmp/{worker}.log"}, "--logging-file"),
    ],
)
def test_bad_options_name_the_option(kwargs, named):
    with pytest.raises(OptionError, match=named):
        StructuredLogging(**kwargs)


def test_config_and_env_spelling(monkeypatch):
    import dask.config

    with dask.config.set({"catalog.logging.format": "console"}):
        assert StructuredLogging().settings.format == "console"
        assert StructuredLogging(format="json").settings.format == "json"
    entry = dask_setup.entry
    assert entry.env_var(entry.option("rotate-bytes")) == (
        "DASK_CATALOG__LOGGING__ROTATE_BYTES"
    )
    assert entry.defaults()["logger"] == []


def test_pickle_keeps_settings_only():
    plugin = SchedulerStructuredLogging(format="logfmt", logger=["a=DEBUG"])
    clone = pickle.loads(pickle.dumps(plugin))
    assert type(clone) is SchedulerStructuredLogging
    assert clone.settings == plugin.settings
    assert clone.name == NAME
    assert catalog.StructuredLogging is StructuredLogging


def test_dask_setup_click_parse():
    ctx = dask_setup.make_context(
        "dask_setup",
        [
            *("--logging-format", "logfmt", "--logging-logger", "a.b=debug"),
            *("--logging-logger", "c=ERROR", "--logging-rotate-bytes", "1MiB"),
        ],
    )
    given = dask_setup.entry.given_from_params(ctx.params)
    assert given == {
        "format": "logfmt",
        "logger": ("a.b=DEBUG", "c=ERROR"),
        "rotate_bytes": 1024**2,
    }
    bad = dask_setup.make_context("dask_setup", ["--logging-format", "xml"])
    assert "--logging-format" in bad.params["_usage_error"]
    assert "'xml'" in bad.params["_usage_error"]


# ---------------------------------------------------------------------------
# The formatter
# ---------------------------------------------------------------------------


def test_json_line_is_one_line_with_every_field():
    fmt = formatter("json", ServerContext([], host="h", pid=7))
    try:
        raise ValueError('bad "thing"\nsecond line')
    except ValueError:
        exc_info = sys.exc_info()
    line = fmt.format(record('say "%s"\nand more', "hi", exc_info=exc_info))
    assert "\n" not in line
    data = json.loads(line)
    assert set(FIELDS) <= set(data)
    assert data["event"] == 'say "hi"\nand more'
    assert data["level"] == "info"
    assert data["logger"] == "user"
    assert data["timestamp"].endswith("Z")
    assert (data["host"], data["pid"], data["role"]) == ("h", 7, None)
    assert "ValueError: bad" in data["exception"]
    assert "Traceback" in data["exception"]


def test_extra_fields_kept_internals_dropped():
    fmt = formatter("json")
    rec = record("x")
    rec.job = 42
    rec._private = 1
    rec.message = "pre-formatted"
    data = json.loads(fmt.format(rec))
    assert data["job"] == 42
    assert "_private" not in data
    assert "message" not in data


def test_logfmt_and_console():
    line = formatter("logfmt").format(record('a "b"\nc'))
    assert "\n" not in line
    assert line.startswith("timestamp=")
    assert r'event="a \"b\"\nc"' in line
    text = formatter("console").format(record("hello console"))
    assert "hello console" in text
    assert "[info" in text


# ---------------------------------------------------------------------------
# In-process clusters
# ---------------------------------------------------------------------------


def _task_logs(x):
    logging.getLogger("user").info("from stdlib %d", x)
    structlog.get_logger().info("from structlog", x=x)
    try:
        raise KeyError("boom")
    except KeyError:
        logging.getLogger("user").exception("with exception")
    return x


@gen_cluster(client=True)
async def test_worker_lines_carry_task_key(c, s, a, b, tmp_path):
    before = logging_state()
    path = tmp_path / "w.log"
    await c.register_plugin(StructuredLogging(file=str(path)))
    # Two workers in one process: one pipeline, one handler.
    assert a.plugins[NAME]._pipeline is b.plugins[NAME]._pipeline
    root = logging.getLogger()
    ours = a.plugins[NAME]._pipeline.handler
    assert root.handlers.count(ours) == 1
    assert logging.getLogger("distributed").handlers.count(ours) == 1

    future = c.submit(
        _task_logs,
        5,
        key="mytask-0123456789abcdef0123456789abcdef",
        workers=[b.address],
    )
    assert await future == 5
    logging.getLogger("distributed.worker").info("outside a task")

    await c.unregister_worker_plugin(NAME)
    assert_restored(before)

    lines = read_lines(path)
    by_event = {d["event"]: d for d in lines}
    for event in ("from stdlib 5", "from structlog", "with exception"):
        d = by_event[event]
        assert d["key"] == "mytask-0123456789abcdef0123456789abcdef"
        assert d["prefix"] == "mytask"
        assert d["role"] == "worker"
        assert d["address"] == b.address
        assert d["name"] == str(b.name)
    assert by_event["from structlog"]["x"] == 5
    assert "KeyError: 'boom'" in by_event["with exception"]["exception"]
    outside = by_event["outside a task"]
    assert "key" not in outside
    assert outside["role"] == "worker"
    for d in lines:
        assert set(FIELDS) <= set(d)
    assert os.stat(path).st_mode & 0o777 == 0o600


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_rotation_and_reregistration(c, s, a, tmp_path):
    before = logging_state()
    path = tmp_path / "r-{role}.log"
    plugin = StructuredLogging(file=str(path), rotate_bytes="1KiB", backups=2)
    await c.register_plugin(plugin)
    # Registering again replaces the plugin: still one handler.
    await c.register_plugin(plugin)
    handlers = [
        h
        for h in logging.getLogger().handlers
        if h.__class__.__name__ == "_PrivateRotatingFileHandler"
    ]
    assert len(handlers) == 1
    log = logging.getLogger("user")
    for i in range(40):
        log.warning("line %d %s", i, "x" * 50)
    await c.unregister_worker_plugin(NAME)
    assert_restored(before)
    real = tmp_path / "r-worker.log"
    assert real.exists()
    assert (tmp_path / "r-worker.log.1").exists()
    assert (tmp_path / "r-worker.log.2").exists()
    assert not (tmp_path / "r-worker.log.3").exists()
    for p in (real, tmp_path / "r-worker.log.1"):
        assert os.path.getsize(p) <= 1024
        assert all(d["role"] == "worker" for d in read_lines(p))


@gen_cluster(client=True, nthreads=[])
async def test_scheduler_and_client_roles(c, s, tmp_path):
    before = logging_state()
    path = tmp_path / "s.log"
    await c.register_plugin(SchedulerStructuredLogging(file=str(path)))
    plugin = s.plugins[NAME]
    assert plugin.active
    logging.getLogger("distributed.scheduler").warning("scheduler says")
    await plugin.close()
    assert_restored(before)
    (line,) = [d for d in read_lines(path) if d["event"] == "scheduler says"]
    assert (line["role"], line["address"], line["name"]) == (
        "scheduler",
        s.address,
        None,
    )

    cpath = tmp_path / "c.log"
    local = StructuredLogging(file=str(cpath), format="json")
    local.setup(c)
    logging.getLogger("distributed.client").warning("client says")
    local.teardown(c)
    assert_restored(before)
    (line,) = [d for d in read_lines(cpath) if d["event"] == "client says"]
    assert (line["role"], line["address"], line["name"]) == ("client", None, c.id)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_logger_levels_applied_and_restored(c, s, a, tmp_path):
    target = logging.getLogger("catalog.test.level")
    target.setLevel(logging.ERROR)
    before = logging_state()
    path = tmp_path / "l.log"
    await c.register_plugin(
        StructuredLogging(
            file=str(path), level="WARNING", logger=["catalog.test.level=DEBUG"]
        )
    )
    assert target.level == logging.DEBUG
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("catalog").level == logging.WARNING
    target.debug("debug shown")
    logging.getLogger("catalog.test.other").info("info hidden")
    logging.getLogger("catalog.test.other").warning("warning shown")
    await c.unregister_worker_plugin(NAME)
    assert_restored(before)
    assert target.level == logging.ERROR
    events = {d["event"]: d for d in read_lines(path)}
    assert events["debug shown"]["level"] == "debug"
    assert events["debug shown"]["logger"] == "catalog.test.level"
    assert events["warning shown"]["level"] == "warning"
    assert "info hidden" not in events


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_teardown_keeps_what_others_changed_since(c, s, a):
    """distributed's test_reconnect_timeout: a captured_logger taken while the
    entry runs must survive the entry's teardown (it used to be overwritten
    with the handlers saved at install)."""
    await c.register_plugin(StructuredLogging())
    with captured_logger("distributed.client") as capture:
        other = logging.getLogger("catalog.test.changed")
        other.setLevel(logging.CRITICAL)
        await c.unregister_worker_plugin(NAME)
        logging.getLogger("distributed.client").error("after teardown")
        assert "after teardown" in capture.getvalue()
    assert other.level == logging.CRITICAL


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_console_lines_go_where_distributed_writes(c, s, a, capsys, tmp_path):
    """distributed's test_print_remote / test_forward_output: with sys.stderr
    replaced after distributed bound its handler (a test's capsys, a
    notebook), the entry's lines go to distributed's stream, as its own do."""
    (theirs,) = [
        h
        for h in logging.getLogger("distributed").handlers
        if type(h) is logging.StreamHandler
    ]
    # A real file stream stands for the process's stderr (a StringIO would
    # count as a capture, not a console).
    with open(tmp_path / "stderr", "w") as stream:
        old = theirs.setStream(stream)
        try:
            await c.register_plugin(StructuredLogging())
            logging.getLogger("distributed.test").warning("where does it go")
            await c.unregister_worker_plugin(NAME)
        finally:
            theirs.setStream(old)
    (line,) = [
        x for x in (tmp_path / "stderr").read_text().splitlines() if "where" in x
    ]
    assert json.loads(line)["event"] == "where does it go"
    assert "where does it go" not in capsys.readouterr().err


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_unwritable_file_refuses_in_strict_mode(c, s, a, tmp_path):
    before = logging_state()
    plugin = StructuredLogging(file=str(tmp_path / "missing-dir" / "w.log"))
    with pytest.raises(Exception, match="could not set up"):
        await c.register_plugin(plugin)
    assert_restored(before)


# ---------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------


def _quiet_preloading(tmp_path) -> dict[str, str]:
    """distributed's own 'Import preload module' lines come before any preload."""
    cfg = tmp_path / "dask-config"
    cfg.mkdir(exist_ok=True)
    (cfg / "quiet.yaml").write_text(
        "distributed:\n  logging:\n    distributed.preloading: warning\n"
    )
    return {"DASK_CONFIG": str(cfg)}


@pytest.mark.slow
def test_real_worker_json_stderr(procs, tmp_path):
    from distributed import Client

    _, address = procs.scheduler()
    worker = procs.worker(
        address,
        "--no-nanny",
        "--nthreads",
        "1",
        "--preload",
        NAME,
        "--logging-format",
        "json",
        env=_quiet_preloading(tmp_path),
    )
    rotating = procs.worker(
        address,
        "--no-nanny",
        "--nthreads",
        "1",
        "--preload",
        NAME,
        "--logging-file",
        str(tmp_path / "file-{role}-{pid}.log"),
        "--logging-rotate-bytes",
        "1KiB",
        "--logging-backups",
        "1",
        env=_quiet_preloading(tmp_path),
        wait=False,
    )
    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        first = worker.wait_for(r"Start worker at:\s+(tcp://[\d.]+:\d+)").group(1)
        key = "logtask-0123456789abcdef0123456789abcdef"
        task = by_value(_task_logs)  # the worker's cwd is tmp_path: no `tests`
        assert client.submit(task, 3, key=key, workers=[first]).result() == 3
        worker.wait_for("from structlog", timeout=30)
        # Closed through the scheduler, not SIGTERM: see Proc.wait_exit.
        (second,) = set(client.scheduler_info()["workers"]) - {first}
        client.retire_workers([first])
        assert worker.wait_exit() == 0
        client.retire_workers([second])
        assert rotating.wait_exit() == 0

    lines = worker.output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("{")]
    assert starts, worker.output
    parsed = [json.loads(line) for line in lines[starts[0] : starts[-1] + 1]]
    for d in parsed:
        assert set(FIELDS) <= set(d), d
        assert d["role"] == "worker"
        assert d["address"] == first
        assert d["pid"] == worker.popen.pid
    by_event = {d["event"]: d for d in parsed}
    for event in ("from stdlib 3", "from structlog", "with exception"):
        assert by_event[event]["key"] == key
        assert by_event[event]["prefix"] == "logtask"
    assert "Traceback" in by_event["with exception"]["exception"]
    # distributed's line removing the plugin is still structured; after teardown
    # the worker's lines are in distributed's format again. (Another thread, such
    # as distributed's GC monitor, may log between the two: no exact order.)
    assert f"Removing Worker plugin {NAME}" in by_event, worker.output
    after = [line for line in lines[starts[-1] + 1 :] if line.strip()]
    assert after, worker.output
    assert all(" - " in line and not line.startswith("{") for line in after), after

    name = f"file-worker-{rotating.popen.pid}.log"
    assert (tmp_path / name).exists()
    assert (tmp_path / f"{name}.1").exists()
    assert not (tmp_path / f"{name}.2").exists()
    for p in (tmp_path / name, tmp_path / f"{name}.1"):
        for d in read_lines(p):
            assert d["pid"] == rotating.popen.pid


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--logging-format", "xml"),
        ("--logging-logger", "foo"),
        ("--logging-level", "LOUD"),
    ],
)
def test_bad_cli_values_exit_2(flag, value):
    proc = subprocess.run(
        worker_command("tcp://127.0.0.1:1", "--preload", NAME, flag, value),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if "Error:" in line]
    assert error, proc.stderr
    assert flag in proc.stderr
    assert repr(value) in proc.stderr
