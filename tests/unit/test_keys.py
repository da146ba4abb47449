"""Specification of keys: rendering templates and callables, and escaping user-supplied parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from limitpal_tasks import ConfigurationError, KeyTemplate, TaskContext
from limitpal_tasks.core.keys import MAX_PART_LENGTH, ArgBinder, escape_key_part


@dataclass
class Order:
    """A task argument with attributes, for attribute access in templates."""

    tenant: str
    number: int


def charge(tenant_id: str, amount: int, region: str = "eu", *, currency: str = "EUR") -> None:
    """A task signature for the positional and default lookups."""


def render(template: str, **kwargs: Any) -> str:
    """Render ``template`` for a call made with keyword arguments only."""
    return KeyTemplate(template).render(TaskContext("task", kwargs=kwargs))


def render_value(value: object) -> str:
    """Render the one-field template ``tenant:{tenant_id}`` for ``tenant_id=value``."""
    return render("tenant:{tenant_id}", tenant_id=value)


# -- rendering --------------------------------------------------------------------------


def test_renders_from_keyword_arguments() -> None:
    """A field is filled from the keyword argument of the same name."""
    assert render("tenant:{tenant_id}", tenant_id="acme") == "tenant:acme"


def test_renders_several_fields_and_literals() -> None:
    """Every field and the literal text around it are rendered in order."""
    assert render("{tenant}/{region}:x", tenant="acme", region="eu") == "acme/eu:x"


def test_renders_the_same_field_twice() -> None:
    """A field used twice is rendered twice."""
    assert render("{a}-{a}", a="x") == "x-x"


def test_renders_non_string_values_with_str() -> None:
    """A non-string argument is rendered with ``str``."""
    assert render("tenant:{tenant_id}", tenant_id=42) == "tenant:42"


def test_constant_template_renders_itself() -> None:
    """A template without fields renders as written."""
    assert render("service:stripe") == "service:stripe"


def test_renders_from_positional_arguments_by_parameter_name() -> None:
    """With an ``ArgBinder`` a field is found among positional arguments by parameter name."""
    context = TaskContext("charge", args=("acme", 100), binder=ArgBinder(charge))
    assert KeyTemplate("tenant:{tenant_id}:{amount}").render(context) == "tenant:acme:100"


def test_renders_from_parameter_defaults() -> None:
    """A parameter not passed is rendered from its default value."""
    context = TaskContext("charge", args=("acme", 100), binder=ArgBinder(charge))
    assert KeyTemplate("{region}:{currency}").render(context) == "eu:EUR"


def test_keyword_argument_wins_over_the_default() -> None:
    """A keyword argument passed for a defaulted parameter is used instead of the default."""
    context = TaskContext("charge", args=("acme", 100), kwargs={"region": "us"}, binder=ArgBinder(charge))
    assert KeyTemplate("{region}").render(context) == "us"


def test_positional_argument_wins_over_the_default() -> None:
    """A defaulted parameter passed positionally is taken from the positional arguments."""
    context = TaskContext("charge", args=("acme", 100, "ap"), binder=ArgBinder(charge))
    assert KeyTemplate("{region}").render(context) == "ap"


def test_renders_attribute_access() -> None:
    """``{order.tenant}`` reads an attribute of the argument."""
    assert render("tenant:{order.tenant}", order=Order("acme", 7)) == "tenant:acme"


def test_renders_item_access() -> None:
    """``{payload[tenant]}`` reads an item of the argument."""
    assert render("tenant:{payload[tenant]}", payload={"tenant": "acme"}) == "tenant:acme"


def test_renders_format_specs() -> None:
    """A format spec is applied to the value before escaping."""
    assert render("{n:05d}/{x:.2f}", n=7, x=1.5) == "00007/1.50"


def test_renders_format_spec_on_attribute() -> None:
    """A format spec applies to the value reached by attribute access."""
    assert render("order:{order.number:03d}", order=Order("acme", 7)) == "order:007"


def test_escapes_a_value_reached_by_attribute_access() -> None:
    """A value reached through attribute access is escaped like any other."""
    assert render("{order.tenant}", order=Order("a{b}", 1)) == "a%7Bb%7D"


def test_fields_lists_the_parameters_read() -> None:
    """``fields`` names each task parameter the template reads, once, in order."""
    template = KeyTemplate("{order.tenant}:{payload[x]}:{order.number}:{n:03d}")
    assert template.fields == ("order", "payload", "n")


def test_callable_key_receives_the_context() -> None:
    """A callable key is called with the ``TaskContext`` and its result is the key."""
    template = KeyTemplate(lambda context: f"tenant:{context.kwargs['tenant_id']}")
    assert template.render(TaskContext("task", kwargs={"tenant_id": "acme"})) == "tenant:acme"


def test_callable_key_result_is_escaped() -> None:
    """Braces and control characters returned by a callable key are escaped."""
    template = KeyTemplate(lambda context: "tenant:{a}\n")
    key = template.render(TaskContext("task"))
    assert key == "tenant:%7Ba%7D%0A"


@pytest.mark.parametrize("result", ["", None, 42])
def test_callable_key_must_return_a_non_empty_string(result: object) -> None:
    """A callable key returning something other than a non-empty ``str`` raises ``ConfigurationError``."""
    template = KeyTemplate(lambda context: result)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError) as info:
        template.render(TaskContext("task"))
    assert info.value.field == "key"


def test_key_templates_compare_by_source() -> None:
    """Two templates with the same source are equal and hash alike."""
    assert KeyTemplate("t:{a}") == KeyTemplate("t:{a}")
    assert hash(KeyTemplate("t:{a}")) == hash(KeyTemplate("t:{a}"))
    assert KeyTemplate("t:{a}") != KeyTemplate("t:{b}")


def test_key_template_of_returns_an_existing_template() -> None:
    """``KeyTemplate.of`` passes a template through unchanged."""
    template = KeyTemplate("t:{a}")
    assert KeyTemplate.of(template) is template


@pytest.mark.parametrize("source", ["", "tenant:{", "tenant:}", "{0}", "{}", "{1abc}", "{a-b}"])
def test_invalid_template_raises_configuration_error(source: str) -> None:
    """An empty or malformed template, or a field that is no parameter name, raises at construction."""
    with pytest.raises(ConfigurationError) as info:
        KeyTemplate(source, "breaker.key")
    assert info.value.field == "breaker.key"
    assert repr(source) in str(info.value)


def test_non_string_template_raises_configuration_error() -> None:
    """A template that is neither a string nor a callable raises ``ConfigurationError``."""
    with pytest.raises(ConfigurationError):
        KeyTemplate(42)  # type: ignore[arg-type]


# -- missing arguments ------------------------------------------------------------------


def test_missing_keyword_argument_raises_configuration_error_naming_the_key() -> None:
    """Rendering without a field's argument raises ``ConfigurationError`` naming the template and field."""
    with pytest.raises(ConfigurationError) as info:
        render("tenant:{tenant_id}", other="x")
    assert info.value.field == "key"
    assert "tenant:{tenant_id}" in str(info.value)
    assert "tenant_id" in info.value.expected


