"""Fault 6a: hostile configuration. ``Policy.from_dict`` and the workers' ``Settings.from_mapping``
either accept their input or reject it with a ``ConfigurationError`` naming the field and the
value; nothing else may escape. Hypothesis feeds them plain-data trees (what settings files,
environment JSON and Django settings hold) built around the real field names, with
out-of-range numbers, NaN and infinities, wrong types, broken templates and junk.

The tests at the end pin the rejections fuzzing found missing at first (an unhashable
policy name, a store timeout no socket accepts, key templates that cannot render).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limitpal_tasks import ConfigurationError, Policy, TaskContext
from limitpal_tasks.integrations._runtime import Settings

pytestmark = [pytest.mark.chaos]

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL_STRINGS = [
    "",
    " ",
    "5/s",
    "0/s",
    "-1/s",
    "1e999/s",
    "5/ſ",
    "100/10s",
    "10m",
    "250ms",
    "-3s",
    "1e999",
    "inf",
    "nan",
    "open",
    "closed",
    "count",
    "time",
    "full",
    "tenant:{tenant_id}",
    "{",
    "}",
    "{0}",
    "{a.b}",
    "{a[0]}",
    "{}",
    "\x00",
    "\n",
    "builtins.ValueError",
    "ValueError",
    "os.system",
    "os.",
    ".x",
    "no.such.module.Error",
    "redis://127.0.0.1:7199/0",
    "memory://",
    "x" * 300,
]
"""Strings that mean something to some field, and strings that mean trouble."""

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(SPECIAL_STRINGS)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


durations = (
    st.integers(0, 600) | st.floats(0, 600) | st.sampled_from(["10s", "250ms", "2m", "1h", "0", "1.5"])
)
counts = st.integers(0, 200)
fractions = st.floats(0, 1) | st.integers(0, 100)
key_templates = st.sampled_from(["tenant:{tenant_id}", "service:stripe", "{a}:{b}", "t:{a.b}", "{a[0]}", "x"])
rates = st.sampled_from(["5/s", "100/m", "3/10s", "1000/h", "10000/d", "2.5/s", "1/ms"])


def hostile(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``plausible`` values (seven in eight), now and then anything at all."""
    return st.one_of(*[plausible] * 7, values)


