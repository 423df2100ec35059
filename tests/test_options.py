"""Property-based tests of the option parsers shared by every entry."""

from __future__ import annotations

import click
import pytest
from dask.utils import format_bytes
from hypothesis import given
from hypothesis import strategies as st

from catalog._entry import iter_entries
from catalog._options import (
    Boolean,
    Duration,
    FloatList,
    Integer,
    LogLevel,
    NameValue,
    RotateSize,
    Size,
    SizeOrFraction,
)

UNITS = ["B", "kB", "KiB", "MB", "MiB", "GB", "GiB", "TB", "TiB"]


def bad(type_, value) -> str:
    with pytest.raises(click.BadParameter) as info:
        type_.convert(value, None, None)
    return info.value.format_message()


@given(st.integers(min_value=1, max_value=2**50), st.sampled_from(UNITS))
def test_size_reads_dask_spellings(number, unit):
    from dask.utils import parse_bytes

    assert Size().convert(f"{number}{unit}", None, None) == parse_bytes(
        f"{number}{unit}"
    )


@given(st.integers(min_value=1, max_value=2**50))
def test_size_is_idempotent_and_round_trips_format_bytes(nbytes):
    size = Size()
    assert size.convert(size.convert(nbytes, None, None), None, None) == nbytes
    text = format_bytes(nbytes)
    assert abs(size.convert(text, None, None) - nbytes) <= nbytes * 0.01 + 1


@given(st.floats(allow_nan=True, allow_infinity=True).map(str) | st.text(max_size=12))
def test_size_never_crashes_and_takes_only_whole_bytes(text):
    try:
        value = Size().convert(text, None, None)
    except click.BadParameter as exc:
        assert repr(text) in exc.format_message()
    else:
        assert isinstance(value, int) and value > 0


@given(st.integers(min_value=1, max_value=2**53))
def test_bare_whole_number_is_bytes_as_in_dask(nbytes):
    from dask.utils import parse_bytes

    for value in (nbytes, str(nbytes), float(nbytes)):
        assert Size().convert(value, None, None) == parse_bytes(str(nbytes)) == nbytes


@given(st.floats(min_value=1e-9, max_value=1.0))
def test_fraction_in_unit_interval_is_a_fraction(number):
    assert SizeOrFraction("limit").convert(str(number), None, None) == number


@given(st.floats(min_value=1.0001, max_value=1e12).filter(lambda x: not x.is_integer()))
def test_bare_number_above_one_that_is_not_whole_is_refused(number):
    message = bad(SizeOrFraction("worker memory limit"), str(number))
    assert "fraction" in message and "GiB" in message


SECONDS_PER = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(sorted(SECONDS_PER)))
def test_duration_reads_dask_spellings(number, unit):
    parsed = Duration().convert(f"{number}{unit}", None, None)
    assert parsed == pytest.approx(number * SECONDS_PER[unit])


@given(st.text(max_size=10))
def test_duration_never_crashes(text):
    try:
        value = Duration().convert(text, None, None)
    except click.BadParameter as exc:
        assert repr(text) in exc.format_message()
    else:
        assert value > 0


def test_nullable_words_mean_unset():
    assert Duration(nullable=True).convert("none", None, None) is None
    assert Duration(nullable=True).convert(None, None, None) is None
    assert "none" in Duration(nullable=True).describe()


@given(
    st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z"),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30),
)
def test_name_value_keeps_the_value_verbatim(name, value):
    assert NameValue().convert(f"{name}={value}", None, None) == f"{name}={value}"


@given(st.text(max_size=30))
def test_name_value_rejects_without_crashing(text):
    try:
        out = NameValue().convert(text, None, None)
    except click.BadParameter as exc:
        assert "NAME=VALUE" in exc.format_message()
    else:
        assert "=" in out


@given(
    st.lists(st.sampled_from(["env", "tracer", "memory", "metrics"]), max_size=6),
    st.data(),
)
def test_enable_lists_split_on_commas_and_keep_order(names, data):
    joined = [",".join(names[i : i + 2]) for i in range(0, len(names), 2)]
    result = iter_entries(joined)
    assert result == list(dict.fromkeys(names))


@given(
    st.lists(
        st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=20, unique=True
    )
)
def test_buckets_must_increase(numbers):
    ordered = sorted(numbers)
    assert FloatList().convert(",".join(map(repr, ordered)), None, None) == tuple(
        ordered
    )
    if len(ordered) > 1:
        bad(FloatList(), list(reversed(ordered)))


@pytest.mark.parametrize(
    ("type_", "value", "accepted"),
    [
        (Integer(1), "0", ">= 1"),
        (Integer(1), "abc", "whole number"),
        (Integer(1), True, "whole number"),
        (Boolean(), "maybe", "true or false"),
        (LogLevel(), "LOUD", "DEBUG"),
        (Size(), "-1GiB", "size"),
        (SizeOrFraction("limit"), "0", "fraction"),
    ],
)
def test_errors_show_value_and_what_is_accepted(type_, value, accepted):
    message = bad(type_, value)
    assert repr(value) in message and accepted in message


# ---------------------------------------------------------------------------
# Sizes: a bare whole number is bytes, in every way in (issues #15, #22)
# ---------------------------------------------------------------------------


