"""Secret masking (#22 point 5): every place that shows a value hides secrets.

Each finding of the review has a test here: secret names beyond TOKEN/SECRET/
PASSWORD/KEY/CREDENTIAL, credentials inside URLs, values read from an env file,
config values of the wrong shape, and a Pushgateway URL with credentials in
repr, logs, ``dask catalog status`` and ``last_error``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time

import click
import dask.config
import pytest
from distributed.utils_test import captured_logger, gen_cluster

import catalog
from catalog._entry import OptionError
from catalog._secrets import MASK, looks_secret, mask, mask_text
from catalog._status import status_text
from catalog.cli import show_text
from catalog.docs import options_table
from tests.procs import LOOPBACK

SECRET = "hunter2-s3cr3t"

#: The names the review found logged in clear, and the ones masked before.
SECRET_NAMES = [
    "DB_PASSWD",
    "MYSQL_PWD",
    "SENTRY_DSN",
    "REDIS_AUTH",
    "PGPASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "GITHUB_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "SSH_PASSPHRASE",
    "session_cookie",
]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# -- the helper --------------------------------------------------------------------


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_common_secret_names_are_masked(name):
    assert looks_secret(name)
    assert mask_text(f"{name}={SECRET}") == f"{name}={MASK}"
    assert mask_text(f"{name}={SECRET} with spaces") == f"{name}={MASK}"


@pytest.mark.parametrize("name", ["PATH", "OMP_NUM_THREADS", "HOME", "LANG"])
def test_plain_names_are_shown(name):
    assert not looks_secret(name)
    assert mask_text(f"{name}=/usr/bin") == f"{name}=/usr/bin"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgres://app:pw@db:5432/prod", f"postgres://app:{MASK}@db:5432/prod"),
        ("https://ghp_abc@github.com/x.git", f"https://{MASK}@github.com/x.git"),
        ("http://u:p@ss@gateway:9091", f"http://u:{MASK}@gateway:9091"),
        ("redis://:pw@cache:6379/0", f"redis://:{MASK}@cache:6379/0"),
        ("DATABASE_URL=mysql://root:pw@h/db", f"DATABASE_URL=mysql://root:{MASK}@h/db"),
        (
            "push to http://u:pw@h:1 failed: 401",
            f"push to http://u:{MASK}@h:1 failed: 401",
        ),
        ("http://h/q?access_token=pw&x=1", f"http://h/q?access_token={MASK}&x=1"),
        ("--metrics-port-password=pw", f"--metrics-port-password={MASK}"),
        ("mailto:someone@example.org", "mailto:someone@example.org"),
        ("http://gateway:9091/metrics", "http://gateway:9091/metrics"),
    ],
)
def test_credentials_inside_text_are_masked(text, shown):
    assert mask_text(text) == shown


def test_mask_walks_lists_tuples_and_mappings():
    value = {
        "API_TOKEN": SECRET,
        "url": f"http://u:{SECRET}@h",
        "set": ("A=1", f"DB_PASSWD={SECRET}"),
        "n": 3,
    }
    assert mask(value) == {
        "API_TOKEN": MASK,
        "url": f"http://u:{MASK}@h",
        "set": ("A=1", f"DB_PASSWD={MASK}"),
        "n": 3,
    }


# -- env: the names and the values read from a file --------------------------------


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_env_log_lines_mask_common_names_urls_and_file_values(
    c, s, a, tmp_path_factory
):
    path = tmp_path_factory.mktemp("env") / "app.env"
    path.write_text(f"MYSQL_PWD={SECRET}\nSENTRY_DSN=https://{SECRET}@sentry/1\n")
    plugin = catalog.WorkerEnvironment(
        set=[
            f"DB_PASSWD={SECRET}",
            f"DATABASE_URL=postgres://u:{SECRET}@h/db",
            f"REDIS_AUTH={SECRET}",
            "PLAIN=1",
        ],
        file=str(path),
    )
    with captured_logger("catalog", level=logging.INFO, propagate=True) as log:
        await c.register_plugin(plugin)
    text = log.getvalue()
    assert "catalog.env on worker" in text
    assert SECRET not in text, text
    for name in ("DB_PASSWD", "REDIS_AUTH", "MYSQL_PWD", "SENTRY_DSN"):
        assert f"{name}={MASK}" in text
    assert f"DATABASE_URL=postgres://u:{MASK}@h/db" in text
    assert "PLAIN=1" in text
    assert SECRET not in repr(plugin)
    shown = a.plugins["catalog.env"].status()
    assert SECRET not in json.dumps(shown)
    await c.unregister_worker_plugin("catalog.env")


def test_env_usage_error_never_shows_a_url_password():
    with pytest.raises(click.BadParameter) as info:
        catalog.env.dask_setup.parse_args(
            click.Context(catalog.env.dask_setup),
            ["--env-set", f"1DATABASE_URL=postgres://u:{SECRET}@h/db"],
        )
    assert SECRET not in info.value.format_message()


# -- config values of the wrong shape ----------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"API_TOKEN": SECRET},  # a mapping where a list belongs
        {"DB_PASSWD": SECRET, "A": "1"},
        [["DB_PASSWD", SECRET]],  # a list of pairs
        f"API_TOKEN {SECRET}",  # no '='
    ],
)
def test_config_value_of_the_wrong_shape_never_echoes_a_secret(value):
    with dask.config.set({"catalog.env.set": value}):
        with pytest.raises(OptionError) as info:
            catalog.WorkerEnvironment()
    message = str(info.value)
    assert "catalog.env.set" in message and "accepted:" in message
    assert SECRET not in message, message


def test_config_url_of_the_wrong_shape_never_echoes_its_password():
    with dask.config.set({"catalog.metrics.pushgateway": f"ftp://u:{SECRET}@h"}):
        with pytest.raises(OptionError) as info:
            catalog.Metrics()
    assert "catalog.metrics.pushgateway" in str(info.value)
    assert SECRET not in str(info.value)
    assert f"ftp://u:{MASK}@h" in str(info.value)


# -- secret options: declared, never echoed ----------------------------------------


def test_secret_options_are_declared_and_shown_as_such():
    entry = catalog.metrics.ENTRY
    secret = {opt.name for opt in entry.options if opt.secret}
    assert secret == {"pushgateway-password", "port-password"}
    assert "secret" in options_table("metrics")
    section = re.search(
        r"^  port-password:.*?(?=^  \S|\Z)", show_text("metrics"), re.M | re.S
    )
    assert section is not None and "secret" in section.group(0)


@pytest.mark.parametrize("bad", [[SECRET], {"v": SECRET}, 12.5j])
def test_a_rejected_secret_is_never_echoed(bad):
    with pytest.raises(OptionError) as info:
        catalog.Metrics(pushgateway_password=bad)
    message = str(info.value)
    assert "pushgateway_password=" in message and "accepted:" in message
    assert SECRET not in message and "12.5j" not in message


def test_cli_secret_usage_error_never_echoes():
    with pytest.raises(click.BadParameter) as info:
        catalog.metrics.dask_setup.parse_args(
            click.Context(catalog.metrics.dask_setup),
            ["--metrics-pushgateway", f"ftp://u:{SECRET}@gateway"],
        )
    message = info.value.format_message()
    assert "--metrics-pushgateway" in message
    assert SECRET not in message and f"ftp://u:{MASK}@gateway" in message


# -- a Pushgateway URL with credentials ---------------------------------------------


def test_pushgateway_url_credentials_hidden_in_repr_and_status():
    plugin = catalog.Metrics(pushgateway=f"http://pusher:{SECRET}@gateway:9091")
    assert SECRET not in repr(plugin)
    assert f"http://pusher:{MASK}@gateway:9091" in repr(plugin)
    assert SECRET not in json.dumps(plugin.status())
    plugin = catalog.Metrics(
        pushgateway="http://gateway:9091",
        pushgateway_username="pusher",
        pushgateway_password=SECRET,
    )
    assert SECRET not in repr(plugin) and "pushgateway_password='****'" in repr(plugin)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_pushgateway_credentials_hidden_in_logs_last_error_and_status(c, s, a):
    gateway = f"http://pusher:{SECRET}@{LOOPBACK}:{closed_port()}"
    with captured_logger("catalog", level=logging.INFO, propagate=True) as log:
        await c.register_plugin(
            catalog.Metrics(pushgateway=gateway, push_interval="50ms")
        )
        plugin = a.plugins[catalog.Metrics.name]
        deadline = time.monotonic() + 30
        while plugin.errors < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert plugin.errors >= 2
        data = await asyncio.to_thread(catalog.status, c)
    text = log.getvalue()
    assert "push to http://pusher:****@127.0.0.1:" in text
    assert SECRET not in text, text
    assert plugin.last_error.startswith("push to http://pusher:****@")
    assert SECRET not in json.dumps(data)
    assert SECRET not in status_text(data)
    await c.unregister_worker_plugin(catalog.Metrics.name)


def test_status_text_masks_what_an_older_server_sends():
    # A server running an older catalog sends its options unmasked: the table a
    # person reads still hides them.
    data = {
        "scheduler": {"address": "tcp://s:8786", "catalog": "0.1.0", "entries": {}},
        "workers": {
            "tcp://w:1": {
                "catalog": "0.1.0",
                "entries": {
                    "metrics": {
                        "active": True,
                        "options": {"pushgateway": f"http://u:{SECRET}@g"},
                        "last_error": f"push to http://u:{SECRET}@g: boom",
                        "errors": 1,
                    }
                },
            }
        },
    }
    assert SECRET not in status_text(data)
