"""Fault 6b: hostile key values. Tenant ids come from task arguments, so from whoever enqueues.

Braces, ``*``, newlines, 1 MB strings, lone surrogates, non-UTF-8 bytes and ``None`` must
never make one tenant's key equal another's (``core/keys.py`` escapes every value and
hashes long ones), never split a key's Redis keys across Redis Cluster slots (they share
the hash tag ``{<key>}``: checked with a CRC16 of our own, itself checked against
``CLUSTER KEYSLOT`` of a cluster-enabled ``redis-server``), and never grow Redis memory
with the size of the value. A dead letter, on the other hand, keeps the task's arguments
whole: that is pinned here, and documented in ``docs/security.md``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limitpal_tasks import (
    Admitted,
    Breaker,
    Bulkhead,
    ConfigurationError,
    DeadLetter,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    TaskContext,
)
from limitpal_tasks.core.keys import KeyTemplate
from limitpal_tasks.stores.redis import RedisStore

from .harness import quiet
from .servers import RedisServer, chaos_port, release_port

pytestmark = [pytest.mark.chaos]

TEMPLATE = KeyTemplate("tenant:{tenant}")
PAIR = KeyTemplate("t:{a}:{b}")
MEGABYTE = "x" * (1 << 20)
HOSTILE = [
    "",
    "{",
    "}",
    "{acme}",
    "}{",
    "*",
    "tenant:*",
    "a\nb",
    "\r\n*1\r\n$4\r\nPING\r\n",
    "\x00",
    "\x1f",
    "\udcff",
    "é",
    "%41",
    "A",
    "#" + "0" * 32,
    MEGABYTE,
    MEGABYTE + "y",
]

hostile_text = st.text(st.characters(exclude_categories=()), max_size=80) | st.sampled_from(HOSTILE)


def _render(value: object, template: KeyTemplate = TEMPLATE) -> str:
    return template.render(TaskContext("t", kwargs={"tenant": value}))


# -- one tenant's key is never another's ---------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(a=hostile_text, b=hostile_text)
def test_distinct_tenant_strings_never_share_a_key(a: str, b: str) -> None:
    """Two different tenant ids (any characters, any length) render to different keys."""
    if a != b:
        assert _render(a) != _render(b)


@settings(max_examples=300, deadline=None)
@given(first=st.tuples(hostile_text, hostile_text), second=st.tuples(hostile_text, hostile_text))
def test_distinct_argument_pairs_never_share_a_key(first: tuple[str, str], second: tuple[str, str]) -> None:
    """With two fields, ``t:{a}:{b}``: a separator inside a value cannot shift it into the other field."""
    if first != second:
        keys = [PAIR.render(TaskContext("t", kwargs={"a": a, "b": b})) for a, b in (first, second)]
        assert keys[0] != keys[1]


def test_every_hostile_value_renders_to_a_distinct_bounded_brace_free_key() -> None:
    """Each hostile value has its own key: short, printable ASCII, no brace or control character."""
    keys = [_render(value) for value in HOSTILE]

    assert len(set(keys)) == len(HOSTILE)
    for key in keys:
        assert len(key) <= len("tenant:") + 64
        assert key.isascii()
        assert key.isprintable()
        assert "{" not in key
        assert "}" not in key
        assert "*" not in key


@pytest.mark.parametrize(
    ("value", "impostor"), [(None, "None"), (b"\xff", "b'\\xff'")], ids=["None", "bytes"]
)
def test_a_non_string_tenant_never_shares_a_key_with_a_string_tenant(value: object, impostor: str) -> None:
    """``None`` and non-UTF-8 ``bytes`` render to keys no string tenant id can produce."""
    assert _render(value) != _render(impostor)


# -- one key, one cluster slot ---------------------------------------------------------------


def _crc16(data: bytes) -> int:
    """CRC16/XMODEM, the checksum Redis Cluster maps keys to slots with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key: str) -> int:
    """The Redis Cluster slot of ``key``: its hash tag's (the first non-empty ``{...}``) or its own."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16(raw) % 16384


def _redis_keys(key: str) -> list[str]:
    store = RedisStore.__new__(RedisStore)  # only the key layout is needed: no client, no I/O
    store.prefix = "limitpal"
    return store._keys(key)


@pytest.fixture(scope="module")
def cluster_node() -> Iterator[RedisServer]:
    """A cluster-enabled ``redis-server`` (alone: CLUSTER KEYSLOT needs no formed cluster)."""
    bus = chaos_port()
    try:
        with RedisServer.running_server(
            extra=[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(bus),
                "--cluster-config-file",
                "nodes.conf",
            ]
        ) as server:
            yield server
    finally:
        release_port(bus)


def test_our_crc16_agrees_with_cluster_keyslot(cluster_node: RedisServer) -> None:
    """The slot function of these tests is Redis's own, hash tags included."""
    samples = ["", "a", "{a}b", "x{}y", "{}{a}", "limitpal:{tenant:acme}:s", "a{b{c}d}", "é", "123456789"]
    samples += [k for value in HOSTILE[:12] for k in _redis_keys(_render(value))]
    client = cluster_node.client()
    try:
        for key in samples:
            assert keyslot(key) == client.cluster("KEYSLOT", key), key
    finally:
        client.close()


