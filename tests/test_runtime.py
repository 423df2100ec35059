"""Tests of catalog._runtime pieces shared by several entries."""

from __future__ import annotations

import json
import threading
import time

import pytest
from dask.utils import key_split
from distributed.utils_test import gen_cluster

import catalog
from catalog._runtime import UNKNOWN_PREFIX, JsonLinesFile, prefix_of


@pytest.mark.parametrize(
    "key",
    ["inc-0123456789abcdef0123456789abcdef", ("getitem-abc", 3, 0), b"add-1", 7, 1.5],
)
def test_prefix_of_agrees_with_key_split(key):
    assert prefix_of(key) == key_split(key)


@pytest.mark.parametrize("key", [b"\xff\xfe", [1, 2], {"a": 1}, object()])
def test_prefix_of_any_key_without_raising(key):
    # b"\xff" is a key dask accepts, on which key_split itself raises.
    assert prefix_of(key) == UNKNOWN_PREFIX


class _FlakyFile(JsonLinesFile):
    """Fails its first background flush, the way a bad record would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures = 1

    def flush(self):
        if self.failures and threading.current_thread() is self._thread:
            self.failures -= 1
            raise ValueError("a record that cannot be encoded")
        super().flush()


def test_flush_thread_survives_a_failing_flush(tmp_path):
    errors: list[tuple[str, BaseException]] = []
    path = tmp_path / "lines.jsonl"
    f = _FlakyFile(
        path, flush_interval=0.01, on_error=lambda what, e: errors.append((what, e))
    ).open()
    try:
        f.write({"n": 1})
        deadline = time.monotonic() + 30
        while not path.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f._thread is not None and f._thread.is_alive()
    finally:
        f.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"n": 1}]
    ((what, exc),) = errors
    assert what == f"flushing {path}" and isinstance(exc, ValueError)


def test_close_releases_the_file_when_the_last_flush_fails(tmp_path):
    f = JsonLinesFile(tmp_path / "lines.jsonl").open()
    f._buffer.append(object())  # not a str: joining the buffer fails
    with pytest.raises(TypeError):
        f.close()
    assert f._fd is None


# -- helpers built once for every entry (catalog.entry) --------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_count_counts_only_beside_the_metrics_entry_with_capped_prefixes(c, s, a):
    from catalog.entry import count, families_for

    count(a, "sample_things", "Things.", prefix="inc")  # no metrics: nothing
    assert families_for(a) is None
    await c.register_plugin(catalog.Metrics(port=0, max_prefixes=1))
    fam = families_for(a)
    assert fam is not None
    count(a, "sample_things", "Things.", prefix="inc")
    count(a, "sample_things", "Things.", prefix="add", amount=2)  # past the cap
    count(a, "sample_plain", "Plain.")
    families = {m.name: m for m in fam.collect()}
    things = {
        sample.labels["prefix"]: sample.value
        for sample in families["dask_catalog_sample_things"].samples
    }
    assert things == {"inc": 1, "other": 2}
    (plain,) = families["dask_catalog_sample_plain"].samples
    assert plain.value == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_plugin_on_finds_only_the_active_plugin_of_that_class(c, s, a):
    from catalog.entry import plugin_on
    from catalog.tracer import ENTRY, SchedulerTracer, Tracer

    assert plugin_on(a, ENTRY, Tracer) is None
    await c.register_plugin(catalog.Tracer())
    assert plugin_on(a, ENTRY, Tracer) is a.plugins["catalog.tracer"]
    assert plugin_on(a, ENTRY, SchedulerTracer) is None
    assert plugin_on(object(), ENTRY, Tracer) is None


def test_running_states_are_worker_task_states():
    from typing import get_args

    from distributed.worker_state_machine import TaskStateState

    from catalog.entry import RUNNING_STATES

    assert set(get_args(TaskStateState)) >= RUNNING_STATES
