"""Durations and rates as users write them, converted once at the edge."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta

from ..errors import ConfigurationError

__all__ = ["Duration", "Rate", "RateLike", "exact", "parse_duration", "parse_rate"]

Duration = float | int | timedelta | str
"""Seconds, a ``timedelta``, or a string such as ``"10m"``, ``"1.5s"``, ``"250ms"``."""
"""Seconds as a number, or a :class:`datetime.timedelta`."""

_PERIODS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_UNIT_WORDS = {"ms": "ms", "sec": "s", "second": "s", "min": "m", "minute": "m", "hour": "h", "day": "d"}
# ASCII only: under plain IGNORECASE, look-alike letters such as "ſ" would match "s".
_FLAGS = re.IGNORECASE | re.ASCII
_RATE_RE = re.compile(
    r"^\s*(?P<n>\d+(?:\.\d+)?)\s*/\s*(?P<k>\d+(?:\.\d+)?)?\s*"
    r"(?P<unit>ms|s|m|h|d|sec|second|min|minute|hour|day)(?<!ms)(?P<plural>s)?\s*$",
    _FLAGS,
)
_DURATION_RE = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?\s*$", _FLAGS)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(field: str, value: object, *, allow_zero: bool = True, allow_none: bool = False) -> float:
    """Seconds from a number, a ``timedelta`` or a string such as ``"10m"``/``"250ms"``."""
    if value is None and allow_none:
        return math.inf
    seconds: float
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ConfigurationError(
            field, value, 'expected a duration: seconds, a timedelta or a string such as "10m" or "250ms"'
        )
    elif isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise ConfigurationError(field, value, "expected a finite duration") from None
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m["n"]) * _UNIT_SECONDS[(m["unit"] or "s").lower()]
    else:
        raise ConfigurationError(
            field, value, 'expected a duration: seconds, a timedelta or a string such as "10m" or "250ms"'
        )
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(field, value, f"expected a finite duration {bound}")
    return seconds


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` executions per ``per`` seconds; ``Rate.parse("100/s")``.

    >>> Rate.parse("5/m")
    Rate(limit=5, per=60.0)
    """

    limit: float
    per: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)):
            raise ConfigurationError("rate.limit", self.limit, "expected a number > 0")
        try:
            finite = math.isfinite(self.limit)
        except OverflowError:
            finite = False
        if not finite or self.limit <= 0:
            raise ConfigurationError("rate.limit", self.limit, "expected a number > 0")
        object.__setattr__(self, "per", parse_duration("rate.per", self.per, allow_zero=False))

    @property
    def interval(self) -> float:
        """Seconds between two conforming executions (the GCRA emission interval)."""
        return self.per / self.limit

    @property
    def per_second(self) -> float:
        return self.limit / self.per

    @classmethod
    def parse(cls, value: RateLike, field: str = "rate") -> Rate:
        """Parse ``"N/s"``, ``"N/m"``, ``"N/h"``, ``"N/d"`` (also ``"N/10s"``) or pass a Rate."""
        if isinstance(value, Rate):
            return value
        if isinstance(value, str) and (m := _RATE_RE.match(value)):
            word = m["unit"].lower()
            if m["plural"] and len(word) == 1:
                raise ConfigurationError(field, value, 'expected a rate such as "100/s", "5/m" or "3/10s"')
            unit = _UNIT_WORDS.get(word, word)
            per = _PERIODS[unit] * float(m["k"] or 1)
            n = float(m["n"])
            try:
                return cls(int(n) if n.is_integer() else n, per)
            except ConfigurationError as exc:
                raise ConfigurationError(field, value, exc.expected) from None
        raise ConfigurationError(
            field, value, 'expected a rate such as "100/s", "5/m", "1000/h", "10000/d" or Rate(n, per)'
        )

    def __str__(self) -> str:
        for unit, seconds in _PERIODS.items():
            if self.per == seconds:
                return f"{exact(self.limit)}/{unit}"
        return f"{exact(self.limit)}/{exact(self.per)}s"


RateLike = Rate | str


def exact(number: float) -> str:
    """A number as text that parses back to the same value (no exponent for whole numbers)."""
    value = float(number)
    return str(int(value)) if value.is_integer() else repr(value)


def parse_rate(value: RateLike, field: str = "rate") -> Rate:
    return Rate.parse(value, field)
