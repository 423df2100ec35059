"""Hostile and unlucky files: symlinks, loose modes, deleted or lost files, `~`.

Every entry writes its files through the same machinery (``open_private``,
``private_dir``, ``JsonLinesFile``), so these run against real entries set up
on in-process clusters.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import dask.config
import pytest
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog._runtime import JsonLinesFile


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -- symlinks and modes -------------------------------------------------------


@gen_cluster(client=True, nthreads=[])
async def test_events_file_refuses_a_symlink_unless_asked(c, s):
    where = Path(s.local_directory)
    target = where / "elsewhere.jsonl"
    target.write_text("")
    link = where / "events.jsonl"
    link.symlink_to(target)
    with pytest.raises(Exception, match=r"symbolic link.*catalog.follow-symlinks"):
        await c.register_plugin(catalog.EventLog(file=str(link)))
    assert target.read_text() == ""
    # In-process, the scheduler reads the client's config when it sets up.
    with dask.config.set({"catalog.follow-symlinks": True}):
        await c.register_plugin(catalog.EventLog(file=str(link)))
    await c.log_event("through-the-link", {})
    assert [e["event"] for e in lines_of(target)] == ["through-the-link"]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_logging_file_refuses_a_symlink(c, s, a):
    target = Path(a.local_directory) / "victim"
    target.write_text("precious\n")
    link = Path(a.local_directory) / "worker.log"
    link.symlink_to(target)
    with pytest.raises(Exception, match="symbolic link"):
        await c.register_plugin(catalog.StructuredLogging(file=str(link)))
    assert target.read_text() == "precious\n"


def test_existing_loose_file_is_made_owner_only(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text("")
    os.chmod(path, 0o666)
    with captured_logger("catalog", level=logging.WARNING) as log:
        f = JsonLinesFile(str(path)).open()
        f.write({"n": 1})
        f.close()
    assert mode_of(path) == 0o600
    assert "0666" in log.getvalue() and str(path) in log.getvalue()
    assert lines_of(path) == [{"n": 1}]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_trace_dir_and_its_parents_are_created_owner_only(c, s, a):
    top = Path(a.local_directory) / "new-parent"
    d = top / "trace"
    await c.register_plugin(catalog.Tracer(dir=str(d)))
    assert mode_of(top) == 0o700 and mode_of(d) == 0o700
    (path,) = d.iterdir()
    assert mode_of(path) == 0o600


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_trace_dir_symlink_is_refused(c, s, a):
    real = Path(a.local_directory) / "real"
    real.mkdir()
    link = Path(a.local_directory) / "trace"
    link.symlink_to(real)
    with pytest.raises(Exception, match="symbolic link"):
        await c.register_plugin(catalog.Tracer(dir=str(link)))
    assert list(real.iterdir()) == []


# -- `~` in every path option ----------------------------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_tilde_is_expanded_for_the_tracer_dir_and_events_file(c, s, a):
    home = Path(a.local_directory) / "home"
    home.mkdir()
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # expanduser reads HOME on the server
    try:
        await c.register_plugin(catalog.Tracer(dir="~/trace"))
        await c.register_plugin(catalog.EventLog(file="~/events.jsonl"))
        tracer_file = a.plugins["catalog.tracer"].status()["file"]
        events_file = s.plugins["catalog.events"].status()["file"]
    finally:
        if old is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old
    assert tracer_file.startswith(str(home / "trace") + os.sep)
    assert events_file == str(home / "events.jsonl")
    assert (home / "events.jsonl").exists()
    assert not Path("~").exists()


# -- a file lost at run time -------------------------------------------------------


@gen_cluster(client=True, nthreads=[])
async def test_deleted_events_file_is_reopened_at_rotation(c, s):
    # The repro: delete the file, then many events with a small rotation.
    path = Path(s.local_directory) / "events.jsonl"
    await c.register_plugin(catalog.EventLog(file=str(path), rotate_bytes="2KiB"))
    path.unlink()
    for i in range(2000):
        await c.log_event("my-topic", {"i": i})
    plugin = s.plugins["catalog.events"]
    status = plugin.status()
    assert status["buffered"] == 0 and status["dropped"] == 0
    assert path.exists()
    assert all(e["event"] == "my-topic" for e in lines_of(path))
    # The newest event is in the new file and the rotation goes on as before.
    assert lines_of(path)[-1]["msg"] == {"i": 1999}
    backups = sorted(Path(s.local_directory).glob("events.jsonl.*"))
    assert [p.name for p in backups] == [f"events.jsonl.{i}" for i in range(1, 6)]
    assert status["written"] >= 2000


def test_unwritable_file_keeps_a_bounded_buffer_and_says_so_once(tmp_path):
    d = tmp_path / "gone"
    d.mkdir()
    path = d / "lines.jsonl"
    f = JsonLinesFile(str(path), rotate_bytes=10, backups=1, max_buffered=5).open()
    f.write({"first": True})
    os.unlink(path)
    os.rmdir(d)  # the next rotation cannot make a new file
    with captured_logger("catalog", level=logging.ERROR) as log:
        for i in range(20):
            f.write({"i": i, "pad": "x" * 50})
    assert f.buffered == 5 and f.dropped == 15
    assert len(log.getvalue().splitlines()) == 1
    assert "lines.jsonl" in log.getvalue() and "5 lines" in log.getvalue()
    d.mkdir()  # writable again: the next flush opens the path anew
    f.write({"i": "after"})
    f.close()
    kept = lines_of(path)
    assert [e["i"] for e in kept] == [0, 1, 2, 3, 4, "after"]
    assert f.dropped == 15


# -- log lines ----------------------------------------------------------------------


@gen_cluster(client=True, nthreads=[])
async def test_event_topic_cannot_forge_a_log_line(c, s):
    await c.register_plugin(catalog.EventLog())
    with captured_logger("catalog.events", level=logging.INFO) as log:
        await c.log_event("t\n<forged line>\x1b[31m", {"x": "a\rb"})
    text = log.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.count("\n") == 1  # one record, one line
    assert "t\\n<forged line>\\x1b[31m" in text


def test_every_catalog_logger_escapes_control_characters():
    for module in catalog.entry_modules():
        assert module  # imported, so every logger the package makes exists
    names = [
        name
        for name in logging.Logger.manager.loggerDict
        if name == "catalog" or name.startswith("catalog.")
    ]
    assert "catalog.events" in names and "catalog.memory" in names
    for name in names:
        log = logging.getLogger(name)
        with captured_logger(name, level=logging.DEBUG, propagate=False) as out:
            log.warning("key %s", "k\n2026 forged\u2028\x1b[0m")
        assert out.getvalue() == "key k\\n2026 forged\\u2028\\x1b[0m\n", name


def test_escape_control_examples_run():
    import doctest

    import catalog._text

    result = doctest.testmod(catalog._text)
    assert result.attempted and not result.failed


def test_status_table_escapes_an_error_text():
    data = {
        "scheduler": {
            "address": "tcp://127.0.0.1:1",
            "catalog": "1",
            "entries": {
                "events": {
                    "active": True,
                    "options": {"file": "e\x1b[2J"},
                    "last_error": "writing x: boom\nworker tcp://forged  active",
                    "errors": 1,
                }
            },
        },
        "workers": {},
    }
    text = catalog.status_text(data)
    assert "\x1b" not in text and "forged" in text
    assert len(text.splitlines()) == 3  # the server, the entry, its error
