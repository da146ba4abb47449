"""Specification of policies and their components: validation, immutability, settings, classification."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from limitpal_tasks import (
    Breaker,
    Bulkhead,
    ConfigurationError,
    Cooldown,
    DeferPolicy,
    FailurePolicy,
    KeyTemplate,
    Policy,
    Rate,
    RateLimit,
    RetryBudget,
    RetryPolicy,
)


class UpstreamDown(Exception):
    """A retryable failure used by the classification tests."""


class BadRequest(ValueError):
    """A caller's-fault failure used by the classification tests."""


def _raises_config(build: Callable[[], object]) -> ConfigurationError:
    """The ``ConfigurationError`` that ``build()`` raises (fails the test if none)."""
    with pytest.raises(ConfigurationError) as info:
        build()
    return info.value


# -- construction-time validation ----------------------------------------------------

BAD_COMPONENT_FIELDS: list[tuple[str, Callable[[], object], object]] = [
    ("breaker.failure_rate_threshold", lambda: Breaker(failure_rate_threshold=150), 150),
    ("breaker.failure_rate_threshold", lambda: Breaker(failure_rate_threshold=0), 0),
    ("breaker.failure_rate_threshold", lambda: Breaker(failure_rate_threshold=math.nan), math.nan),
    ("breaker.failure_rate_threshold", lambda: Breaker(failure_rate_threshold="50"), "50"),  # type: ignore[arg-type]
    ("breaker.minimum_calls", lambda: Breaker(minimum_calls=0), 0),
    ("breaker.minimum_calls", lambda: Breaker(minimum_calls=2.5), 2.5),  # type: ignore[arg-type]
    ("breaker.minimum_calls", lambda: Breaker(minimum_calls=True), True),
    ("breaker.window_type", lambda: Breaker(window_type="sliding"), "sliding"),  # type: ignore[arg-type]
    ("breaker.window", lambda: Breaker(window=0), 0),
    ("breaker.window", lambda: Breaker(window=100_001), 100_001),
    ("breaker.window", lambda: Breaker(window=2.5), 2.5),
    ("breaker.window", lambda: Breaker(window_type="time", window=0.5), 0.5),
    ("breaker.window", lambda: Breaker(window_type="time", window=86_401), 86_401),
    ("breaker.slow_call_duration", lambda: Breaker(slow_call_duration=0), 0),
    ("breaker.slow_call_duration", lambda: Breaker(slow_call_duration=-1), -1),
    ("breaker.slow_call_rate_threshold", lambda: Breaker(slow_call_rate_threshold=101), 101),
    ("breaker.open_for", lambda: Breaker(open_for=0), 0),
    ("breaker.open_for", lambda: Breaker(open_for="forever"), "forever"),
    ("breaker.open_for_max", lambda: Breaker(open_for=60, open_for_max=10), 10),
    ("breaker.multiplier", lambda: Breaker(multiplier=0.5), 0.5),
    ("breaker.open_jitter", lambda: Breaker(open_jitter=1.5), 1.5),
    ("breaker.open_jitter", lambda: Breaker(open_jitter=-0.1), -0.1),
    ("breaker.half_open_probes", lambda: Breaker(half_open_probes=0), 0),
    ("breaker.half_open_probes", lambda: Breaker(half_open_probes=10_001), 10_001),
    ("breaker.busy_delay", lambda: Breaker(busy_delay=0), 0),
    ("breaker.key", lambda: Breaker(key=""), ""),
    ("breaker.key", lambda: Breaker(key="service:{"), "service:{"),
    ("bulkhead.max_concurrent", lambda: Bulkhead(0), 0),
    ("bulkhead.max_concurrent", lambda: Bulkhead(-3), -3),
    ("bulkhead.max_concurrent", lambda: Bulkhead(1.5), 1.5),  # type: ignore[arg-type]
    ("bulkhead.lease", lambda: Bulkhead(2, lease=0), 0),
    ("bulkhead.retry_delay", lambda: Bulkhead(2, retry_delay=-1), -1),
    ("bulkhead.key", lambda: Bulkhead(2, key="{0}"), "{0}"),
    ("rate_limit.rate", lambda: RateLimit("fast"), "fast"),
    ("rate_limit.burst", lambda: RateLimit("5/s", burst=0), 0),
    ("rate_limit.reserve_ahead", lambda: RateLimit("5/s", reserve_ahead=-1), -1),
    ("rate_limit.grace", lambda: RateLimit("5/s", grace=math.inf), math.inf),
    ("rate_limit.key", lambda: RateLimit("5/s", key="{}"), "{}"),
    ("retry.max_attempts", lambda: RetryPolicy(max_attempts=0), 0),
    ("retry.max_attempts", lambda: RetryPolicy(max_attempts=2.5), 2.5),  # type: ignore[arg-type]
    ("retry.backoff", lambda: RetryPolicy(backoff=-1), -1),
    ("retry.backoff_max", lambda: RetryPolicy(backoff=10, backoff_max=5), 5),
    ("retry.multiplier", lambda: RetryPolicy(multiplier=0.9), 0.9),
    ("retry.jitter", lambda: RetryPolicy(jitter="random"), "random"),  # type: ignore[arg-type]
    ("retry.retry_on", lambda: RetryPolicy(retry_on=42), 42),  # type: ignore[arg-type]
    ("retry.retry_on", lambda: RetryPolicy(retry_on="no_such_module.Boom"), "no_such_module.Boom"),
    ("retry.retry_on", lambda: RetryPolicy(retry_on="builtins.len"), "builtins.len"),
    ("retry.give_up_on", lambda: RetryPolicy(give_up_on=[int]), int),  # type: ignore[list-item]
    ("retry.budget", lambda: RetryPolicy(budget="20%"), "20%"),  # type: ignore[arg-type]
    ("retry.budget.ratio", lambda: RetryBudget(ratio=-0.1), -0.1),
    ("retry.budget.min_per_second", lambda: RetryBudget(min_per_second=-1), -1),
    ("retry.budget.window", lambda: RetryBudget(window=0), 0),
    ("retry.budget.key", lambda: RetryBudget(key=""), ""),
    ("defer.max_deferrals", lambda: DeferPolicy(max_deferrals=-1), -1),
    ("defer.deadline", lambda: DeferPolicy(deadline=0), 0),
    ("defer.max_delay", lambda: DeferPolicy(max_delay=0), 0),
    ("defer.jitter", lambda: DeferPolicy(jitter=1.5), 1.5),
    ("defer.open_spread", lambda: DeferPolicy(open_spread=-1), -1),
    ("failure.ignore", lambda: FailurePolicy(ignore=42), 42),  # type: ignore[arg-type]
    ("failure.ignore", lambda: FailurePolicy(ignore="builtins.object"), "builtins.object"),
    ("failure.predicate", lambda: FailurePolicy(predicate=42), 42),  # type: ignore[arg-type]
    ("policy.name", lambda: Policy(""), ""),
    ("policy.name", lambda: Policy("two words"), "two words"),
    ("policy.name", lambda: Policy("{tenant}"), "{tenant}"),
    ("policy.name", lambda: Policy(5), 5),  # type: ignore[arg-type]
    ("policy.key", lambda: Policy("p", key=""), ""),
    ("policy.key", lambda: Policy("p", key="tenant:{0}"), "tenant:{0}"),
    ("policy.breaker", lambda: Policy("p", breaker="on"), "on"),  # type: ignore[arg-type]
    ("policy.bulkhead", lambda: Policy("p", bulkhead="4"), "4"),  # type: ignore[arg-type]
    ("policy.bulkhead", lambda: Policy("p", bulkhead=True), True),
    ("policy.rate", lambda: Policy("p", rate=5), 5),  # type: ignore[arg-type]
    ("policy.retry", lambda: Policy("p", retry=3), 3),  # type: ignore[arg-type]
    ("policy.defer", lambda: Policy("p", defer={}), {}),  # type: ignore[arg-type]
    ("policy.failure", lambda: Policy("p", failure=[]), []),  # type: ignore[arg-type]
    ("policy.fail_mode", lambda: Policy("p", fail_mode="maybe"), "maybe"),  # type: ignore[arg-type]
    ("policy.lease", lambda: Policy("p", lease=0), 0),
]