@settings(max_examples=500, deadline=None)
@given(value=hostile_text.filter(lambda v: v != ""))  # the empty id: see the xfail test below
def test_all_redis_keys_of_one_key_share_a_cluster_slot(value: str) -> None:
    """State, leases, probes and window of one tenant's key hash to one Redis Cluster slot."""
    keys = _redis_keys(_render(value))

    assert len({keyslot(k) for k in keys}) == 1, keys


def test_the_dead_letter_keys_share_a_slot() -> None:
    """The dead letter's hash and index live in one slot (``{dead}``), so its script can touch both."""
    store = RedisStore.__new__(RedisStore)
    store.prefix = "limitpal"
    assert keyslot("limitpal:{dead}:h") == keyslot("limitpal:{dead}:z")


def test_a_key_that_renders_empty_keeps_one_slot() -> None:
    """Even an empty tenant id keeps its keys in one slot (its hash tag is never empty)."""
    keys = _redis_keys(_render("", KeyTemplate("{tenant}")))
    assert len({keyslot(k) for k in keys}) == 1, keys


@pytest.mark.parametrize("template", ["}}{tenant}", "{{x}}:{tenant}", "a\nb:{tenant}"])
def test_a_template_with_literal_braces_or_controls_is_refused_up_front(template: str) -> None:
    """Literal braces (which would split a key's hash tag) or control characters fail at definition."""
    with pytest.raises(ConfigurationError):
        KeyTemplate(template)


# -- memory is bounded by the number of keys, not by the size of the ids ---------------------


@pytest.mark.redis
def test_huge_and_hostile_tenant_ids_cost_a_bounded_amount_of_redis_memory() -> None:
    """300 tenants with ids up to 1 MB: short key names, every key expiring, memory not growing with ids."""
    policy = Policy(
        "hostile",
        key="tenant:{tenant}",
        breaker=Breaker(minimum_calls=1000),
        bulkhead=Bulkhead(10),
        rate=RateLimit("100/s"),
    )
    megabytes = (f"{i:08d}" + MEGABYTE for i in itertools.count())
    tenants = [*HOSTILE, *itertools.islice(megabytes, 300 - len(HOSTILE))]
    with RedisServer.running_server() as server:
        client = server.client()
        store = RedisStore.from_url(server.url(), prefix="hostile")
        pipeline = Pipeline(store)
        try:
            before = int(client.info("memory")["used_memory"])
            for tenant in tenants:
                decision = pipeline.admit(policy, TaskContext("hostile", kwargs={"tenant": tenant}))
                assert isinstance(decision, Admitted), decision
                pipeline.record(decision.ticket, Outcome.success(0.0))
            store.flush()
            grown = int(client.info("memory")["used_memory"]) - before
            names = [k.decode() for k in client.scan_iter(count=1000)]
            ttls = [int(client.pttl(name)) for name in names]
        finally:
            store.close()
            client.close()

    assert grown < len(tenants) * 4096, f"{grown} bytes for {len(tenants)} tenants"
    assert max(len(name) for name in names) <= len("hostile:{tenant:}:s") + 64
    assert min(ttls) > 0, "a key without a TTL"
    assert len({name.rsplit(":", 1)[0] for name in names}) == len(tenants)


