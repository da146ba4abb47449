"""Keys: the scope a component's state is kept under, built per execution.

A key is either a template over the task's arguments (``"tenant:{tenant_id}"``) or a
callable taking the :class:`TaskContext`. Values taken from arguments are escaped so
that one tenant's key can never equal another's, never contains a Redis Cluster hash-tag
brace or a control character, and never grows beyond a bound (long values are hashed).
"""

from __future__ import annotations

import hashlib
import inspect
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union
from urllib.parse import quote

from ..errors import ConfigurationError

__all__ = ["ArgBinder", "KeySpec", "KeyTemplate", "TaskContext", "escape_key_part"]

MAX_PART_LENGTH = 64
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_FORMATTER = string.Formatter()
_MISSING = object()


def escape_key_part(value: str, safe: str = "") -> str:
    """Escape one user-supplied key part: injective, brace- and control-free, bounded.

    Unreserved characters pass; everything else is percent-encoded; a result longer than
    64 characters becomes ``#`` + a SHA-256 prefix (``#`` itself is always encoded, so a
    hashed part can never equal a plain one).

    >>> escape_key_part("acme")
    'acme'
    >>> escape_key_part("a{b}:c")
    'a%7Bb%7D%3Ac'
    """
    if _PLAIN.fullmatch(value):
        return value
    if not value:
        return "%"  # never produced otherwise (quote writes %XX), and never an empty hash tag
    escaped = quote(value.encode("utf-8", "surrogatepass"), safe=safe)
    if len(escaped) > MAX_PART_LENGTH:
        return "#" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return escaped


def key_text(value: object) -> str:
    """A key part for any argument value: strings escaped, and the values whose ``str()``
    a string could imitate (``None``, ``bytes``) marked so none can (``%~`` never comes out
    of :func:`escape_key_part`)."""
    if type(value) is str:
        return escape_key_part(value)
    if value is None:
        return "%~none"
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) > MAX_PART_LENGTH // 2:
            return "%~b#" + hashlib.sha256(raw).hexdigest()[:32]
        return "%~b" + raw.hex()
    return escape_key_part(str(value))