@pytest.mark.parametrize(
    ("field", "build", "value"),
    BAD_COMPONENT_FIELDS,
    ids=[f"{field}={value!r}" for field, _, value in BAD_COMPONENT_FIELDS],
)
def test_bad_field_raises_configuration_error_naming_field_and_value(
    field: str, build: Callable[[], object], value: object
) -> None:
    """An invalid field raises ``ConfigurationError`` whose ``.field`` names it and whose message shows it."""
    exc = _raises_config(build)
    assert exc.field == field
    assert str(exc).startswith(f"{field}: ")
    assert repr(value) in str(exc)


def test_duplicate_rate_limits_are_rejected() -> None:
    """Two identical rate limits on one key raise ``ConfigurationError`` for ``policy.rate``."""
    exc = _raises_config(lambda: Policy("p", rate=["5/s", "5/s"]))
    assert exc.field == "policy.rate"


def test_two_close_large_rates_are_distinct_limits() -> None:
    """``1000000/h`` and ``1000001/h`` are different limits with different state slots."""
    policy = Policy("p", rate=["1000000/h", "1000001/h"])
    assert policy.rates[0].slot_id != policy.rates[1].slot_id


def test_huge_integer_field_raises_configuration_error() -> None:
    """An integer too large for a float raises ``ConfigurationError``, not ``OverflowError``."""
    exc = _raises_config(lambda: Breaker(minimum_calls=10**400))
    assert exc.field == "breaker.minimum_calls"


