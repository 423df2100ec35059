"""Hostile input: bad values in every medium, and properties of the env-file parser.

Every medium must give a clear error naming the option: a click usage error
(exit 2) on the CLI, an ``OptionError`` in Python, and the strict-mode refusal
(the worker exits before it registers) through config files, environment
variables and ``preload-argv``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import click
import dask.config
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import catalog
from catalog._entry import OptionError
from catalog.env import EnvFile, read_env_file
from tests.procs import LOOPBACK, dask_command

#: One bad CLI value per entry: (preload, flag, value, words of the message).
BAD_FLAGS = [
    ("catalog.env", "--env-threads", "0", "must be >= 1"),
    ("catalog.logging", "--logging-format", "xml", "json"),
    ("catalog.metrics", "--metrics-port", "70000", "65535"),
    ("catalog.tracer", "--tracer-capacity", "0", "capacity"),
    ("catalog.memory", "--memory-interval", "soon", "duration"),
    ("catalog.watchdog", "--watchdog-stack-depth", "0", "stack-depth"),
    ("catalog.events", "--events-backups", "-1", "backups"),
]

#: One bad Python argument per public class: (class, keyword, value).
BAD_KWARGS = [
    ("Environment", "threads", "many"),
    ("WorkerEnvironment", "set", ["1BAD=x"]),
    ("SchedulerEnvironment", "sys_path", [""]),
    ("StructuredLogging", "level", "LOUD"),
    ("SchedulerStructuredLogging", "format", "xml"),
    ("NannyStructuredLogging", "backups", -1),
    ("Metrics", "buckets", "fast"),
    ("SchedulerMetrics", "pushgateway", "ftp://x"),
    ("Tracer", "capacity", 0),
    ("SchedulerTracer", "states", ["sleeping"]),
    ("MemoryGuard", "process_limit", 1.5),
    ("Watchdog", "warn_after", "later"),
    ("EventLog", "rotate_bytes", "12.5"),
]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*dask_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def finish(popen: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    try:
        out, _ = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, _ = popen.communicate()
        pytest.fail(f"{popen.args} still running after {timeout}s:\n{out}")
    return popen.returncode, out


# -- Python arguments and config values -----------------------------------------


@pytest.mark.parametrize(("cls", "keyword", "value"), BAD_KWARGS)
def test_bad_python_argument_names_the_option(cls, keyword, value):
    entry = getattr(catalog, cls).entry
    option = entry.option(keyword)
    with pytest.raises(OptionError) as info:
        getattr(catalog, cls)(**{keyword: value})
    message = str(info.value)
    assert f"{keyword}=" in message
    assert entry.flag(option) in message
    assert "accepted" in message


@pytest.mark.parametrize(("cls", "keyword", "value"), BAD_KWARGS)
def test_bad_config_value_names_the_config_key(cls, keyword, value):
    entry = getattr(catalog, cls).entry
    option = entry.option(keyword)
    with dask.config.set({entry.config_key(option): value}):
        with pytest.raises(OptionError) as info:
            getattr(catalog, cls)()
    assert f"config {entry.config_key(option)}" in str(info.value)


def test_unknown_python_keyword_lists_the_options():
    with pytest.raises(TypeError, match=r"Tracer\(\) got unknown option\(s\)"):
        catalog.Tracer(capcity=10)


# -- the CLI: exit 2 with an Error: line naming the option ----------------------


@pytest.mark.slow
def test_bad_cli_values_exit_2_naming_the_option():
    """Every entry's flag, the umbrella's flags, on a worker and a scheduler."""
    cases = []
    for preload, flag, value, words in BAD_FLAGS:
        args = ["worker", f"tcp://{LOOPBACK}:1", "--preload", preload, flag, value]
        cases.append((args, flag, words))
    umbrella = ["worker", f"tcp://{LOOPBACK}:1", "--preload", "catalog"]
    cases += [
        (
            [*umbrella, "--enable", "tracer", "--tracer-capacity", "-5"],
            "--tracer-capacity",
            "capacity",
        ),
        ([*umbrella, "--enable", "tracer,nosuch"], "--enable", "'nosuch'"),
        (
            [*umbrella, "--enable", "tracer", "--memory-interval", "1s"],
            "--memory-interval",
            "add '--enable memory'",
        ),
        (
            [
                *("scheduler", "--host", LOOPBACK, "--port", "0"),
                *("--preload", "catalog.events", "--events-rotate-bytes", "12.5"),
            ],
            "--events-rotate-bytes",
            "unit",
        ),
    ]
    running = [(run_cli(*args), args, flag, words) for args, flag, words in cases]
    for popen, args, flag, words in running:
        code, out = finish(popen)
        assert code == 2, (args, out)
        error = [line for line in out.splitlines() if line.startswith("Error:")]
        assert error, (args, out)
        assert flag in error[0] or flag in out, (args, out)
        assert words in out, (args, out)
        assert "Traceback" not in out, (args, out)


# -- config files, env vars, preload-argv: the strict refusal --------------------


@pytest.mark.slow
def test_bad_config_in_every_medium_refuses_to_start(procs, tmp_path):
    _, addr = procs.scheduler()
    config = tmp_path / "catalog.yaml"
    config.write_text(
        "distributed:\n  worker:\n    preload: [catalog.tracer]\n"
        "catalog:\n  tracer:\n    capacity: -3\n"
    )
    flat = '["--tracer-capacity", "0"]'
    cases = {
        "config file": (
            {"DASK_CONFIG": str(config)},
            "config catalog.tracer.capacity",
        ),
        "env var": (
            {
                "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog.memory"]',
                "DASK_CATALOG__MEMORY__INTERVAL": "soon",
            },
            "config catalog.memory.interval",
        ),
        "preload-argv flat": (
            {
                "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog.tracer"]',
                "DASK_DISTRIBUTED__WORKER__PRELOAD_ARGV": flat,
            },
            "--tracer-capacity",
        ),
        "umbrella config": (
            {
                "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog"]',
                "DASK_CATALOG__ENABLE": '["tracer", "nosuch"]',
            },
            "config catalog.enable",
        ),
    }
    running = {
        name: procs.worker(addr, "--no-nanny", "--nthreads", "1", env=env, wait=False)
        for name, (env, _) in cases.items()
    }
    for name, proc in running.items():
        try:
            code = proc.popen.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: the worker did not refuse:\n{proc.output}")
        out = proc.output
        assert code != 0, (name, out)
        assert "Registered to:" not in out, (name, out)
        assert "catalog.strict is true: refusing to start" in out, (name, out)
        assert cases[name][1] in out, (name, out)


@pytest.mark.slow
def test_preload_argv_as_a_string_is_named(procs):
    _, addr = procs.scheduler()
    proc = procs.worker(
        addr,
        "--no-nanny",
        env={
            "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog.tracer"]',
            "DASK_DISTRIBUTED__WORKER__PRELOAD_ARGV": "--tracer-capacity 0",
        },
        wait=False,
    )
    code = proc.popen.wait(90)
    assert code != 0, proc.output
    assert "preload-argv" in proc.output
    assert "--tracer-capacity" in proc.output, proc.output


# -- env files: properties ------------------------------------------------------

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
#: Values without newlines, quotes or backslashes: they survive any quoting.
VALUES = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="'\"\\\n\r"
    ),
    max_size=30,
)


def write_temp(text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".env")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(NAMES, VALUES, max_size=8),
    st.lists(st.sampled_from(["plain", "single", "double", "export"]), min_size=8),
    st.booleans(),
)
def test_env_file_round_trips(values, styles, noise):
    lines = ["# generated"] if noise else []
    for (name, value), style in zip(values.items(), styles, strict=False):
        if style == "plain":
            # Unquoted values lose surrounding blanks and a `#` starts a comment.
            value = value.strip().replace("#", "")
            values[name] = value
            lines.append(f"{name}={value}")
        elif style == "single":
            lines.append(f"{name}='{value}'")
        elif style == "double":
            lines.append(f'{name}="{value}"')
        else:
            lines.append(f"export {name}='{value}'")
        if noise:
            lines.append("")
    path = write_temp("\n".join(lines) + "\n")
    try:
        assert read_env_file(path) == values
        assert list(read_env_file(path)) == list(values)  # file order
        assert EnvFile().convert(path, None, None) == path
    finally:
        os.unlink(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_env_file_never_raises_anything_but_a_clear_error(text):
    path = write_temp(text)
    try:
        try:
            values = read_env_file(path)
        except ValueError as exc:
            message = str(exc)
            assert message.startswith(path)
            assert "line " in message
        else:
            assert all(isinstance(v, str) for v in values.values())
            for name in values:
                assert name.isidentifier() or name.replace("_", "a").isalnum()
        try:
            EnvFile().convert(path, None, None)
        except click.BadParameter as exc:
            assert path in exc.format_message()
            assert "accepted: a readable dotenv file" in exc.format_message()
    finally:
        os.unlink(path)


@settings(max_examples=60, deadline=None)
@given(NAMES, VALUES.filter(lambda v: len(v.strip()) >= 4))
def test_env_file_errors_never_show_the_value(name, secret):
    # A line whose name is invalid: the error names the line, not the value.
    path = write_temp(f"OK=1\n9{name}={secret}\n")
    try:
        with pytest.raises(ValueError) as info:
            read_env_file(path)
        assert "line 2" in str(info.value)
        assert secret.strip() not in str(info.value).replace(path, "")
    finally:
        os.unlink(path)


def test_env_file_missing_or_binary_names_the_path(tmp_path):
    missing = tmp_path / "missing.env"
    with pytest.raises(ValueError, match=f"cannot read {missing}"):
        read_env_file(str(missing))
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"A=\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_env_file(str(binary))
    with pytest.raises(OptionError, match="file="):
        catalog.WorkerEnvironment(file=str(missing))
