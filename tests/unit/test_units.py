"""Specification of durations and rates as users write them (``limitpal_tasks.core.units``)."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from limitpal_tasks import ConfigurationError, Rate
from limitpal_tasks.core.units import parse_duration, parse_rate

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
UNIT_NAMES = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}


# -- rates: parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "per"),
    [
        ("100/s", 100, 1.0),
        ("5/m", 5, 60.0),
        ("1000/h", 1000, 3600.0),
        ("10000/d", 10000, 86400.0),
        ("3/10s", 3, 10.0),
        ("2/5m", 2, 300.0),
        ("1.5/s", 1.5, 1.0),
        (" 7 / 2 h ", 7, 7200.0),
    ],
)
def test_rate_parse_reads_count_and_period(text: str, limit: float, per: float) -> None:
    """A rate string ``N/[k]unit`` parses to ``limit`` executions per ``per`` seconds."""
    rate = Rate.parse(text)
    assert (rate.limit, rate.per) == (limit, per)


@pytest.mark.parametrize("text", ["5/M", "5/Min", "5/MINUTES"])
def test_rate_parse_ignores_the_case_of_the_unit(text: str) -> None:
    """Units are case-insensitive, so ``"5/M"`` means five per minute."""
    assert Rate.parse(text) == Rate(5, 60.0)


def test_rate_parse_returns_an_integer_limit_for_whole_numbers() -> None:
    """A whole count such as ``"100/s"`` keeps an ``int`` limit (so ``repr`` reads naturally)."""
    rate = Rate.parse("100/s")
    assert type(rate.limit) is int


def test_rate_parse_passes_a_rate_through_unchanged() -> None:
    """``Rate.parse`` given a ``Rate`` returns that very object."""
    rate = Rate(7, 3.0)
    assert Rate.parse(rate) is rate


def test_parse_rate_is_rate_parse() -> None:
    """The module-level ``parse_rate`` gives the same result as ``Rate.parse``."""
    assert parse_rate("5/m") == Rate.parse("5/m")


def test_rate_constructor_defaults_to_per_second() -> None:
    """``Rate(n)`` is ``n`` executions per second."""
    assert Rate(12).per == 1.0


@pytest.mark.parametrize(
    ("per", "seconds"),
    [(60, 60.0), (2.5, 2.5), (timedelta(minutes=2), 120.0), ("10m", 600.0), ("250ms", 0.25)],
)
def test_rate_constructor_accepts_any_duration_for_per(per: float | timedelta | str, seconds: float) -> None:
    """``Rate(n, per)`` converts ``per`` like every other duration, to float seconds."""
    rate = Rate(3, per)  # type: ignore[arg-type]  # strings are accepted at runtime, as in settings
    assert rate.per == seconds
    assert isinstance(rate.per, float)


def test_rate_is_immutable() -> None:
    """Assigning to a ``Rate`` field raises."""
    rate = Rate(5)
    name = "limit"
    with pytest.raises(AttributeError):
        setattr(rate, name, 6)


# -- rates: interval, per_second, str ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "interval"),
    [("100/s", 0.01), ("5/m", 12.0), ("1000/h", 3.6), ("10000/d", 8.64), ("3/10s", 10 / 3)],
)
def test_rate_interval_is_seconds_between_conforming_executions(text: str, interval: float) -> None:
    """``interval`` is ``per / limit``, the GCRA emission interval."""
    assert Rate.parse(text).interval == pytest.approx(interval)


def test_rate_per_second_is_limit_over_period() -> None:
    """``per_second`` is ``limit / per``."""
    assert Rate.parse("30/m").per_second == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (Rate(100, 1), "100/s"),
        (Rate(5, 60), "5/m"),
        (Rate(1000, 3600), "1000/h"),
        (Rate(10000, 86400), "10000/d"),
        (Rate(3, 10), "3/10s"),
        (Rate(1.5, 1), "1.5/s"),
    ],
)
def test_rate_str_writes_the_user_notation(rate: Rate, text: str) -> None:
    """``str(rate)`` writes the shortest ``N/unit`` form, or ``N/Ks`` for other periods."""
    assert str(rate) == text


@pytest.mark.parametrize("text", ["100/s", "5/m", "1000/h", "10000/d", "3/10s", "1.5/s", "7/90s"])
def test_rate_str_parses_back_to_the_same_rate(text: str) -> None:
    """``Rate.parse(str(rate))`` equals ``rate`` for the usual notations."""
    rate = Rate.parse(text)
    assert Rate.parse(str(rate)) == rate


@given(n=st.integers(min_value=1, max_value=10**12), unit=st.sampled_from(sorted(PERIODS)))
def test_rate_str_round_trips_for_any_whole_count(n: int, unit: str) -> None:
    """Any whole-number rate written by ``str`` parses back to an equal rate (no lossy ``1e+06``)."""
    rate = Rate(n, PERIODS[unit])
    assert Rate.parse(str(rate)) == rate


# -- rates: invalid input -----------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "fast",
        "100",
        "/s",
        "100/",
        "100/x",
        "100/week",
        "0/s",
        "-5/s",
        "5/0s",
        "5/-1s",
        "1e3/s",
        "5/s/s",
        100,
        2.5,
        None,
        [100, 1],
        {"limit": 100},
    ],
)
def test_rate_parse_rejects_invalid_input_naming_field_and_value(value: object) -> None:
    """An invalid rate raises ``ConfigurationError`` with field ``rate`` and a message showing the value."""
    with pytest.raises(ConfigurationError) as info:
        Rate.parse(value)  # type: ignore[arg-type]  # settings hand us arbitrary objects
    assert info.value.field == "rate"
    assert info.value.value == value
    assert str(info.value).startswith("rate: ")
    assert repr(value) in str(info.value)


def test_rate_parse_error_names_the_callers_field() -> None:
    """``Rate.parse(value, field)`` reports the caller's field name, not ``rate``."""
    with pytest.raises(ConfigurationError) as info:
        Rate.parse("0/s", "rate_limit.rate")
    assert info.value.field == "rate_limit.rate"
    assert "'0/s'" in str(info.value)


