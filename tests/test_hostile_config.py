"""Hostile config: misspelt keys, env strings, extreme values, in every medium."""

from __future__ import annotations

import logging

import dask.config
import pytest
from distributed import Client
from distributed.utils_test import captured_logger

import catalog
from catalog._entry import OptionError
from tests.procs import LOOPBACK
from tests.test_hostile_input import finish, run_cli

# -- misspelt keys ---------------------------------------------------------------


def test_a_misspelt_option_key_is_refused_naming_the_close_match():
    with (
        dask.config.set({"catalog.memory.prcess-limit": 0.5}),
        pytest.raises(OptionError) as info,
    ):
        catalog.MemoryGuard()
    assert "catalog.memory.prcess-limit" in str(info.value)
    assert "did you mean catalog.memory.process-limit?" in str(info.value)


def test_a_misspelt_key_from_an_env_var_is_refused_too():
    # dask keeps an env var's key lower-cased with underscores.
    with (
        dask.config.set({"catalog.memory": {"prcess_limit": 0.5}}),
        pytest.raises(OptionError, match="process-limit"),
    ):
        catalog.MemoryGuard()


def test_a_misspelt_entry_name_is_refused_naming_the_entry():
    with (
        dask.config.set({"catalog.memroy": {"process-limit": 0.5}}),
        pytest.raises(OptionError, match=r"catalog\.memroy.*catalog\.memory\?"),
    ):
        catalog.Watchdog()


def test_without_strict_a_misspelt_key_is_warned_about_once():
    config = {"catalog.strict": False, "catalog.watchdog.warn-aftr": "1m"}
    with (
        dask.config.set(config),
        captured_logger("catalog", level=logging.WARNING) as log,
    ):
        catalog.Watchdog()
        catalog.Watchdog()
    (line,) = log.getvalue().splitlines()
    assert "catalog.watchdog.warn-aftr" in line
    assert "did you mean catalog.watchdog.warn-after?" in line


def test_known_keys_in_both_spellings_pass():
    config = {
        "catalog.memory": {"process_limit": 0.5, "interval": "100ms"},
        "catalog.follow-symlinks": False,
    }
    with dask.config.set(config):
        assert catalog.MemoryGuard().settings.process_limit == 0.5


@pytest.mark.slow
def test_a_real_worker_with_a_misspelt_env_key_refuses_to_start(procs):
    _, address = procs.scheduler()
    worker = procs.worker(
        address,
        "--nthreads",
        "1",
        "--preload",
        "catalog.memory",
        env={"DASK_CATALOG__MEMORY__PRCESS_LIMIT": "0.5"},
        wait=False,
    )
    assert worker.wait_exit(60) != 0
    assert "did you mean catalog.memory.process-limit?" in worker.output
    assert "Registered to:" not in worker.output


# -- catalog.enable as a string ------------------------------------------------------


@pytest.mark.slow
def test_enable_from_an_env_var_is_a_comma_list(procs):
    _, address = procs.scheduler()
    env = {
        "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog"]',
        "DASK_CATALOG__ENABLE": "tracer,watchdog",
    }
    procs.worker(address, "--nthreads", "1", env=env)
    with Client(address, timeout="30s") as client:
        names = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    (plugins,) = names.values()
    assert {"catalog.tracer", "catalog.watchdog"} <= set(plugins)


def test_enable_from_config_as_one_word():
    from catalog._umbrella import umbrella_preload

    command, _ = umbrella_preload(catalog.entry_modules())
    with dask.config.set({"catalog.enable": "tracer"}):
        ctx = command.make_context("dask_setup", ["--tracer-capacity", "5"])
    assert "_usage_error" not in ctx.params


# -- extreme values -----------------------------------------------------------------

#: (class, keyword, value, words of the message): values that cost the server
#: seconds or spin a thread.
EXTREME = [
    ("EventLog", "backups", 10**6, "(must be <= 100)"),
    ("StructuredLogging", "backups", 10**6, "(must be <= 100)"),
    ("Watchdog", "interval", "1ns", "from 1ms to 1h"),
    ("MemoryGuard", "interval", "1ns", "from 1ms to 1h"),
    ("Tracer", "flush_interval", "1ns", "from 1ms to 1h"),
    ("Metrics", "push_interval", "1ms", "from 10ms to 1d"),
    ("Watchdog", "interval", "1000d", "from 1ms to 1h"),
]


@pytest.mark.parametrize(("cls", "keyword", "value", "words"), EXTREME)
def test_extreme_values_are_refused_with_the_range(cls, keyword, value, words):
    with pytest.raises(OptionError) as info:
        getattr(catalog, cls)(**{keyword: value})
    assert keyword in str(info.value) and words in str(info.value)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.slow
def test_extreme_cli_values_exit_2_with_the_range():
    running = [
        run_cli(
            "scheduler",
            *("--host", LOOPBACK, "--port", "0"),
            *("--preload", "catalog.events", "--events-backups", "1000000"),
        ),
        run_cli(
            "worker",
            f"tcp://{LOOPBACK}:1",
            *("--preload", "catalog.watchdog", "--watchdog-interval", "1ns"),
        ),
    ]
    for popen, words in zip(
        running, ["(must be <= 100)", "from 1ms to 1h"], strict=True
    ):
        code, out = finish(popen)
        assert code == 2, out
        assert any(line.startswith("Error:") for line in out.splitlines()), out
        assert words in out and "Traceback" not in out, out