def test_missing_argument_with_binder_raises_configuration_error() -> None:
    """A parameter without default that was not passed raises ``ConfigurationError`` naming the task."""
    context = TaskContext("charge", args=("acme",), binder=ArgBinder(charge))
    with pytest.raises(ConfigurationError) as info:
        KeyTemplate("{tenant_id}:{amount}").render(context)
    assert "amount" in str(info.value)
    assert "charge" in str(info.value)


def test_missing_argument_of_multi_field_template_raises_configuration_error() -> None:
    """A missing argument in a multi-field template with a format spec raises ``ConfigurationError``."""
    with pytest.raises(ConfigurationError) as info:
        render("{a}:{b:>3}", a="x")
    assert "'b'" in str(info.value)


# -- escaping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("acme", "acme"),
        ("a-b_c.d", "a-b_c.d"),
        ("a{b}", "a%7Bb%7D"),
        ("a:b", "a%3Ab"),
        ("a b", "a%20b"),
        ("a\nb", "a%0Ab"),
        ("a\x00b", "a%00b"),
        ("a%b", "a%25b"),
        ("a#b", "a%23b"),
        ("é", "%C3%A9"),
    ],
)
def test_escape_key_part(value: str, escaped: str) -> None:
    """Plain parts pass; braces, colons, spaces, control chars, ``%``, ``#`` and non-ASCII are encoded."""
    assert escape_key_part(value) == escaped


def test_template_value_with_a_colon_cannot_forge_another_key() -> None:
    """``{a}:{b}`` with ``a="x:y", b="z"`` differs from ``a="x", b="y:z"``."""
    assert render("{a}:{b}", a="x:y", b="z") != render("{a}:{b}", a="x", b="y:z")


def test_long_value_is_hashed_to_a_bounded_length() -> None:
    """A value whose escaped form exceeds the bound becomes ``#`` plus a hash prefix, within the bound."""
    part = escape_key_part("x" * 1000)
    assert part.startswith("#")
    assert len(part) <= MAX_PART_LENGTH


def test_value_at_the_bound_is_kept_plain() -> None:
    """A plain value of exactly the maximum length is not hashed."""
    value = "x" * MAX_PART_LENGTH
    assert escape_key_part(value) == value


def test_hashed_part_never_equals_a_plain_value() -> None:
    """A tenant whose id is literally a hashed part does not share that hashed key."""
    hashed = escape_key_part("y" * 500)
    assert escape_key_part(hashed) != hashed


def test_lone_surrogate_is_escaped_not_raised() -> None:
    """A lone surrogate (as ``json.loads('"\\ud800"')`` yields) is escaped instead of raising."""
    part = escape_key_part("tenant\ud800")
    assert "{" not in part
    assert all(ord(c) >= 0x20 for c in part)
    assert part != escape_key_part("tenant\ud801")


VALUES = st.text() | st.text(alphabet="ab:{}%#\n ", max_size=80) | st.text(min_size=60, max_size=200)


@given(a=VALUES, b=VALUES)
@example(a="x" * 65, b="#" + "0" * 32)
@example(a="a%7B", b="a{")
@example(a="", b="%")
def test_escaping_is_injective(a: str, b: str) -> None:
    """Two different values never escape to the same key part."""
    assume(a != b)
    assert escape_key_part(a) != escape_key_part(b)


@given(a=VALUES, b=VALUES)
def test_rendered_template_is_injective(a: str, b: str) -> None:
    """Two different argument values never render the same key."""
    assume(a != b)
    assert render_value(a) != render_value(b)


@given(value=VALUES)
def test_rendered_key_has_no_braces_or_control_characters(value: str) -> None:
    """A rendered key never contains ``{``, ``}`` or a character below 0x20."""
    key = render_value(value)
    assert "{" not in key
    assert "}" not in key
    assert all(ord(c) >= 0x20 for c in key)


@given(value=VALUES)
def test_escaped_part_is_bounded(value: str) -> None:
    """An escaped part is never longer than the bound, however long the value."""
    assert len(escape_key_part(value)) <= MAX_PART_LENGTH


@given(value=VALUES)
def test_escaped_part_is_printable_ascii(value: str) -> None:
    """An escaped part is printable ASCII without spaces, whatever the input."""
    part = escape_key_part(value)
    assert all(0x21 <= ord(c) <= 0x7E for c in part)
