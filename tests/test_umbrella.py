"""The umbrella preload `--preload catalog --enable ...`."""

from __future__ import annotations

import json
import subprocess

import click
import dask.config
import pytest
from distributed import Client

import catalog
from tests.procs import worker_command


def parse(argv: list[str]) -> dict:
    command = catalog.dask_setup
    ctx = click.Context(command)
    command.parse_args(ctx, argv)
    return ctx.params


def test_enable_takes_comma_lists_and_repeats():
    params = parse(
        [
            "--enable",
            "tracer,memory",
            "--enable",
            "watchdog",
            "--memory-task-limit",
            "2GiB",
        ]
    )
    assert params["memory__task_limit"] == 2 * 2**30
    assert params["enable"] == ("tracer,memory", "watchdog")


def test_option_of_an_entry_not_enabled_names_the_missing_enable():
    with pytest.raises(
        click.UsageError, match=r"'--tracer-capacity'.*add '--enable tracer'"
    ):
        parse(["--enable", "memory", "--tracer-capacity", "5"])


def test_unknown_entry_lists_the_valid_names():
    with pytest.raises(click.BadParameter) as info:
        parse(["--enable", "tracer,bogus"])
    message = info.value.format_message()
    assert "'bogus'" in message and "--enable" in message
    for name in catalog.ENTRY_MODULES:
        assert name in message


def test_no_entry_enabled_is_an_error():
    with pytest.raises(click.UsageError, match="no entry enabled"):
        parse([])


def test_config_enable_is_used_when_no_flag_is_given():
    with dask.config.set({"catalog.enable": ["tracer"]}):
        parse(["--tracer-capacity", "5"])
    with dask.config.set({"catalog.enable": ["memory"]}):
        # an explicit --enable replaces the config list
        with pytest.raises(click.UsageError, match="--enable tracer"):
            parse(["--enable", "memory", "--tracer-capacity", "5"])


def capacity_on_workers(address: str) -> dict:
    with Client(address, timeout="30s") as client:
        return client.run(
            lambda dask_worker: dask_worker.plugins["catalog.tracer"].settings.capacity
        )


@pytest.mark.slow
def test_cli_umbrella_installs_on_a_real_worker(procs):
    _, address = procs.scheduler()
    procs.worker(
        address,
        "--nthreads",
        "1",
        "--preload",
        "catalog",
        "--enable",
        "tracer,watchdog",
        "--tracer-capacity",
        "1234",
    )
    assert list(capacity_on_workers(address).values()) == [1234]


@pytest.mark.slow
def test_config_only_umbrella_installs_on_a_real_worker(procs):
    _, address = procs.scheduler()
    env = {
        "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog"]',
        "DASK_DISTRIBUTED__WORKER__PRELOAD_ARGV": json.dumps(
            [["--enable", "tracer", "--tracer-capacity", "77"]]
        ),
    }
    procs.worker(address, "--nthreads", "1", env=env)
    assert list(capacity_on_workers(address).values()) == [77]


@pytest.mark.slow
def test_config_keys_alone_install_on_a_real_worker(procs):
    _, address = procs.scheduler()
    env = {
        "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog"]',
        "DASK_CATALOG__ENABLE": '["tracer"]',
        "DASK_CATALOG__TRACER__CAPACITY": "55",
    }
    procs.worker(address, "--nthreads", "1", env=env)
    assert list(capacity_on_workers(address).values()) == [55]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--enable", "memory", "--tracer-capacity", "5"], "--enable tracer"),
        (["--enable", "bogus"], "'bogus'"),
        (["--enable", "memory", "--memory-task-limit", "lots"], "--memory-task-limit"),
        (
            ["--enable", "memory", "--memory-process-limit", "1.5"],
            "--memory-process-limit",
        ),
    ],
)
def test_cli_umbrella_bad_input_exits_2(procs, argv, expected):
    _, address = procs.scheduler()
    result = subprocess.run(
        worker_command(address, "--preload", "catalog", *argv),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Error:" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_config_bad_value_refuses_to_start_in_strict_mode(procs):
    _, address = procs.scheduler()
    env = {
        "DASK_DISTRIBUTED__WORKER__PRELOAD": '["catalog"]',
        "DASK_CATALOG__ENABLE": '["memory"]',
        "DASK_CATALOG__MEMORY__TASK_LIMIT": "lots",
    }
    worker = procs.worker(address, "--no-nanny", env=env, wait=False)
    assert worker.popen.wait(60) != 0
    assert "catalog.memory.task-limit" in worker.output and "'lots'" in worker.output
    assert "refusing to start" in worker.output
