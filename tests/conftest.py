"""Fixtures shared by every test: a ``MockClock``, the registry of stores, and server checks.

Stores are built by name from :data:`STORE_BUILDERS`. A builder takes the test's
``MockClock`` and yields a store whose operations read that clock whenever they are called
with ``now=None``; whatever it yields is torn down after the test. A new store joins the
contract suite in two steps: register a builder here with ``@store_builder("name")``, and
add its name to ``STORES`` in ``tests/stores/conftest.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import pytest

from limitpal_tasks import MemoryStore, MockClock, Store

StoreBuilder = Callable[[MockClock], AbstractContextManager[Store]]

STORE_BUILDERS: dict[str, StoreBuilder] = {}
"""Every store the contract suite knows how to build, by name."""


def store_builder(name: str) -> Callable[[Callable[[MockClock], Iterator[Store]]], StoreBuilder]:
    """Register a generator ``(clock) -> Iterator[Store]`` as the builder of store ``name``."""

    def register(func: Callable[[MockClock], Iterator[Store]]) -> StoreBuilder:
        if name in STORE_BUILDERS:
            raise ValueError(f"a store builder named {name!r} is already registered")
        builder = contextmanager(func)
        STORE_BUILDERS[name] = builder
        return builder

    return register


@store_builder("memory")
def _memory_store(clock: MockClock) -> Iterator[Store]:
    store = MemoryStore(clock=clock)
    try:
        yield store
    finally:
        store.close()


REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
CONTRACT_REDIS_DB = 8  # the contract suite's own database, flushed around every test


@store_builder("redis")
def _redis_store(clock: MockClock) -> Iterator[Store]:
    require_server("redis", REDIS_HOST, REDIS_PORT)
    from limitpal_tasks.stores.redis import RedisStore

    store = RedisStore.from_url(
        f"redis://{REDIS_HOST}:{REDIS_PORT}/{CONTRACT_REDIS_DB}", prefix="contract", clock=clock
    )
    store.client.flushdb()
    try:
        yield store
    finally:
        store.close()
        store.client.flushdb()


def in_ci() -> bool:
    """Whether the tests run in CI, where a missing server is an error, not a reason to skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_server(name: str, host: str, port: int, timeout: float = 1.0) -> None:
    """Skip the calling test (loudly) when ``name`` does not answer at ``host:port``; fail in CI.

    Locally a developer may not run every server, so the test is skipped with a reason
    that says how to run it; CI (the ``CI`` environment variable is set) must run every
    test, so there the same condition fails the test instead of hiding it.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        problem = f"{name} is not reachable at {host}:{port} ({exc.__class__.__name__}: {exc})"
    if in_ci():
        pytest.fail(f"{problem}; CI must run the {name} tests, so start {name} in .ci/run", pytrace=False)
    pytest.skip(f"SKIPPED ON PURPOSE - {problem}; start {name} (make services) to run these tests")


@pytest.fixture(name="require_server")
def _require_server_fixture() -> Callable[[str, str, int], None]:
    """:func:`require_server`, for tests that check a server themselves."""
    return require_server


@pytest.fixture
def clock() -> MockClock:
    """A clock that moves only when the test says so."""
    return MockClock()


class StoreFactory:
    """Builds registered stores by name on the test's clock; closes them after the test."""

    def __init__(self, clock: MockClock, stack: ExitStack) -> None:
        self._clock = clock
        self._stack = stack

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(STORE_BUILDERS)

    def __call__(self, name: str) -> Store:
        try:
            builder = STORE_BUILDERS[name]
        except KeyError:
            raise ValueError(f"no store builder named {name!r}; known: {', '.join(STORE_BUILDERS)}") from None
        return self._stack.enter_context(builder(self._clock))


@pytest.fixture
def store_factory(clock: MockClock) -> Iterator[StoreFactory]:
    """``store_factory("memory")``: a fresh store of that kind on the test's ``clock``."""
    with ExitStack() as stack:
        yield StoreFactory(clock, stack)