@pytest.mark.redis
def test_a_dead_letter_keeps_the_task_arguments_whole() -> None:
    """What docs/security.md says: a dead letter stores the task's arguments as they were, however large."""
    with RedisServer.running_server() as server:
        store = RedisStore.from_url(server.url(), prefix="dead")
        try:
            store.put_dead(
                DeadLetter(
                    id="big", task_name="t", reason="max_attempts", args=(MEGABYTE,), kwargs={"card": "4111"}
                )
            )
            [letter] = store.list_dead()
            client = server.client()
            ttl = int(client.ttl("dead:{dead}:h"))
            size = int(client.memory_usage("dead:{dead}:h") or 0)
            client.close()
        finally:
            store.close()

    assert letter.args == (MEGABYTE,)
    assert letter.kwargs == {"card": "4111"}
    assert 29 * 86400 < ttl <= 30 * 86400
    assert size > len(MEGABYTE)


# -- an argument the key cannot use ------------------------------------------------------------


@pytest.mark.dramatiq
def test_an_argument_the_key_cannot_use_never_lets_a_dramatiq_actor_skip_the_pipeline() -> None:
    """With its breaker forced open, no message runs, not even one whose argument lacks the key field."""
    import time

    import dramatiq
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import CurrentMessage

    from limitpal_tasks import Deferred, Hooks, MemoryStore
    from limitpal_tasks.dramatiq import LimitpalMiddleware, install

    class Deferrals(Hooks):
        def __init__(self) -> None:
            self.jobs: list[str] = []

        def on_defer(self, policy: str, decision: Deferred, context: TaskContext) -> None:
            self.jobs.append(str(context.args[1]))

    store = MemoryStore()
    store.force("service:upstream", "forced_open")
    policy = Policy(
        "p", key="t:{payload[tenant]}", breaker=Breaker(key="service:upstream"), fail_mode="closed"
    )
    deferrals = Deferrals()
    broker = StubBroker()
    broker.add_middleware(CurrentMessage())
    install(broker, LimitpalMiddleware(store=store, policies={"p": policy}, hooks=(deferrals,)))
    ran: list[str] = []

    def work(payload: dict[str, str], job: str) -> None:
        ran.append(job)

    actor = dramatiq.actor(broker=broker, actor_name="work", limitpal_policy="p", max_retries=0)(work)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    jobs = [f"good-{i}" for i in range(3)] + [f"bad-{i}" for i in range(3)]
    with quiet("dramatiq"):  # Dramatiq logs the exception it swallows, once per message
        worker.start()
        try:
            for job in jobs:
                actor.send({"tenant": "acme"} if job.startswith("good") else {"team": "acme"}, job)
            failed = {m.args[1] for m in broker.dead_letters}
            deadline = time.monotonic() + 10
            while not set(jobs) <= set(ran) | set(deferrals.jobs) | failed and time.monotonic() < deadline:
                time.sleep(0.02)
                failed = {m.args[1] for m in broker.dead_letters}
        finally:
            worker.stop()

    assert set(jobs) <= set(ran) | set(deferrals.jobs) | failed, "not every message was handled"
    assert ran == [], f"ran past a forced-open breaker: {ran}"
