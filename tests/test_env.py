"""Tests of catalog.env: unit, in-process cluster, real dask processes."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import click
import dask.config
import pytest
from distributed import Client, Nanny
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog._entry import OptionError
from catalog.env import (
    THREAD_VARIABLES,
    Environment,
    SchedulerEnvironment,
    WorkerEnvironment,
    auto_threads,
    cgroup_cpu_limit,
    dask_setup,
    read_env_file,
    usable_cores,
)
from tests.procs import REPO_ENV, worker_command

#: Real processes import this module to run the helpers below.
REPO = REPO_ENV

# ---------------------------------------------------------------------------
# Helpers run inside workers (module level: they are pickled by reference)
# ---------------------------------------------------------------------------


def initial_environ(names: list[str]) -> dict[str, str | None]:
    """The variables this process had when its interpreter started."""
    with open("/proc/self/environ", "rb") as f:
        raw = f.read().split(b"\0")
    found = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    return {name: found.get(name) for name in names}


def live_environ(names: list[str]) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def blas_threads() -> list[int]:
    import numpy  # noqa: F401  (loads the BLAS pool)
    from threadpoolctl import threadpool_info

    return [
        info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"
    ]


def sys_path_head(n: int = 3) -> list[str]:
    return sys.path[:n]


# ---------------------------------------------------------------------------
# Unit
# ---------------------------------------------------------------------------


def parse_cli(*args: str) -> dict:
    """What `dask worker ... --preload catalog.env ARGS` parses, or its usage error."""
    ctx = click.Context(dask_setup)
    dask_setup.parse_args(ctx, list(args))
    return ctx.params


def test_cli_parses_every_option(tmp_path):
    env_file = tmp_path / "a.env"
    env_file.write_text("A=1\n")
    params = parse_cli(
        "--env-set",
        "X=1",
        "--env-set",
        "Y=a=b",
        "--env-file",
        str(env_file),
        "--env-threads",
        "auto",
        "--env-sys-path",
        "/opt/a",
        "--env-sys-path",
        "/opt/b",
    )
    assert params["env__set"] == ("X=1", "Y=a=b")
    assert params["env__file"] == str(env_file)
    assert params["env__threads"] == "auto"
    assert params["env__sys_path"] == ("/opt/a", "/opt/b")
    plugin = WorkerEnvironment(**dask_setup.entry.given_from_params(params))
    assert plugin.assignments == {"A": "1", "X": "1", "Y": "a=b"}


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--env-set", "NOEQUALS"], "'NOEQUALS'"),
        (["--env-set", "1BAD=x"], "'1BAD'"),
        (["--env-threads", "0"], "'0'"),
        (["--env-threads", "-1"], "'-1'"),
        (["--env-threads", "abc"], "'abc'"),
        (["--env-file", "/nonexistent/x.env"], "/nonexistent/x.env"),
    ],
)
def test_cli_rejects_bad_values(args, shown):
    with pytest.raises(click.BadParameter) as info:
        parse_cli(*args)
    message = info.value.format_message()
    assert args[0] in message
    assert shown in message


def test_secret_value_never_in_usage_error():
    with pytest.raises(click.BadParameter) as info:
        parse_cli("--env-set", "1API_TOKEN=hunter2")
    message = info.value.format_message()
    assert "hunter2" not in message
    assert "1API_TOKEN=****" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), ("3", 3), (2, 2), (None, None)],
)
def test_threads_accepts(value, expected):
    assert WorkerEnvironment(threads=value).settings.threads == expected


@pytest.mark.parametrize("value", [0, -1, "abc", True, 1.5, "1.5"])
def test_threads_rejects(value):
    with pytest.raises(OptionError, match=r"threads= \(--env-threads\).*auto"):
        WorkerEnvironment(threads=value)


def test_env_file_dialect(tmp_path):
    path = tmp_path / "vars.env"
    path.write_text(
        "# a comment\n"
        "\n"
        "export EXPORTED=1\n"
        "SINGLE='a b'\n"
        'DOUBLE="c d"  # trailing comment\n'
        "LITERAL=${HOME}\n"
        "EMPTY=\n"
    )
    assert read_env_file(str(path)) == {
        "EXPORTED": "1",
        "SINGLE": "a b",
        "DOUBLE": "c d",
        "LITERAL": "${HOME}",
        "EMPTY": "",
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("A=1\nnot a valid line=\n", "line 2: not a NAME=VALUE line"),
        ("A=1\nB=2\nNOEQUALS\n", "line 3: 'NOEQUALS' has no '='"),
    ],
)
def test_env_file_malformed_line_names_file_and_line(tmp_path, text, problem):
    path = tmp_path / "bad.env"
    path.write_text(text)
    with pytest.raises(OptionError) as info:
        Environment(file=str(path))
    assert f"{path}, {problem}" in str(info.value)


def test_env_file_missing_or_unreadable_names_path(tmp_path):
    with pytest.raises(OptionError, match=r"cannot read .*missing\.env"):
        Environment(file=str(tmp_path / "missing.env"))
    with pytest.raises(OptionError, match=f"cannot read {re.escape(str(tmp_path))}"):
        Environment(file=str(tmp_path))  # a directory


def test_malformed_line_does_not_show_secret(tmp_path):
    path = tmp_path / "s.env"
    path.write_text("API_KEY hunter2 = x\n")
    with pytest.raises(OptionError) as info:
        Environment(file=str(path))
    assert "hunter2" not in str(info.value)
    assert "line 1" in str(info.value)


def test_precedence_set_over_file_over_threads(tmp_path):
    path = tmp_path / "p.env"
    path.write_text("OMP_NUM_THREADS=7\nFROM_FILE=file\nBOTH=file\n")
    plugin = Environment(set=["BOTH=set"], file=str(path), threads=3)
    variables = plugin.planned(nthreads=1)
    assert variables["OMP_NUM_THREADS"] == "7"  # file over threads
    assert variables["MKL_NUM_THREADS"] == "3"
    assert variables["BOTH"] == "set"  # set over file
    assert variables["FROM_FILE"] == "file"
    assert set(THREAD_VARIABLES) <= set(variables)
    assert len(THREAD_VARIABLES) == 8


def test_config_and_env_var_spelling():
    with dask.config.set(
        {"catalog.env.set": ["A=1", "B=2"], "catalog.env.threads": "auto"}
    ):
        plugin = Environment()
    assert plugin.assignments == {"A": "1", "B": "2"}
    assert plugin.settings.threads == "auto"
    # Explicit Python arguments win over config.
    with dask.config.set({"catalog.env.threads": 4}):
        assert Environment(threads=2).settings.threads == 2
    # dask's env-var rule: DASK_CATALOG__ENV__SYS_PATH -> catalog.env.sys-path
    config = dask.config.collect_env(
        {"DASK_CATALOG__ENV__SYS_PATH": "['/opt/a']", "DASK_CATALOG__ENV__SET": "X=1"}
    )
    with dask.config.set(config):
        plugin = Environment()
    assert plugin.settings.sys_path == ("/opt/a",)
    assert plugin.assignments == {"X": "1"}


def test_auto_formula():
    assert auto_threads(nthreads=2, cores=8) == 4
    assert auto_threads(nthreads=3, cores=8) == 2
    assert auto_threads(nthreads=16, cores=8) == 1
    assert auto_threads(nthreads=1, cores=1) == 1
    assert auto_threads(nthreads=1) == usable_cores()
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    assert usable_cores() <= len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_tightest_ancestor(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    root = tmp_path / "fs"
    (root / "kubepods" / "pod1" / "ctr").mkdir(parents=True)
    (root / "kubepods" / "pod1" / "ctr" / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    (root / "kubepods" / "cpu.max").write_text("400000 100000\n")
    assert cgroup_cpu_limit(str(root), str(proc)) == 2  # 1.5 CPUs round up
    (root / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(root), str(proc)) == 4
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(root), str(proc)) is None


def test_cgroup_v1_quota(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n2:cpu,cpuacct:/\n")
    group = tmp_path / "fs" / "cpu,cpuacct"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("300000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(proc)) == 3
    (group / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(proc)) is None


def test_pickle_carries_file_values_and_masks_repr(tmp_path):
    path = tmp_path / "s.env"
    path.write_text("DB_PASSWORD=hunter2\n")
    plugin = Environment(set=["API_TOKEN=abc", "PLAIN=1"], file=str(path), threads=2)
    path.unlink()  # the values travel: the file is read where the plugin is built
    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.assignments == {
        "DB_PASSWORD": "hunter2",
        "API_TOKEN": "abc",
        "PLAIN": "1",
    }
    assert clone.name == plugin.name == "catalog.env"
    assert "abc" not in repr(clone)
    assert "API_TOKEN=****" in repr(clone)
    assert "PLAIN=1" in repr(clone)


def test_plugin_kinds():
    from distributed.diagnostics.plugin import (
        NannyPlugin,
        SchedulerPlugin,
        WorkerPlugin,
    )

    assert isinstance(catalog.Environment(), NannyPlugin)
    assert isinstance(WorkerEnvironment(), WorkerPlugin)
    assert isinstance(SchedulerEnvironment(), SchedulerPlugin)
    assert Environment.restart is True


# ---------------------------------------------------------------------------
# In-process clusters
# ---------------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 2)])
async def test_worker_plugin_sets_and_restores(c, s, a):
    import numpy  # noqa: F401  (a BLAS pool loaded before the plugin)
    from threadpoolctl import threadpool_info

    names = ["CATALOG_TEST_A", "CATALOG_TEST_TOKEN", "OMP_NUM_THREADS"]
    before = live_environ(names)
    blas_before = [
        i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"
    ]
    with captured_logger("catalog.env") as log:
        await c.register_plugin(
            WorkerEnvironment(
                set=["CATALOG_TEST_A=1", "CATALOG_TEST_TOKEN=hunter2"],
                threads="auto",
                sys_path=["/nonexistent/catalog-test"],
            )
        )
    expected = str(auto_threads(2))
    assert await c.run(live_environ, names) == {
        a.address: {
            "CATALOG_TEST_A": "1",
            "CATALOG_TEST_TOKEN": "hunter2",
            "OMP_NUM_THREADS": expected,
        }
    }
    assert sys.path[0] == "/nonexistent/catalog-test"
    assert all(n == int(expected) for n in await c.submit(blas_threads))
    text = log.getvalue()
    assert "CATALOG_TEST_A=1" in text
    assert "CATALOG_TEST_TOKEN=****" in text
    assert "hunter2" not in text
    assert text.count("catalog.env on worker") == 1

    await c.unregister_worker_plugin("catalog.env")
    assert live_environ(names) == before
    assert "/nonexistent/catalog-test" not in sys.path
    assert [
        i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"
    ] == blas_before


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], Worker=Nanny)
async def test_nanny_plugin_restarts_only_when_needed(c, s, a):
    names = ["CATALOG_TEST_N", "OMP_NUM_THREADS", "PYTHONPATH"]
    first_pid = a.pid
    plugin = Environment(
        set=["CATALOG_TEST_N=1"], threads=2, sys_path=["/opt/catalog-t"]
    )
    await c.register_plugin(plugin)
    await c.wait_for_workers(1)
    (started,) = (await c.run(initial_environ, names)).values()
    assert started["CATALOG_TEST_N"] == "1"
    assert started["OMP_NUM_THREADS"] == "2"
    assert started["PYTHONPATH"].split(os.pathsep)[0] == "/opt/catalog-t"
    (head,) = (await c.run(sys_path_head)).values()
    assert "/opt/catalog-t" in head
    second_pid = a.pid
    assert second_pid != first_pid  # restarted to take the variables

    # The same settings again: the running worker already has them.
    await c.register_plugin(
        Environment(set=["CATALOG_TEST_N=1"], threads=2, sys_path=["/opt/catalog-t"])
    )
    assert a.pid == second_pid
    # New values: restart again.
    await c.register_plugin(Environment(set=["CATALOG_TEST_N=2"]))
    await c.wait_for_workers(1)
    assert a.pid != second_pid
    (started,) = (await c.run(initial_environ, names)).values()
    assert started["CATALOG_TEST_N"] == "2"
    assert "/opt/catalog-t" not in (started["PYTHONPATH"] or "")

    await c.unregister_worker_plugin("catalog.env", nanny=True)
    assert "CATALOG_TEST_N" not in a.pre_spawn_env
    assert "CATALOG_TEST_N" not in a.env
    assert (
        os.environ.get("CATALOG_TEST_N") is None
    )  # the leak into this process is undone


@gen_cluster(client=True, nthreads=[])
async def test_nanny_preload_from_config(c, s):
    config = {"catalog.env.set": ["CATALOG_TEST_P=yes"], "catalog.env.threads": 1}
    with dask.config.set(config):
        async with Nanny(
            s.address,
            nthreads=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            preload_nanny=["catalog.env"],
        ) as nanny:
            await c.wait_for_workers(1)
            (started,) = (
                await c.run(initial_environ, ["CATALOG_TEST_P", "MKL_NUM_THREADS"])
            ).values()
            assert started == {"CATALOG_TEST_P": "yes", "MKL_NUM_THREADS": "1"}
            assert nanny.plugins["catalog.env"].active
    assert os.environ.get("CATALOG_TEST_P") is None


@gen_cluster(client=True, nthreads=[])
async def test_nanny_preload_bad_config_refuses_to_start(c, s):
    config = {"catalog.env.file": "/nonexistent/catalog.env"}
    with dask.config.set(config), captured_logger("catalog") as log:
        with pytest.raises(RuntimeError, match="failed to start"):
            async with Nanny(
                s.address,
                nthreads=1,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                preload_nanny=["catalog.env"],
            ):
                pass
    text = log.getvalue()
    assert "config catalog.env.file" in text
    assert "cannot read /nonexistent/catalog.env" in text
    assert "refusing to start" in text
    assert not s.workers


@gen_cluster(nthreads=[])
async def test_scheduler_and_client_preload_set_their_process(s):
    names = ["CATALOG_TEST_S"]
    config = {
        "catalog.env.set": ["CATALOG_TEST_S=1"],
        "distributed.client.preload": ["catalog.env"],
    }
    with dask.config.set(config):
        plugin = SchedulerEnvironment()
        s.add_plugin(plugin, name=plugin.name)
        await plugin.start(s)
        assert live_environ(names) == {"CATALOG_TEST_S": "1"}
        await plugin.close()
        assert live_environ(names) == {"CATALOG_TEST_S": None}

        async with Client(s.address, asynchronous=True) as c:
            assert live_environ(names) == {"CATALOG_TEST_S": "1"}
            # The client preload sets its own process; it registers nothing.
            assert "catalog.env" not in s.worker_plugins
            assert "catalog.env" not in s.nanny_plugins
            assert c.status == "running"
    assert live_environ(names) == {"CATALOG_TEST_S": None}


# ---------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_nanny_preload_from_env_vars(procs, tmp_path):
    from distributed import Client as SyncClient

    _, address = procs.scheduler(env=REPO)
    env_file = tmp_path / "w.env"
    env_file.write_text("export FROM_FILE='f v'\nSERVICE_TOKEN=hunter2\n")
    common = {
        **REPO,
        "DASK_CATALOG__ENV__SET": "['CATALOG_CLI=1', 'OMP_NUM_THREADS=5']",
        "DASK_CATALOG__ENV__FILE": str(env_file),
        "DASK_CATALOG__ENV__THREADS": "auto",
        "DASK_CATALOG__ENV__SYS_PATH": str(tmp_path / "extra"),
    }
    two = procs.worker(
        address,
        "--nthreads",
        "2",
        "--name",
        "two",
        "--preload-nanny",
        "catalog.env",
        env=common,
    )
    one = procs.worker(
        address,
        "--nthreads",
        "1",
        "--name",
        "one",
        "--preload-nanny",
        "catalog.env",
        env=common,
    )
    names = [
        "CATALOG_CLI",
        "FROM_FILE",
        "SERVICE_TOKEN",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMBA_NUM_THREADS",
        "PYTHONPATH",
    ]
    with SyncClient(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=30)
        by_name = {
            info["name"]: addr
            for addr, info in client.scheduler_info(n_workers=-1)["workers"].items()
        }
        for name, nthreads in (("two", 2), ("one", 1)):
            addr = by_name[name]
            started = client.submit(
                initial_environ, names, workers=[addr], pure=False
            ).result(timeout=30)
            limit = str(auto_threads(nthreads))
            assert started["CATALOG_CLI"] == "1"
            assert started["FROM_FILE"] == "f v"
            assert started["SERVICE_TOKEN"] == "hunter2"
            assert started["OMP_NUM_THREADS"] == "5"  # set wins over threads
            assert started["OPENBLAS_NUM_THREADS"] == limit
            assert started["NUMBA_NUM_THREADS"] == limit
            assert started["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "extra")
            head = client.submit(sys_path_head, 5, workers=[addr], pure=False).result(
                timeout=30
            )
            assert str(tmp_path / "extra") in head
            pools = client.submit(blas_threads, workers=[addr], pure=False).result(
                timeout=60
            )
            assert pools and all(n == int(limit) for n in pools), pools
    for proc in (two, one):
        assert "catalog.env on nanny" in proc.output
        assert "SERVICE_TOKEN=****" in proc.output
        assert "hunter2" not in proc.output


@pytest.mark.slow
def test_cli_worker_preload_without_nanny(procs):
    from distributed import Client as SyncClient

    _, address = procs.scheduler(env=REPO)
    worker = procs.worker(
        address,
        "--no-nanny",
        "--nthreads",
        "1",
        "--preload",
        "catalog.env",
        "--env-set",
        "CATALOG_W=1",
        "--env-threads",
        "1",
        env=REPO,
    )
    with SyncClient(address, timeout="30s") as client:
        client.wait_for_workers(1, timeout=30)
        assert client.submit(live_environ, ["CATALOG_W", "MKL_NUM_THREADS"]).result(
            30
        ) == {
            "CATALOG_W": "1",
            "MKL_NUM_THREADS": "1",
        }
        assert client.submit(blas_threads, pure=False).result(60) == [1]
    assert "catalog.env on worker" in worker.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--env-set", "NOEQUALS"], "NOEQUALS"),
        (["--env-threads", "0"], "'0'"),
        (["--env-file", "/nonexistent/w.env"], "/nonexistent/w.env"),
    ],
)
def test_cli_bad_value_exits_2(args, named):
    result = subprocess.run(
        worker_command("tcp://127.0.0.1:1", "--preload", "catalog.env", *args),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "Error:" in line]
    assert error_lines, result.stderr
    assert args[0] in result.stderr
    assert named in result.stderr


@pytest.mark.slow
def test_cli_nanny_preload_bad_env_var_refuses(procs):
    _, address = procs.scheduler(env=REPO)
    worker = procs.worker(
        address,
        "--preload-nanny",
        "catalog.env",
        env={"DASK_CATALOG__ENV__THREADS": "0"},
        wait=False,
    )
    status = worker.popen.wait(60)
    assert status != 0
    assert "config catalog.env.threads: 0 (must be >= 1)" in worker.output
    assert "Registered to:" not in worker.output