def _ways_in(entry_module, option: str, value):
    """The setting ``value`` gives through each way in, or the error it gives.

    CLI (click, as `dask worker` parses it), Python keyword, dask config and an
    environment variable (parsed by dask's own ``collect_env``).
    """
    import dask.config

    from catalog._entry import OptionError

    entry = entry_module.dask_setup.entry
    opt = entry.option(option)
    plugin = entry_module.dask_setup.plugins["worker"]
    out = {}
    ctx = entry_module.dask_setup.make_context(
        "dask_setup", [entry.flag(opt), str(value)]
    )
    error = ctx.params.get("_usage_error")
    out["cli"] = error or entry.given_from_params(ctx.params)[opt.keyword]
    for way, make in [
        ("python", lambda: plugin(**{opt.keyword: value})),
        ("config", lambda: _with_config({entry.config_key(opt): value}, plugin)),
        (
            "env",
            lambda: _with_config(
                dask.config.collect_env({entry.env_var(opt): str(value)}), plugin
            ),
        ),
    ]:
        try:
            out[way] = getattr(make().settings, opt.keyword)
        except OptionError as exc:
            out[way] = str(exc)
    return out


def _with_config(config, plugin):
    import dask.config

    with dask.config.set(config):
        return plugin()


@pytest.mark.parametrize("value", [20000, "20000", " 20000 "])
def test_bare_integer_is_bytes_for_a_file_size_in_every_way_in(value):
    import catalog.logging

    got = _ways_in(catalog.logging, "rotate-bytes", value)
    assert got == {"cli": 20000, "python": 20000, "config": 20000, "env": 20000}


@pytest.mark.parametrize(
    ("option", "value", "nbytes"),
    [
        ("task-limit", 2**30, 2**30),
        ("task-limit", "1073741824", 2**30),
        ("process-limit", 4 * 2**30, 4 * 2**30),
        ("process-limit", "4294967296", 4 * 2**30),
        ("host-min-available", 2**20, 2**20),
    ],
)
def test_bare_integer_is_bytes_for_a_memory_amount_in_every_way_in(
    option, value, nbytes
):
    import catalog.memory

    got = _ways_in(catalog.memory, option, value)
    assert got == {"cli": nbytes, "python": nbytes, "config": nbytes, "env": nbytes}


@pytest.mark.parametrize(
    ("option", "value"),
    [("process-limit", 4), ("task-limit", "200"), ("host-min-available", 1023)],
)
def test_memory_amount_below_1mib_is_refused_with_the_unit_suggested(option, value):
    import catalog.memory

    got = _ways_in(catalog.memory, option, value)
    for way, message in got.items():
        assert isinstance(message, str), (way, message)
        assert f"{value} is {value} bytes" in message, (way, message)
        assert f"did you mean {value}MiB or {value}GiB?" in message, (way, message)
        assert "1 MiB" in message, (way, message)
    assert "--memory-" + option in got["cli"]
    assert option.replace("-", "_") in got["python"]
    assert f"catalog.memory.{option}" in got["config"]
    assert f"catalog.memory.{option}" in got["env"]


def test_memory_amount_with_a_unit_below_1mib_is_refused():
    message = bad(Size(memory=True), "512KiB")
    assert "'512KiB'" in message and "below the 1 MiB" in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-5", "negative"),
        (-5, "negative"),
        ("-1GiB", "negative"),
        ("1.5", "whole number of bytes"),
        (1.5, "whole number of bytes"),
        ("nan", "whole number of bytes"),
        ("5 parsecs", "unit"),
        ("0", "more than 0"),
        (True, "not a size"),
    ],
)
def test_ambiguous_sizes_are_refused_saying_why(value, reason):
    message = bad(Size(), value)
    assert repr(value) in message and reason in message
    assert "whole number of bytes" in message.split("accepted:")[1]


def test_rotate_size_takes_bytes_and_zero_for_never():
    assert RotateSize().convert("20000", None, None) == 20000
    assert RotateSize().convert(0, None, None) == 0
    assert RotateSize().convert("0", None, None) == 0
    assert "negative" in bad(RotateSize(), "-1")


@pytest.mark.parametrize(
    ("value", "setting"),
    [
        ("0.9", 0.9),
        (0.9, 0.9),
        ("1", 1.0),
        (1, 1.0),
        ("2GiB", 2 * 2**30),
        ("4294967296", 4 * 2**30),
        (4 * 2**30, 4 * 2**30),
        (4.0 * 2**30, 4 * 2**30),
    ],
)
def test_size_or_fraction_reads_fractions_and_bytes(value, setting):
    parsed = SizeOrFraction("worker memory limit").convert(value, None, None)
    assert parsed == setting and type(parsed) is type(setting)
    again = SizeOrFraction("worker memory limit").convert(parsed, None, None)
    assert again == parsed and type(again) is type(parsed)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1.5", "fraction in (0, 1]"),
        ("0", "fraction in (0, 1]"),
        ("-0.5", "negative"),
        ("4", "did you mean 4MiB or 4GiB?"),
    ],
)
def test_size_or_fraction_refuses_what_cannot_be_meant(value, reason):
    message = bad(SizeOrFraction("worker memory limit"), value)
    assert repr(value) in message and reason in message