def test_relative_dotted_exception_name_raises_configuration_error() -> None:
    """A malformed dotted name such as ``"..Boom"`` raises ``ConfigurationError``, not ``TypeError``."""
    exc = _raises_config(lambda: RetryPolicy(retry_on="..Boom"))
    assert exc.field == "retry.retry_on"


def test_component_defaults_follow_resilience4j() -> None:
    """A default breaker uses Resilience4j's names and defaults (50%, 100 calls, count window of 100)."""
    breaker = Breaker()
    assert (breaker.failure_rate_threshold, breaker.minimum_calls, breaker.window_type, breaker.window) == (
        50.0,
        100,
        "count",
        100,
    )


def test_durations_accept_timedelta_and_strings() -> None:
    """Component durations given as ``timedelta`` or ``"10m"`` are stored as float seconds."""
    breaker = Breaker(open_for=timedelta(seconds=30), open_for_max="10m", busy_delay="250ms")
    assert (breaker.open_for, breaker.open_for_max, breaker.busy_delay) == (30.0, 600.0, 0.25)


def test_open_for_max_defaults_to_open_for() -> None:
    """Without ``open_for_max`` the break duration never grows beyond ``open_for``."""
    assert Breaker(open_for=45).open_for_max == 45.0


def test_time_window_is_rounded_up_to_whole_seconds() -> None:
    """A time-based window is kept in whole seconds, rounded up."""
    assert Breaker(window_type="time", window=2.5).window == 3.0


def test_policy_bulkhead_int_is_shorthand_for_bulkhead() -> None:
    """``Policy(bulkhead=4)`` is ``Policy(bulkhead=Bulkhead(4))``."""
    assert Policy("p", bulkhead=4).bulkhead == Bulkhead(4)


def test_policy_rate_string_becomes_rate_limit() -> None:
    """A rate string on a policy becomes a one-element tuple of ``RateLimit``."""
    assert Policy("p", rate="5/s").rates == (RateLimit("5/s"),)


def test_policy_key_defaults_to_its_name() -> None:
    """Without a key template a policy's state is kept under its name."""
    assert Policy("payments").key == KeyTemplate("payments")