def test_rate_per_milliseconds_is_not_read_as_per_minute() -> None:
    """``"5/ms"`` is either rejected or means five per millisecond, never five per minute."""
    try:
        rate = Rate.parse("5/ms")
    except ConfigurationError:
        return
    assert rate.per == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("limit", "per", "field"),
    [
        (0, 1.0, "rate.limit"),
        (-1, 1.0, "rate.limit"),
        (math.nan, 1.0, "rate.limit"),
        (math.inf, 1.0, "rate.limit"),
        (True, 1.0, "rate.limit"),
        ("5", 1.0, "rate.limit"),
        (5, 0, "rate.per"),
        (5, -1, "rate.per"),
        (5, math.inf, "rate.per"),
        (5, "soon", "rate.per"),
        (5, timedelta(0), "rate.per"),
    ],
)
def test_rate_constructor_rejects_bad_fields(limit: object, per: object, field: str) -> None:
    """``Rate(limit, per)`` raises ``ConfigurationError`` naming ``rate.limit``/``rate.per`` and the value."""
    with pytest.raises(ConfigurationError) as info:
        Rate(limit, per)  # type: ignore[arg-type]  # deliberately wrong types
    assert info.value.field == field
    bad = limit if field == "rate.limit" else per
    assert repr(bad) in str(info.value)


def test_rate_constructor_rejects_a_huge_integer_limit_as_configuration_error() -> None:
    """A limit too large for a float raises ``ConfigurationError``, not ``OverflowError``."""
    with pytest.raises(ConfigurationError) as info:
        Rate(10**400)
    assert info.value.field == "rate.limit"


@given(n=st.integers(min_value=1, max_value=10**9), unit=st.sampled_from(sorted(UNIT_NAMES)))
def test_rate_parse_round_trips_any_positive_count_and_unit(n: int, unit: str) -> None:
    """``Rate.parse(f"{n}/{unit}")`` is ``n`` per the unit's seconds, for every unit spelling."""
    rate = Rate.parse(f"{n}/{unit}")
    assert rate.limit == n
    assert rate.per == UNIT_NAMES[unit]


@given(
    n=st.integers(min_value=1, max_value=10**6),
    k=st.integers(min_value=1, max_value=1000),
    unit=st.sampled_from(sorted(PERIODS)),
)
def test_rate_parse_multiplies_the_period_by_its_count(n: int, k: int, unit: str) -> None:
    """``Rate.parse(f"{n}/{k}{unit}")`` spreads ``n`` over ``k`` units."""
    rate = Rate.parse(f"{n}/{k}{unit}")
    assert rate.limit == n
    assert rate.per == pytest.approx(k * PERIODS[unit])