def section(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping over some of ``fields`` (values mostly plausible), now and then with an unknown field."""
    known = st.fixed_dictionaries(
        {}, optional={name: hostile(plausible) for name, plausible in fields.items()}
    )
    return st.one_of(
        known, known, known, st.builds(lambda d, k, v: {**d, k: v}, known, st.text(max_size=8), values)
    )


BREAKER = section(
    failure_rate_threshold=fractions,
    minimum_calls=counts,
    window_type=st.sampled_from(["count", "time"]),
    window=counts | durations,
    slow_call_duration=durations,
    slow_call_rate_threshold=fractions,
    open_for=durations,
    open_for_max=durations,
    multiplier=st.floats(0, 5),
    open_jitter=st.floats(0, 1),
    half_open_probes=counts,
    busy_delay=durations,
    key=key_templates,
)
BULKHEAD = section(max_concurrent=counts, lease=durations, retry_delay=durations, key=key_templates)
RATE = section(rate=rates, burst=counts, reserve_ahead=durations, grace=durations, key=key_templates)
BUDGET = section(ratio=st.floats(0, 2), min_per_second=st.floats(0, 10), window=durations, key=key_templates)
exception_names = st.sampled_from(
    ["ValueError", "builtins.KeyError", "OSError", "os.system", "no.such.Error", ".x"]
)
RETRY = st.builds(
    lambda base, budget: {**base, **({} if budget is None else {"budget": budget})},
    section(
        max_attempts=counts,
        backoff=durations,
        backoff_max=durations,
        multiplier=st.floats(0, 5),
        jitter=st.sampled_from(["full", "equal", "decorrelated", "none"]),
        retry_on=exception_names | st.lists(exception_names, max_size=2),
        give_up_on=exception_names | st.lists(exception_names, max_size=2),
    ),
    st.none() | BUDGET | values,
)
DEFER = section(
    max_deferrals=counts,
    deadline=durations,
    max_delay=durations,
    jitter=st.floats(0, 1),
    open_spread=durations,
)
# ``failure.predicate`` is a callable: plain data never holds one, so it is left out.
FAILURE = section(ignore=exception_names | st.lists(exception_names, max_size=2))

policy_fields = st.fixed_dictionaries(
    {},
    optional={
        "key": hostile(key_templates),
        "breaker": hostile(BREAKER),
        "bulkhead": hostile(counts | BULKHEAD),
        "rate": hostile(rates | RATE | st.lists(rates | RATE, max_size=3)),
        "retry": hostile(RETRY),
        "defer": hostile(DEFER),
        "failure": hostile(FAILURE),
        "fail_mode": hostile(st.sampled_from(["open", "closed"])),
        "lease": hostile(durations),
    },
)
policy_dicts = st.one_of(
    *[policy_fields] * 6,
    st.builds(lambda d, name: {**d, "name": name}, policy_fields, values),
    st.builds(lambda d, v: {**d, "colour": v}, policy_fields, values),
)


def _appears_in(value: object, data: object) -> bool:
    """Whether ``value`` is ``data`` or a part of it (NaN counts by identity)."""
    if value is data:
        return True
    try:
        if value == data:
            return True
    except Exception:  # odd values may refuse to compare: that only means "not equal"
        return False
    if isinstance(data, Mapping):
        return any(_appears_in(value, k) or _appears_in(value, v) for k, v in data.items())
    if isinstance(data, (list, tuple)):
        return any(_appears_in(value, item) for item in data)
    return False


def _check_rejection(exc: ConfigurationError, root: str, data: object) -> None:
    """A rejection names a field under ``root`` and a value taken from the input."""
    assert exc.field.startswith(root), exc.field
    assert str(exc) == f"{exc.field}: {exc.expected}, got {exc.value!r}"
    value = exc.value
    assert _appears_in(value, data) or (
        isinstance(value, float) and math.isnan(value) and "nan" in repr(data).lower()
    ), f"{exc.field} names {value!r}, which is not in the input"


@FUZZ
@given(data=policy_dicts)
def test_policy_from_dict_accepts_or_names_the_bad_field_and_value(data: dict[str, Any]) -> None:
    """Whatever plain data it is given, ``Policy.from_dict`` returns a Policy or raises ConfigurationError."""
    try:
        policy = Policy.from_dict(data, name="fuzz")
    except ConfigurationError as exc:
        _check_rejection(exc, "policies.fuzz", data)
    else:
        assert isinstance(policy, Policy)


policy_names = st.sampled_from(["payments", "partner", "api"]) | st.text(max_size=8)
settings_mappings = st.fixed_dictionaries(
    {},
    optional={
        "limitpal_store_url": hostile(
            st.sampled_from(["memory://", "redis://127.0.0.1:7199/0", "rediss://h/1"])
        ),
        "limitpal_policies": hostile(st.dictionaries(policy_names, hostile(policy_dicts), max_size=2)),
        "limitpal_task_policies": hostile(
            st.dictionaries(st.text(max_size=8), hostile(policy_names), max_size=2)
        ),
        "limitpal_fail_mode": hostile(st.sampled_from(["open", "closed"])),
        "limitpal_key_prefix": hostile(st.sampled_from(["limitpal", "app-1", "a:b"])),
        "limitpal_store_timeout": hostile(st.floats(0, 5)),
        "limitpal_defer_transport": hostile(st.sampled_from(["broker", "park"])),
        "limitpal_park_name": hostile(st.sampled_from(["celery", "dramatiq-redis", "a b", "{x}"])),
        "limitpal_park_lease": hostile(durations),
    },
)


@FUZZ
@given(conf=settings_mappings)
def test_worker_settings_accept_or_name_the_bad_setting_and_value(conf: dict[str, Any]) -> None:
    """Whatever a settings mapping holds, ``Settings.from_mapping`` gives Settings or a ConfigurationError."""
    try:
        parsed = Settings.from_mapping(conf)
    except ConfigurationError as exc:
        _check_rejection(exc, "limitpal_", conf)
    else:
        assert isinstance(parsed, Settings)


templates = st.lists(
    st.text(max_size=4)
    | st.builds(
        lambda name, access: "{" + name + access + "}",
        st.sampled_from(["tenant", "a", "x1", "_"]),
        st.sampled_from(["", ".real", ".__class__", "[0]", "[k]", ".x.y"]),
    ),
    min_size=1,
    max_size=4,
).map("".join)


@FUZZ
@given(template=templates, value=values)
def test_an_accepted_key_template_renders_or_raises_a_configuration_error(
    template: str, value: object
) -> None:
    """A key template ``from_dict`` accepted fails at run time with nothing but ConfigurationError."""
    try:
        policy = Policy.from_dict({"key": template}, name="fuzz")
    except ConfigurationError:
        return
    context = TaskContext("fuzz", kwargs=dict.fromkeys(policy.key.fields, value))
    rendered: object
    try:
        rendered = policy.key.render(context)
    except ConfigurationError as exc:
        rendered = exc
    assert isinstance(rendered, str) or (isinstance(rendered, ConfigurationError) and rendered.field == "key")


# -- what fuzzing found (fixed in fedc165) ----------------------------------------------------


def test_an_unhashable_task_policy_is_a_configuration_error() -> None:
    """``limitpal_task_policies = {"t": ["x"]}`` is rejected naming the setting (it raised TypeError)."""
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_mapping({"limitpal_task_policies": {"t": ["x"]}})
    assert raised.value.field == "limitpal_task_policies.t"


@pytest.mark.parametrize("timeout", [math.inf, 1e300])
def test_a_store_timeout_no_socket_accepts_is_a_configuration_error(timeout: float) -> None:
    """``limitpal_store_timeout`` larger than a socket timeout can be is rejected up front (it used to
    pass, and the first store call raised OverflowError, which escaped ``Pipeline.admit``)."""
    with pytest.raises(ConfigurationError):
        Settings.from_mapping({"limitpal_store_timeout": timeout})


@pytest.mark.parametrize(
    "template", ["tenant:{tenant!z}", "tenant:{tenant:zz}", "tenant:{tenant:>99999999999}"]
)
def test_a_key_template_that_cannot_render_is_rejected_by_from_dict(template: str) -> None:
    """A key template whose conversion or format spec cannot apply is a ConfigurationError up front
    (it used to be accepted, then fail every task with ValueError, or MemoryError for a huge width)."""
    with pytest.raises(ConfigurationError):
        Policy.from_dict({"key": template}, name="bad")