def test_policy_without_retry_has_default_defer_and_failure() -> None:
    """Defaults: no retry policy, default deferral bounds, no ignored exceptions, fail open."""
    policy = Policy("p")
    assert policy.retry is None
    assert policy.defer == DeferPolicy()
    assert policy.failure.ignore == ()
    assert policy.fail_mode == "open"


def test_exception_classes_accept_dotted_names() -> None:
    """Exception classes may be given as dotted names such as ``"builtins.ValueError"``."""
    retry = RetryPolicy(retry_on=["builtins.ValueError", "concurrent.futures.TimeoutError"])
    assert retry.retry_on[0] is ValueError
    assert issubclass(retry.retry_on[1], BaseException)


def test_exception_classes_accept_bare_builtin_names() -> None:
    """A bare name such as ``"KeyError"`` is looked up in ``builtins``."""
    assert FailurePolicy(ignore="KeyError").ignore == (KeyError,)


# -- immutability ----------------------------------------------------------------------

IMMUTABLE: list[tuple[object, str, object]] = [
    (Breaker(), "minimum_calls", 1),
    (Bulkhead(2), "max_concurrent", 3),
    (RateLimit("5/s"), "burst", 3),
    (RetryPolicy(), "max_attempts", 9),
    (RetryBudget(), "ratio", 0.5),
    (DeferPolicy(), "max_deferrals", 1),
    (FailurePolicy(), "ignore", (ValueError,)),
    (Policy("p"), "name", "q"),
    (Policy("p"), "fail_mode", "closed"),
]


@pytest.mark.parametrize(
    ("obj", "name", "value"), IMMUTABLE, ids=[f"{type(o).__name__}.{n}" for o, n, _ in IMMUTABLE]
)
def test_assigning_a_field_raises(obj: object, name: str, value: object) -> None:
    """Policies and their components are immutable: assigning any field raises ``AttributeError``."""
    before = getattr(obj, name)
    with pytest.raises(AttributeError):
        setattr(obj, name, value)
    assert getattr(obj, name) == before


def test_adding_an_attribute_raises() -> None:
    """A policy cannot grow new attributes either."""
    policy = Policy("p")
    attribute = "extra"
    # CPython 3.10/3.11 raise TypeError here for frozen slotted dataclasses (python/cpython#90562);
    # either way the assignment is refused.
    with pytest.raises((AttributeError, TypeError)):
        setattr(policy, attribute, 1)
    assert not hasattr(policy, attribute)


# -- Policy.from_dict ------------------------------------------------------------------


def _field_values(obj: object) -> dict[str, Any]:
    """Every dataclass field of ``obj`` by name."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}  # type: ignore[arg-type]


def test_from_dict_builds_the_same_policy_as_the_constructor() -> None:
    """A full settings mapping yields a policy whose every field equals the constructor's."""
    data: dict[str, Any] = {
        "key": "tenant:{tenant_id}",
        "breaker": {
            "failure_rate_threshold": 25,
            "minimum_calls": 10,
            "window_type": "time",
            "window": 30,
            "open_for": 15,
            "open_for_max": 120,
            "half_open_probes": 3,
            "key": "service:stripe",
        },
        "bulkhead": {"max_concurrent": 4, "lease": 60},
        "rate": ["100/s", {"rate": "5000/h", "burst": 10, "key": "service:stripe"}],
        "retry": {
            "max_attempts": 5,
            "backoff": 2,
            "backoff_max": 60,
            "jitter": "equal",
            "retry_on": ["builtins.ConnectionError", "builtins.TimeoutError"],
            "give_up_on": "builtins.PermissionError",
            "budget": {"ratio": 0.1, "min_per_second": 0.5, "window": 20},
        },
        "defer": {"max_deferrals": 7, "deadline": 3600, "max_delay": 120, "jitter": 0.2},
        "failure": {"ignore": ["builtins.ValueError"]},
        "fail_mode": "closed",
        "lease": 90,
    }
    expected = Policy(
        "payments",
        key="tenant:{tenant_id}",
        breaker=Breaker(
            failure_rate_threshold=25,
            minimum_calls=10,
            window_type="time",
            window=30,
            open_for=15,
            open_for_max=120,
            half_open_probes=3,
            key="service:stripe",
        ),
        bulkhead=Bulkhead(4, lease=60),
        rate=[RateLimit("100/s"), RateLimit("5000/h", burst=10, key="service:stripe")],
        retry=RetryPolicy(
            max_attempts=5,
            backoff=2,
            backoff_max=60,
            jitter="equal",
            retry_on=(ConnectionError, TimeoutError),
            give_up_on=PermissionError,
            budget=RetryBudget(ratio=0.1, min_per_second=0.5, window=20),
        ),
        defer=DeferPolicy(max_deferrals=7, deadline=3600, max_delay=120, jitter=0.2),
        failure=FailurePolicy(ignore=[ValueError]),
        fail_mode="closed",
        lease=90,
    )
    built = Policy.from_dict(data, name="payments")
    assert _field_values(built) == _field_values(expected)


