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
def test_size_never_crashes_and_never_takes_a_bare_number(text):
    try:
        value = Size().convert(text, None, None)
    except click.BadParameter as exc:
        assert repr(text) in exc.format_message()
    else:
        assert value > 0
        assert any(c.isalpha() for c in text)


@given(st.floats(min_value=1e-9, max_value=1.0))
def test_fraction_in_unit_interval_is_a_fraction(number):
    assert SizeOrFraction("limit").convert(str(number), None, None) == number


@given(st.floats(min_value=1.0001, max_value=1e12))
def test_bare_number_above_one_is_refused(number):
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