@given(text=st.text())
@example(text="5/\u017f")  # LATIN SMALL LETTER LONG S case-folds to "s"
@example(text="5/\u017fec")
@example(text="\u0665/s")  # ARABIC-INDIC DIGIT FIVE
@example(text="9" * 400 + "/s")
def test_rate_parse_of_arbitrary_text_parses_or_raises_configuration_error(text: str) -> None:
    """Any string either parses to a valid ``Rate`` or raises ``ConfigurationError``, never anything else."""
    result: Rate | ConfigurationError
    try:
        result = Rate.parse(text)
    except ConfigurationError as exc:
        result = exc
    if isinstance(result, ConfigurationError):
        assert result.field == "rate"
    else:
        assert result.limit > 0
        assert result.per > 0


@given(text=st.text(alphabet="0123456789./ smhdayecinoutSMHD\u017f\u212a\t-", max_size=12))
def test_rate_parse_of_rate_like_text_parses_or_raises_configuration_error(text: str) -> None:
    """Strings made of rate characters either parse or raise ``ConfigurationError``, never anything else."""
    try:
        rate = Rate.parse(text)
    except ConfigurationError:
        return
    assert math.isfinite(rate.interval)


# -- durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        (0, 0.0),
        (timedelta(seconds=90), 90.0),
        (timedelta(milliseconds=250), 0.25),
        ("250ms", 0.25),
        ("10m", 600.0),
        ("3s", 3.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("7", 7.0),
        (" 10 M ", 600.0),
    ],
)
def test_parse_duration_converts_to_float_seconds(value: object, seconds: float) -> None:
    """Numbers, ``timedelta`` values and strings such as ``"250ms"`` or ``"10m"`` become float seconds."""
    result = parse_duration("field", value)
    assert result == pytest.approx(seconds)
    assert isinstance(result, float)


def test_parse_duration_none_is_infinite_when_allowed() -> None:
    """``None`` means "no bound" (infinity) where the field allows it."""
    assert parse_duration("defer.deadline", None, allow_none=True) == math.inf


def test_parse_duration_rejects_zero_when_not_allowed() -> None:
    """A zero duration raises ``ConfigurationError`` naming the field where zero is not allowed."""
    with pytest.raises(ConfigurationError) as info:
        parse_duration("policy.lease", 0, allow_zero=False)
    assert info.value.field == "policy.lease"
    assert "> 0" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        None,
        "",
        "soon",
        "10x",
        "-5s",
        "1e3",
        "5 minutes",
        [5],
        timedelta(seconds=-1),
    ],
)
def test_parse_duration_rejects_invalid_input_naming_field_and_value(value: object) -> None:
    """An invalid duration raises ``ConfigurationError`` whose message names the field and shows the value."""
    with pytest.raises(ConfigurationError) as info:
        parse_duration("breaker.open_for", value)
    assert info.value.field == "breaker.open_for"
    assert str(info.value).startswith("breaker.open_for: ")
    assert repr(value) in str(info.value)


def test_parse_duration_rejects_a_huge_integer_as_configuration_error() -> None:
    """An integer too large for a float raises ``ConfigurationError``, not ``OverflowError``."""
    with pytest.raises(ConfigurationError) as info:
        parse_duration("policy.lease", 10**400)
    assert info.value.field == "policy.lease"


@given(n=st.integers(min_value=0, max_value=10**6), unit=st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_parse_duration_scales_any_count_by_its_unit(n: int, unit: str) -> None:
    """``f"{n}{unit}"`` is ``n`` times the unit's seconds."""
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}[unit]
    assert parse_duration("field", f"{n}{unit}") == pytest.approx(n * scale)


@given(text=st.text())
@example(text="5\u017f")
@example(text="5m\u017f")
@example(text="9" * 400)
def test_parse_duration_of_arbitrary_text_parses_or_raises_configuration_error(text: str) -> None:
    """Any string parses to finite seconds >= 0 or raises ``ConfigurationError``, never anything else."""
    result: float | ConfigurationError
    try:
        result = parse_duration("field", text)
    except ConfigurationError as exc:
        result = exc
    if isinstance(result, ConfigurationError):
        assert result.field == "field"
    else:
        assert math.isfinite(result)
        assert result >= 0


@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_parse_duration_of_any_float_is_itself_or_configuration_error(value: float) -> None:
    """A float is accepted as-is exactly when it is finite and >= 0; otherwise ``ConfigurationError``."""
    if math.isfinite(value) and value >= 0:
        assert parse_duration("field", value) == value
    else:
        with pytest.raises(ConfigurationError):
            parse_duration("field", value)