def test_from_dict_takes_the_name_from_the_data() -> None:
    """A ``name`` entry in the mapping names the policy."""
    assert Policy.from_dict({"name": "emails"}).name == "emails"


def test_from_dict_accepts_rate_as_string() -> None:
    """``"rate": "5/s"`` gives one rate limit of five per second."""
    policy = Policy.from_dict({"rate": "5/s"}, name="p")
    assert policy.rates == (RateLimit("5/s"),)


def test_from_dict_accepts_rate_as_list() -> None:
    """``"rate": [...]`` gives one rate limit per entry, in order."""
    policy = Policy.from_dict({"rate": ["5/s", "100/m"]}, name="p")
    assert [limit.rate for limit in policy.rates] == [Rate(5, 1), Rate(100, 60)]


def test_from_dict_accepts_rate_as_tuple() -> None:
    """``"rate": (...)`` from Python settings (Django) is a sequence of limits, as in the constructor."""
    policy = Policy.from_dict({"rate": ("5/s", "100/m")}, name="p")
    assert policy.rates == Policy("p", rate=("5/s", "100/m")).rates


def test_from_dict_accepts_rate_as_mapping() -> None:
    """``"rate": {"rate": ..., "burst": ...}`` gives a fully configured rate limit."""
    policy = Policy.from_dict({"rate": {"rate": "5/s", "burst": 3, "reserve_ahead": 10}}, name="p")
    assert policy.rates == (RateLimit("5/s", burst=3, reserve_ahead=10),)


def test_from_dict_accepts_bulkhead_as_int() -> None:
    """``"bulkhead": 4`` is shorthand for ``{"max_concurrent": 4}``."""
    assert Policy.from_dict({"bulkhead": 4}, name="p").bulkhead == Bulkhead(4)


def test_from_dict_resolves_dotted_exception_names() -> None:
    """Exception classes given as dotted strings are imported (``"builtins.ValueError"`` → ``ValueError``)."""
    policy = Policy.from_dict(
        {"retry": {"retry_on": "builtins.ValueError"}, "failure": {"ignore": ["builtins.KeyError"]}}, name="p"
    )
    assert policy.retry is not None
    assert policy.retry.retry_on == (ValueError,)
    assert policy.failure.ignore == (KeyError,)


UNKNOWN_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"bogus": 1}, "policies.payments.bogus"),
    ({"breaker": {"bogus": 1}}, "policies.payments.breaker.bogus"),
    ({"bulkhead": {"max_concurrent": 2, "bogus": 1}}, "policies.payments.bulkhead.bogus"),
    ({"rate": {"rate": "5/s", "bogus": 1}}, "policies.payments.rate.bogus"),
    ({"rate": ["1/s", {"rate": "5/s", "bogus": 1}]}, "policies.payments.rate.bogus"),
    ({"retry": {"bogus": 1}}, "policies.payments.retry.bogus"),
    ({"retry": {"budget": {"bogus": 1}}}, "policies.payments.retry.budget.bogus"),
    ({"defer": {"bogus": 1}}, "policies.payments.defer.bogus"),
    ({"failure": {"bogus": 1}}, "policies.payments.failure.bogus"),
]


