"""Fixtures of the store contract suite: one ``store`` per registered kind, and a pipeline on it.

Every test in this folder runs once per entry of :data:`STORES`. To run the suite against
another store, register its builder in ``tests/conftest.py`` and add one line here, e.g.
``pytest.param("redis", marks=pytest.mark.redis)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from limitpal_tasks import MockClock, Pipeline, Store

STORES = [
    pytest.param("memory"),
    pytest.param("redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, store_factory: Callable[[str], Store]) -> Store:
    """A fresh store of each registered kind; with ``now=None`` it reads the test's ``clock``."""
    name: str = request.param
    return store_factory(name)


@pytest.fixture
def pipeline(store: Store, clock: MockClock) -> Pipeline:
    """A pipeline on ``store`` that passes the test's ``clock`` as ``now``, with a seeded rng."""
    return Pipeline(store, clock=clock, rng=random.Random(0))
