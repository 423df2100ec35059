"""The entry machinery, exercised with an entry defined in the tests."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from pathlib import Path

import click
import dask.config
import pytest
from distributed import Client, Nanny, Scheduler, Worker
from distributed.utils_test import captured_logger, gen_cluster

from catalog._entry import EntrySetupError, OptionError, active_plugins
from tests import sample_entry
from tests.procs import LOOPBACK, worker_command
from tests.sample_entry import SampleScheduler, SampleWorker

SAMPLE = str(Path(sample_entry.__file__))
ENTRY = sample_entry.ENTRY


# -- one declaration, five spellings -------------------------------------------


def test_spellings_derive_from_the_declaration():
    opt = ENTRY.option("every")
    assert ENTRY.flag(opt) == "--sample-every"
    assert opt.keyword == "every"
    assert ENTRY.config_key(opt) == "catalog.sample.every"
    assert ENTRY.env_var(opt) == "DASK_CATALOG__SAMPLE__EVERY"
    assert SampleWorker.name == "catalog.sample"
    flags = [p.opts[0] for p in sample_entry.dask_setup.params]
    assert flags == [
        "--sample-count",
        "--sample-limit",
        "--sample-every",
        "--sample-set",
    ]


def test_defaults_apply_when_nothing_is_given():
    settings = SampleWorker().settings
    assert settings.as_dict() == {"count": 3, "limit": None, "every": 1.0, "set": ()}


def test_explicit_beats_config_beats_default():
    with dask.config.set({"catalog.sample.count": 5, "catalog.sample.limit": "1GiB"}):
        assert SampleWorker().settings.count == 5
        assert SampleWorker().settings.limit == 2**30
        assert SampleWorker(count=7).settings.count == 7


def test_environment_variables_reach_the_config(monkeypatch):
    monkeypatch.setenv("DASK_CATALOG__SAMPLE__EVERY", "250ms")
    monkeypatch.setenv("DASK_CATALOG__SAMPLE__SET", '["A=1", "B=2"]')
    config = dask.config.collect(paths=[], env=dict(__import__("os").environ))
    with dask.config.set(config):
        settings = SampleWorker().settings
    assert settings.every == 0.25
    assert settings.set == ("A=1", "B=2")


def test_config_is_read_at_construction_not_import():
    with dask.config.set({"catalog.sample.count": 9}):
        plugin = SampleWorker()
    assert plugin.settings.count == 9
    assert SampleWorker().settings.count == 3


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"count": 0}, ["count=", "--sample-count", "0", ">= 1"]),
        ({"limit": "lots"}, ["limit=", "'lots'", "size"]),
        ({"limit": "1.5"}, ["limit=", "'1.5'", "unit"]),
        ({"every": "-1s"}, ["every=", "duration"]),
        ({"set": ["NOEQUALS"]}, ["set=", "'NOEQUALS'", "NAME=VALUE"]),
    ],
)
def test_bad_python_values_name_option_value_and_accepted(kwargs, names):
    with pytest.raises(OptionError) as info:
        SampleWorker(**kwargs)
    for text in names:
        assert text in str(info.value)


def test_bad_config_value_names_the_config_key():
    with (
        dask.config.set({"catalog.sample.count": "many"}),
        pytest.raises(OptionError) as info,
    ):
        SampleWorker()
    assert "config catalog.sample.count" in str(info.value)
    assert "'many'" in str(info.value)


def test_unknown_keyword_lists_the_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bogus'\].*count"):
        SampleWorker(bogus=1)


def test_plugins_pickle_with_their_settings_only():
    plugin = SampleWorker(count=4, set=["TOKEN=abc"])
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.settings == plugin.settings
    assert clone.name == "catalog.sample"
    assert not clone.active


def test_secret_values_are_masked_in_repr_and_status():
    plugin = SampleWorker(set=["API_TOKEN=hunter2", "PLAIN=1"])
    assert "hunter2" not in repr(plugin)
    assert "PLAIN=1" in repr(plugin)
    assert plugin.status()["options"]["set"] == ["API_TOKEN=****", "PLAIN=1"]


def test_click_command_parses_and_rejects():
    ctx = sample_entry.dask_setup.make_context(
        "dask_setup", ["--sample-count", "4", "--sample-set", "A=1"]
    )
    assert ctx.params["sample__count"] == 4
    ctx = click.Context(sample_entry.dask_setup)
    with pytest.raises(click.BadParameter) as info:
        sample_entry.dask_setup.parse_args(ctx, ["--sample-count", "zero"])
    assert "'--sample-count'" in info.value.format_message()
    assert "'zero' (not a whole number)" in info.value.format_message()


def test_make_context_hands_config_usage_errors_to_the_callback():
    # distributed calls make_context for config preload-argv and only logs errors.
    ctx = sample_entry.dask_setup.make_context("dask_setup", ["--sample-count", "zero"])
    assert "--sample-count" in ctx.params["_usage_error"]


# -- on a real in-process cluster -------------------------------------------------


@gen_cluster(
    client=True,
    nthreads=[("", 1)],
    worker_kwargs={
        "preload": ["tests.sample_entry"],
        "preload_argv": [["--sample-count", "5"]],
    },
)
async def test_worker_preload_installs_the_worker_plugin(c, s, a):
    plugin = a.plugins["catalog.sample"]
    assert isinstance(plugin, SampleWorker)
    assert plugin.active and plugin.settings.count == 5
    await c.submit(int, 1)
    assert plugin.transitions > 0
    assert active_plugins(a) == {"catalog.sample": plugin}


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_register_twice_replaces_and_tears_down_once(c, s, a):
    for count in (4, 5, 6):
        await c.register_plugin(SampleWorker(count=count))
    plugin = a.plugins["catalog.sample"]
    assert plugin.settings.count == 6
    assert a._sample_setups == 3
    assert a._sample_teardowns == 2
    assert [p for p in a.plugins.values() if isinstance(p, SampleWorker)] == [plugin]


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_scheduler_plugin_replaced_by_name_tears_down_the_old_one(c, s, a):
    # distributed does not close a scheduler plugin replaced by name; we do.
    await c.register_plugin(SampleScheduler(count=4))
    await c.register_plugin(SampleScheduler(count=5))
    assert s.plugins["catalog.sample"].settings.count == 5
    assert s._sample_setups == 2
    assert s._sample_teardowns == 1


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_hook_errors_are_logged_once_and_never_reach_distributed(c, s, a):
    await c.register_plugin(SampleWorker())
    plugin = a.plugins["catalog.sample"]
    with (
        captured_logger("catalog") as log,
        captured_logger("distributed.worker_state_machine") as dlog,
    ):
        futures = c.map(int, range(3), key=[f"explode-{i}" for i in range(3)])
        assert await c.gather(futures) == [0, 1, 2]
    assert plugin.errors >= 3
    assert (
        log.getvalue().count("ERROR") <= 1
        and log.getvalue().count("a hook that raises") == 1
    )
    assert "ZeroDivisionError" in plugin.status()["last_error"]
    assert "failed with exception" not in dlog.getvalue()


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_register_plugin_raises_the_setup_error(c, s, a):
    with pytest.raises(EntrySetupError, match="resource 13 is taken"):
        await c.register_plugin(SampleWorker(count=13))


@gen_cluster(client=True, nthreads=[("", 1)], config={"catalog.strict": False})
async def test_not_strict_logs_one_error_and_goes_on(c, s, a):
    with captured_logger("catalog") as log:
        await c.register_plugin(SampleWorker(count=13))
    plugin = a.plugins["catalog.sample"]
    assert not plugin.active
    assert (
        "could not set up" in log.getvalue() and "going on without it" in log.getvalue()
    )
    assert await c.submit(int, 2) == 2


async def _start_worker(scheduler_address, **kwargs):
    return await Worker(
        scheduler_address, host=LOOPBACK, dashboard_address=":0", **kwargs
    )


@pytest.mark.parametrize(
    "argv",
    [["--sample-count", "13"], ["--sample-count", "zero"], ["--sample-bogus", "1"]],
    ids=["setup-fails", "bad-value", "unknown-option"],
)
def test_strict_worker_refuses_to_start_without_registering(argv):
    async def main():
        async with Scheduler(host=LOOPBACK, dashboard_address=":0") as s:
            with captured_logger("catalog") as log:
                with pytest.raises(
                    RuntimeError, match="Worker failed to start"
                ) as info:
                    await _start_worker(
                        s.address, preload=["tests.sample_entry"], preload_argv=[argv]
                    )
            assert not s.workers
            cause = info.value.__cause__
            assert isinstance(cause, EntrySetupError)
            assert "'sample'" in str(cause)
            assert "refusing to start" in log.getvalue()

    asyncio.run(main())


def test_not_strict_worker_starts_after_one_error():
    async def main():
        with dask.config.set({"catalog.strict": False}):
            async with Scheduler(host=LOOPBACK, dashboard_address=":0") as s:
                with captured_logger("catalog") as log:
                    w = await _start_worker(
                        s.address,
                        preload=["tests.sample_entry"],
                        preload_argv=[["--sample-count", "zero"]],
                    )
                    async with w:
                        assert s.workers
                assert log.getvalue().count("ERROR") <= 1
                assert "going on without it" in log.getvalue()

    asyncio.run(main())


def test_strict_scheduler_refuses_to_start():
    async def main():
        with pytest.raises(RuntimeError, match="Scheduler failed to start") as info:
            await Scheduler(
                host=LOOPBACK,
                dashboard_address=":0",
                preload=["tests.sample_entry"],
                preload_argv=[["--sample-count", "13"]],
            )
        assert "resource 13 is taken" in str(info.value.__cause__)

    asyncio.run(main())


@pytest.mark.slow
def test_nanny_preload_sets_the_spawned_worker_environment_and_refuses_when_strict():
    async def main():
        async with Scheduler(host=LOOPBACK, dashboard_address=":0") as s:
            async with Nanny(
                s.address,
                host=LOOPBACK,
                dashboard_address=":0",
                preload_nanny=["tests.sample_entry"],
                preload_nanny_argv=[["--sample-set", "SAMPLE_VAR=42"]],
            ) as n:
                async with Client(s.address, asynchronous=True) as c:
                    values = await c.run(os.environ.get, "SAMPLE_VAR")
                assert values == {n.worker_address: "42"}
            with pytest.raises(RuntimeError):
                await Nanny(
                    s.address,
                    host=LOOPBACK,
                    dashboard_address=":0",
                    preload_nanny=["tests.sample_entry"],
                    preload_nanny_argv=[["--sample-count", "13"]],
                )
            assert not s.workers

    asyncio.run(main())


# -- real processes, exactly as a user types them -----------------------------------


@pytest.mark.slow
def test_cli_bad_value_exits_2_naming_the_option(procs):
    _, address = procs.scheduler()
    result = subprocess.run(
        worker_command(address, "--preload", SAMPLE, "--sample-count", "zero"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert (
        "Error:" in result.stderr
        and "--sample-count" in result.stderr
        and "'zero'" in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_setup_failure_exits_nonzero_without_registering(procs):
    scheduler, address = procs.scheduler()
    worker = procs.worker(
        address, "--preload", SAMPLE, "--sample-count", "13", "--no-nanny", wait=False
    )
    status = worker.popen.wait(60)
    assert status != 0
    assert "catalog entry 'sample' could not set up" in worker.output
    assert "resource 13 is taken" in worker.output
    assert "Register worker" not in scheduler.output


@pytest.mark.slow
def test_cli_setup_failure_with_nanny_exits_nonzero(procs):
    scheduler, address = procs.scheduler()
    worker = procs.worker(
        address, "--preload", SAMPLE, "--sample-count", "13", wait=False
    )
    status = worker.popen.wait(90)
    assert status != 0
    assert "resource 13 is taken" in worker.output
    assert "Register worker" not in scheduler.output


def test_sample_module_is_importable_standalone():
    result = subprocess.run(
        [sys.executable, SAMPLE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_setting_up_one_instance_twice_runs_it_once(c, s, a):
    plugin = SampleWorker()
    plugin.setup(worker=a)
    plugin.setup(worker=a)
    assert a._sample_setups == 2 and a._sample_teardowns == 1
    assert plugin.active and "transition" not in plugin.__dict__
    plugin.teardown(worker=a)
    assert a._sample_teardowns == 2 and not plugin.active