@pytest.mark.parametrize(("data", "field"), UNKNOWN_FIELDS, ids=[field for _, field in UNKNOWN_FIELDS])
def test_from_dict_rejects_unknown_fields_at_every_level(data: dict[str, Any], field: str) -> None:
    """An unknown field anywhere raises ``ConfigurationError`` whose ``.field`` is its full path."""
    exc = _raises_config(lambda: Policy.from_dict(data, name="payments"))
    assert exc.field == field
    assert "unknown field" in str(exc)


def test_from_dict_without_name_prefixes_paths_with_policy() -> None:
    """Without a settings name the field path starts at ``policy``."""
    exc = _raises_config(lambda: Policy.from_dict({"name": "p", "breaker": {"bogus": 1}}))
    assert exc.field == "policy.breaker.bogus"


BAD_NESTED_VALUES: list[tuple[dict[str, Any], str, object]] = [
    ({"breaker": {"failure_rate_threshold": 150}}, "policies.payments.breaker.failure_rate_threshold", 150),
    ({"bulkhead": {"max_concurrent": 0}}, "policies.payments.bulkhead.max_concurrent", 0),
    ({"rate": {"rate": "5/s", "burst": 0}}, "policies.payments.rate.burst", 0),
    ({"retry": {"max_attempts": 0}}, "policies.payments.retry.max_attempts", 0),
    ({"retry": {"retry_on": "builtins.nothing"}}, "policies.payments.retry.retry_on", "builtins.nothing"),
    ({"retry": {"budget": {"ratio": -1}}}, "policies.payments.retry.budget.ratio", -1),
    ({"defer": {"jitter": 2}}, "policies.payments.defer.jitter", 2),
    ({"fail_mode": "sideways"}, "policies.payments.fail_mode", "sideways"),
    ({"lease": -1}, "policies.payments.lease", -1),
]


@pytest.mark.parametrize(
    ("data", "field", "value"), BAD_NESTED_VALUES, ids=[f for _, f, _ in BAD_NESTED_VALUES]
)
def test_from_dict_reports_bad_values_with_their_settings_path(
    data: dict[str, Any], field: str, value: object
) -> None:
    """A bad value in settings raises ``ConfigurationError`` naming its full path and the value."""
    exc = _raises_config(lambda: Policy.from_dict(data, name="payments"))
    assert exc.field == field
    assert repr(value) in str(exc)


@pytest.mark.parametrize("section", ["breaker", "retry", "defer", "failure"])
def test_from_dict_rejects_a_non_mapping_section(section: str) -> None:
    """A component section that is not a mapping raises ``ConfigurationError`` naming the section."""
    exc = _raises_config(lambda: Policy.from_dict({section: 5}, name="payments"))
    assert exc.field == f"policies.payments.{section}"


def test_from_dict_rejects_non_mapping_data() -> None:
    """Settings that are not a mapping raise ``ConfigurationError`` naming the policy."""
    exc = _raises_config(lambda: Policy.from_dict(["rate", "5/s"], name="payments"))  # type: ignore[arg-type]
    assert exc.field == "policies.payments"


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-1000, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(
        [
            "5/s",
            "100/m",
            "10m",
            "250ms",
            "full",
            "equal",
            "count",
            "time",
            "open",
            "closed",
            "tenant:{tenant_id}",
            "builtins.ValueError",
            "..Boom",
            "os.path",
        ]
    ),
)
VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2)
)
BREAKER_FIELDS = st.dictionaries(
    st.sampled_from(
        [
            "failure_rate_threshold",
            "minimum_calls",
            "window_type",
            "window",
            "open_for",
            "open_for_max",
            "key",
        ]
    ),
    SCALARS,
    max_size=4,
)
RETRY_FIELDS = st.dictionaries(
    st.sampled_from(
        ["max_attempts", "backoff", "backoff_max", "jitter", "retry_on", "give_up_on", "multiplier"]
    ),
    VALUES,
    max_size=4,
)
POLICY_DATA = st.fixed_dictionaries(
    {},
    optional={
        "key": VALUES,
        "rate": VALUES,
        "bulkhead": VALUES,
        "fail_mode": VALUES,
        "lease": VALUES,
        "breaker": st.one_of(BREAKER_FIELDS, VALUES),
        "retry": st.one_of(RETRY_FIELDS, VALUES),
        "defer": st.one_of(
            st.dictionaries(st.sampled_from(["max_deferrals", "jitter", "max_delay"]), SCALARS), VALUES
        ),
    },
)