class ArgBinder:
    """Finds an argument by parameter name in ``(args, kwargs)``, built once per task."""

    __slots__ = ("_defaults", "_positions", "names", "varkw")

    def __init__(self, func: Callable[..., Any]) -> None:
        signature = inspect.signature(func)
        self._positions: dict[str, int] = {}
        self._defaults: dict[str, Any] = {}
        self.varkw = False
        position = 0
        for name, param in signature.parameters.items():
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                self._positions[name] = position
                position += 1
            if param.kind is param.VAR_KEYWORD:
                self.varkw = True
            elif param.kind is not param.VAR_POSITIONAL and param.default is not param.empty:
                self._defaults[name] = param.default
        self.names = frozenset(
            n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )

    def lookup(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self._positions.get(name)
        if position is not None and position < len(args):
            return args[position]
        return self._defaults.get(name, _MISSING)


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What the pipeline knows about one execution of a task.

    ``deferrals``, ``first_seen`` and ``reservations`` travel with the message (headers)
    across deferrals; ``binder`` resolves positional arguments by parameter name.
    """

    task_name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)
    deferrals: int = 0
    first_seen: float | None = None
    reservations: Mapping[str, float] = field(default_factory=dict)
    binder: ArgBinder | None = None

    def argument(self, name: str) -> Any:
        """The value of parameter ``name`` for this execution (``KeyError`` when absent)."""
        if self.binder is not None:
            value = self.binder.lookup(name, self.args, self.kwargs)
        else:
            value = self.kwargs.get(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value


KeySpec = Union[str, Callable[[TaskContext], str], "KeyTemplate"]
"""A key as users write it: a template string, a callable, or a :class:`KeyTemplate`."""


_SPEC = re.compile(r"^(?:.?[<>=^])?[+\- ]?z?#?0?(\d*)[_,]?(?:\.(\d+))?[bcdeEfFgGnosxX%]?$", re.DOTALL)


def _plausible_spec(spec: str) -> bool:
    """A standard format spec with a width and precision a key can afford."""
    match = _SPEC.match(spec)
    return match is not None and all(int(n or 0) <= 100 for n in match.groups())


class KeyTemplate:
    """A compiled key: ``KeyTemplate("tenant:{tenant_id}")`` or ``KeyTemplate(callable)``.

    Template fields name task parameters and may use attribute or item access
    (``"{order.tenant}"``, ``"{payload[tenant]}"``).
    """

    __slots__ = ("_fields", "_func", "_parts", "source")

    def __init__(self, source: str | Callable[[TaskContext], str], field_name: str = "key") -> None:
        self.source = source
        self._func: Callable[[TaskContext], str] | None = None
        self._parts: list[tuple[str, str | None, str, str, str | None]] = []
        self._fields: tuple[str, ...] = ()
        if callable(source):
            self._func = source
            return
        if not isinstance(source, str) or not source:
            raise ConfigurationError(field_name, source, "expected a non-empty template string or a callable")
        try:
            parsed = list(_FORMATTER.parse(source))
        except ValueError as exc:
            raise ConfigurationError(field_name, source, f"expected a valid template ({exc})") from None
        roots: list[str] = []
        for literal, field_expr, spec, conversion in parsed:
            if any(c in literal for c in "{}") or not literal.isprintable():
                raise ConfigurationError(
                    field_name,
                    source,
                    "expected no literal braces or control characters (they would split the key)",
                )
            if field_expr is None:
                self._parts.append((literal, None, "", "", None))
                continue
            root = re.split(r"[.\[]", field_expr, maxsplit=1)[0]
            if not root.isidentifier():
                raise ConfigurationError(
                    field_name, source, f"expected fields naming task parameters, found {{{field_expr}}}"
                )
            if conversion not in (None, "r", "s", "a"):
                raise ConfigurationError(
                    field_name, source, f"expected a conversion !r, !s or !a, found !{conversion}"
                )
            if spec and not _plausible_spec(spec):
                raise ConfigurationError(
                    field_name,
                    source,
                    f"expected a format spec such as 05d or .8 (width <= 100), found :{spec}",
                )
            roots.append(root)
            self._parts.append((literal, field_expr, root, spec or "", conversion))
        self._fields = tuple(dict.fromkeys(roots))

    @classmethod
    def of(cls, spec: KeySpec, field_name: str = "key") -> KeyTemplate:
        return spec if isinstance(spec, KeyTemplate) else cls(spec, field_name)

    @property
    def fields(self) -> tuple[str, ...]:
        """The task parameters the template reads (empty for a callable or a constant)."""
        return self._fields

    def check(self, func: Callable[..., Any], field_name: str = "key") -> None:
        """Fail at definition time when the template names a parameter ``func`` lacks."""
        binder = ArgBinder(func)
        missing = [name for name in self._fields if name not in binder.names and not binder.varkw]
        if missing:
            raise ConfigurationError(
                field_name,
                self.source,
                f"expected fields naming parameters of {getattr(func, '__qualname__', func)!s} "
                f"({', '.join(sorted(binder.names)) or 'none'}); unknown: {', '.join(missing)}",
            )

    def render(self, context: TaskContext) -> str:
        """The escaped key for one execution."""
        if self._func is not None:
            value = self._func(context)
            if not isinstance(value, str) or not value:
                raise ConfigurationError(
                    "key", value, f"expected the key callable {self._func!r} to return a non-empty str"
                )
            return escape_key_part(value, safe=":/@")
        if len(self._parts) == 1 and not self._parts[0][3] and not self._parts[0][4]:
            literal, field_expr, root, _, _ = self._parts[0]
            if field_expr == root:  # "prefix:{name}", the common shape
                return literal + key_text(self._argument(context, root))
            if field_expr is None:
                return literal
        out: list[str] = []
        for literal, field_expr, root, spec, conversion in self._parts:
            out.append(literal)
            if field_expr is None:
                continue
            value = self._argument(context, root)
            if field_expr != root:
                try:
                    value, _ = _FORMATTER.get_field(field_expr, (), {root: value})
                except (AttributeError, KeyError, IndexError, TypeError) as exc:
                    raise ConfigurationError(
                        "key",
                        self.source,
                        f"expected {{{field_expr}}} to resolve in the call of {context.task_name} ({exc!r})",
                    ) from None
            if not conversion and not spec:
                out.append(key_text(value))
                continue
            if conversion:
                value = _FORMATTER.convert_field(value, conversion)
            try:
                text = format(value, spec) if spec else str(value)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    "key", self.source, f"expected {{{field_expr}:{spec}}} to format {value!r} ({exc})"
                ) from None
            out.append(escape_key_part(text))
        return "".join(out)

    def _argument(self, context: TaskContext, name: str) -> Any:
        try:
            return context.argument(name)
        except KeyError:
            raise ConfigurationError(
                "key", self.source, f"expected argument {name!r} in the call of {context.task_name}"
            ) from None

    def __repr__(self) -> str:
        return f"KeyTemplate({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyTemplate) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)