@given(data=POLICY_DATA)
def test_from_dict_of_random_settings_builds_a_policy_or_raises_configuration_error(
    data: dict[str, Any],
) -> None:
    """Random valid and invalid settings give a ``Policy`` or ``ConfigurationError``, never another error."""
    result: Policy | ConfigurationError
    try:
        result = Policy.from_dict(data, name="random")
    except ConfigurationError as exc:
        result = exc
    if isinstance(result, ConfigurationError):
        assert result.field.startswith("policies.random")
    else:
        assert result.name == "random"


# -- classification ---------------------------------------------------------------------


def test_classify_ignored_exception_is_ignore() -> None:
    """An exception in ``failure.ignore`` is classified ``"ignore"``, even when it is also retryable."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[ValueError]), failure=FailurePolicy(ignore=[BadRequest]))
    assert policy.classify(BadRequest()) == "ignore"


def test_classify_give_up_on_is_fail() -> None:
    """An exception in ``give_up_on`` is classified ``"fail"`` even though ``retry_on`` covers it."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[Exception], give_up_on=[UpstreamDown]))
    assert policy.classify(UpstreamDown()) == "fail"


def test_classify_retry_on_is_retry() -> None:
    """An exception in ``retry_on`` is classified ``"retry"``."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[UpstreamDown]))
    assert policy.classify(UpstreamDown()) == "retry"


def test_classify_matches_subclasses() -> None:
    """``retry_on`` covers subclasses of the listed classes."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[LookupError]))
    assert policy.classify(KeyError("k")) == "retry"


def test_classify_exception_outside_retry_on_is_fail() -> None:
    """An exception not covered by ``retry_on`` is classified ``"fail"``."""
    policy = Policy("p", retry=RetryPolicy(retry_on=[UpstreamDown]))
    assert policy.classify(ValueError()) == "fail"


def test_classify_without_retry_policy_is_fail() -> None:
    """Without a retry policy an ordinary exception is classified ``"fail"``."""
    assert Policy("p").classify(UpstreamDown()) == "fail"


def test_classify_predicate_overrides_the_lists() -> None:
    """A predicate's verdict wins over ``ignore``, ``give_up_on`` and ``retry_on``."""
    policy = Policy(
        "p",
        retry=RetryPolicy(give_up_on=[UpstreamDown]),
        failure=FailurePolicy(predicate=lambda exc: "retry" if isinstance(exc, UpstreamDown) else None),
    )
    assert policy.classify(UpstreamDown()) == "retry"


def test_classify_predicate_can_ignore_a_retryable_exception() -> None:
    """A predicate returning ``"ignore"`` overrides ``retry_on``."""
    policy = Policy(
        "p",
        retry=RetryPolicy(retry_on=[Exception]),
        failure=FailurePolicy(predicate=lambda exc: "ignore"),
    )
    assert policy.classify(UpstreamDown()) == "ignore"


def test_classify_predicate_returning_none_falls_through() -> None:
    """A predicate returning ``None`` leaves the decision to the lists."""
    policy = Policy(
        "p",
        retry=RetryPolicy(retry_on=[UpstreamDown]),
        failure=FailurePolicy(predicate=lambda exc: None),
    )
    assert policy.classify(UpstreamDown()) == "retry"


def test_classify_cooldown_is_retry() -> None:
    """``Cooldown`` is classified ``"retry"`` even without a retry policy."""
    assert Policy("p").classify(Cooldown(5)) == "retry"


# -- check_keys ---------------------------------------------------------------------------


def charge(tenant_id: str, amount: int, *, currency: str = "EUR") -> None:
    """A task signature used by the key checks."""


def webhook(**payload: Any) -> None:
    """A task taking arbitrary keyword arguments."""


def test_check_keys_passes_when_every_field_is_a_parameter() -> None:
    """Templates naming positional and keyword-only parameters pass."""
    policy = Policy("p", key="tenant:{tenant_id}:{currency}", breaker=Breaker(key="amount:{amount}"))
    policy.check_keys(charge)


def test_check_keys_rejects_a_policy_key_naming_a_missing_parameter() -> None:
    """A policy key naming a parameter the task lacks raises ``ConfigurationError`` naming both."""
    policy = Policy("p", key="customer:{customer_id}")
    exc = _raises_config(lambda: policy.check_keys(charge))
    assert exc.field.endswith("key")
    assert "customer_id" in str(exc)
    assert "customer:{customer_id}" in str(exc)


@pytest.mark.parametrize(
    ("policy", "component"),
    [
        (Policy("p", key="tenant:{tenant_id}", breaker=Breaker(key="service:{service}")), "breaker.key"),
        (
            Policy("p", key="tenant:{tenant_id}", bulkhead=Bulkhead(2, key="service:{service}")),
            "bulkhead.key",
        ),
        (
            Policy("p", key="tenant:{tenant_id}", rate=RateLimit("5/s", key="service:{service}")),
            "rate[0].key",
        ),
        (
            Policy(
                "p",
                key="tenant:{tenant_id}",
                retry=RetryPolicy(budget=RetryBudget(key="service:{service}")),
            ),
            "retry.budget.key",
        ),
    ],
)
def test_check_keys_rejects_a_component_key_naming_a_missing_parameter(
    policy: Policy, component: str
) -> None:
    """A component key naming a missing parameter raises ``ConfigurationError`` naming that key."""
    exc = _raises_config(lambda: policy.check_keys(charge))
    assert exc.field.endswith(component)
    assert "service" in str(exc)


def test_check_keys_accepts_any_field_for_kwargs_functions() -> None:
    """A task taking ``**kwargs`` accepts any template field."""
    policy = Policy("p", key="tenant:{tenant_id}", breaker=Breaker(key="service:{service}"))
    policy.check_keys(webhook)


def test_check_keys_accepts_callable_keys() -> None:
    """A callable key names no parameter, so it always passes the check."""
    policy = Policy("p", key=lambda context: "fixed")
    policy.check_keys(charge)


# -- worker settings ------------------------------------------------------------------


def test_an_unknown_worker_setting_is_rejected_naming_it() -> None:
    """A typo such as limitpal_policy (for limitpal_policies) stops the worker instead of passing silently."""
    from limitpal_tasks.integrations._runtime import Settings

    with pytest.raises(ConfigurationError) as caught:
        Settings.from_mapping({"limitpal_policy": {"api": {"rate": "5/s"}}, "broker_url": "memory://"})
    assert caught.value.field == "limitpal_policy"
    assert "policies" in caught.value.expected


def test_parking_settings_are_validated() -> None:
    """limitpal_defer_transport, limitpal_park_name and limitpal_park_lease name the bad value."""
    from limitpal_tasks.integrations._runtime import Settings

    settings = Settings.from_mapping({"limitpal_defer_transport": "park", "limitpal_park_lease": 5})
    assert (settings.defer_transport, settings.park_lease) == ("park", 5.0)
    for name, value in (("defer_transport", "queue"), ("park_name", "a b"), ("park_lease", 0)):
        with pytest.raises(ConfigurationError) as caught:
            Settings.from_mapping({f"limitpal_{name}": value})
        assert (caught.value.field, caught.value.value) == (f"limitpal_{name}", value)


def test_a_bad_duration_says_what_a_duration_may_be() -> None:
    """A duration that does not parse names the accepted forms, strings included."""
    with pytest.raises(ConfigurationError) as caught:
        Breaker(open_for="soon")
    assert caught.value.field == "breaker.open_for"
    assert '"10m"' in caught.value.expected
