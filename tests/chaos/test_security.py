"""Part 7: the store under least privilege and TLS, as ``docs/security.md`` documents it.

- The Redis ACL of ``docs/security.md`` is read from the document itself, applied to a
  user of a ``redis-server`` of our own, and a representative run of the store contract
  (every operation, sync and asyncio) goes through that user with no error; then the
  commands that ran (``INFO commandstats``) and the commands the Lua scripts can call must
  be exactly the commands the document grants: none missing, none superfluous.
- The user cannot touch a key outside the prefix, nor run an ungranted command.
- ``rediss://`` against a TLS-only server of our own, with the CA given in the URL.
- Parked deferrals (``defer_transport="park"``) must not become a way to run code on the
  workers from the store.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from limitpal_tasks import (
    Admitted,
    Breaker,
    Bulkhead,
    DeadLetter,
    Deferred,
    Outcome,
    Pipeline,
    Policy,
    RateLimit,
    RetryBudget,
    RetryPolicy,
    StoreError,
    TaskContext,
)
from limitpal_tasks.core.parking import ParkedEntry
from limitpal_tasks.core.units import Rate
from limitpal_tasks.stores.redis import RedisStore

from .servers import RedisServer, chaos_port, release_port, require_binaries

pytestmark = [pytest.mark.chaos, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
LUA = ROOT / "src" / "limitpal_tasks" / "stores" / "lua"
PREFIX = "limitpal"
PASSWORD = "chaos-secret"
ADMIN_COMMANDS = {"info", "config|resetstat", "acl|setuser", "acl|log", "acl|deluser"}
"""What the test's own default-user client runs, left out of the comparison."""
HANDSHAKE = {"hello", "auth"}
"""What every client may run to authenticate (redis-py's connection handshake)."""


def documented_acl() -> list[str]:
    """The ``ACL SETUSER`` line of docs/security.md, as tokens (its password replaced by ours)."""
    match = re.search(r"^ACL SETUSER limitpal (.+)$", DOC.read_text(), re.MULTILINE)
    assert match, "docs/security.md has no 'ACL SETUSER limitpal ...' line"
    tokens = match.group(1).split()
    return [f">{PASSWORD}" if t.startswith(">") else t for t in tokens]


def granted_commands(tokens: list[str]) -> set[str]:
    return {t[1:].lower() for t in tokens if t.startswith("+")}


def script_commands() -> set[str]:
    """Every command the store's Lua scripts can call."""
    found: set[str] = set()
    for path in LUA.glob("*.lua"):
        found |= {m.lower() for m in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", path.read_text())}
    return found


def test_the_documented_acl_grants_every_command_the_scripts_call() -> None:
    """docs/security.md stays in step with the Lua scripts: a new command there must be granted."""
    assert script_commands() <= granted_commands(documented_acl())


# -- the contract through the ACL user ---------------------------------------------------------


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer.running_server() as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "limitpal", *documented_acl())  # type: ignore[no-untyped-call]
        admin.close()
        yield server


def _contract(store: RedisStore) -> None:
    """One of each store operation, through the pipeline where it has one; fail_mode closed, so an
    ACL refusal shows as a StoreError (a deferral), never as a silent fallback."""
    pipeline = Pipeline(store)
    breaker = Policy(
        "acl-breaker",
        key="tenant:{t}",
        breaker=Breaker(minimum_calls=2, window=2, open_for=0.2, half_open_probes=1),
        retry=RetryPolicy(budget=RetryBudget()),
        fail_mode="closed",
    )
    limits = Policy(
        "acl-limits",
        key="tenant:{t}",
        bulkhead=Bulkhead(1),
        rate=[RateLimit("1/s"), RateLimit("100/m", key="global")],
        fail_mode="closed",
    )
    time_window = Policy(
        "acl-time", key="tenant:{t}", breaker=Breaker(window_type="time", window=10), fail_mode="closed"
    )
    ctx = TaskContext("acl", kwargs={"t": "acme"})

    for _ in range(2):  # a count window, then the breaker opens
        decision = pipeline.admit(breaker, ctx)
        assert isinstance(decision, Admitted), decision
        pipeline.record(decision.ticket, Outcome.failure(0.01))
        assert pipeline.retry(breaker, RuntimeError("x"), 1, ctx).retry
    assert store.status("tenant:acme").breaker == "open"
    store.flush()
    deferred = pipeline.admit(breaker, ctx)
    assert isinstance(deferred, Deferred)
    now = store.status("tenant:acme").open_until
    assert now is not None
    probe = pipeline.admit(breaker, TaskContext("acl", kwargs={"t": "acme"}))
    while not isinstance(probe, Admitted):  # the break is 0.2 s; store time decides
        probe = pipeline.admit(breaker, ctx)
    pipeline.record(probe.ticket, Outcome.success(0.01))  # half-open probe closes it

    first = pipeline.admit(limits, ctx)  # bulkhead lease, two rate limits
    assert isinstance(first, Admitted)
    busy = pipeline.admit(limits, ctx)
    assert isinstance(busy, Deferred)
    pipeline.record(first.ticket, Outcome.success(0.01))
    booked = pipeline.admit(limits, ctx)
    assert isinstance(booked, Deferred)
    assert booked.reservations
    for _ in range(3):
        decision = pipeline.admit(time_window, ctx)
        assert isinstance(decision, Admitted)
        pipeline.record(decision.ticket, Outcome.success(0.01))
    cooled = pipeline.admit(time_window, TaskContext("acl", kwargs={"t": "cooled"}))
    assert isinstance(cooled, Admitted)
    pipeline.record(cooled.ticket, Outcome.cooldown(30, 0.01))

    async def twins() -> None:
        decision = await pipeline.admit_async(time_window, TaskContext("acl", kwargs={"t": "async"}))
        assert isinstance(decision, Admitted)
        await pipeline.record_async(decision.ticket, Outcome.success(0.01))
        assert await pipeline.retry_async(breaker, RuntimeError("x"), 1, ctx)

    asyncio.run(twins())

    store.pause("tenant:paused", 60, "operator")
    store.resume("tenant:paused")
    store.force("tenant:forced", "forced_open")
    store.reset("tenant:forced")
    store.override("tenant:acme", limits.rates[0].slot_id, Rate(5, 1.0), seconds=60)
    store.override("tenant:acme", limits.rates[0].slot_id, Rate(5, 1.0))
    store.override("tenant:acme", limits.rates[0].slot_id, None)
    assert "tenant:acme" in set(store.keys())
    store.status("tenant:acme")

    store.put_dead(DeadLetter(id="d1", task_name="t", reason="max_attempts", args=(1,)))
    store.put_dead(DeadLetter(id="d2", task_name="t", reason="max_attempts"))
    assert [d.id for d in store.list_dead()] == ["d2", "d1"]
    assert store.take_dead("d1") is not None
    assert store.purge_dead() == 1

    entry = ParkedEntry(park="acl", task_name="t", policy="p", key="tenant:acme", delay=0.0, interval=0.5)
    assert store.park(entry, 10) is not None
    assert store.park(ParkedEntry(park="acl", task_name="t", policy="p", key="k2", delay=60, interval=0), 10)
    assert store.parked("acl")
    [taken] = store.take_parked("acl", 10, lease=5)
    store.confirm_parked("acl", taken.id)
    assert store.release_parked("acl", "k2") == 1
    assert store.purge_parked("acl") >= 1
    assert pipeline.store_errors == 0, "an operation was refused (see the ACL LOG)"


def test_the_store_contract_runs_through_the_documented_acl_user(acl_server: RedisServer) -> None:
    """Every store operation works for the ACL user of docs/security.md, and nothing it may not do."""
    admin = acl_server.client()
    admin.config_resetstat()
    store = RedisStore.from_url(
        f"redis://limitpal:{PASSWORD}@127.0.0.1:{acl_server.port}/0", prefix=PREFIX, batch_delay=0.01
    )
    try:
        _contract(store)
    finally:
        store.close()
    stats = admin.info("commandstats")
    denied = admin.acl_log()
    admin.close()

    executed = {name.removeprefix("cmdstat_") for name, value in stats.items() if value["calls"]}
    executed -= ADMIN_COMMANDS | HANDSHAKE
    assert [(d["reason"], d["object"]) for d in denied] == []
    granted = granted_commands(documented_acl())
    assert executed <= granted
    assert granted == executed | script_commands() | {"select"}, "granted but never used (or the reverse)"


def test_the_acl_user_cannot_reach_outside_its_prefix_or_its_commands(acl_server: RedisServer) -> None:
    """The documented user can touch neither another application's keys nor data commands it was not given."""
    client = redis.Redis(host="127.0.0.1", port=acl_server.port, username="limitpal", password=PASSWORD)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.hgetall("someone-else:{tenant:acme}:s")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set(f"{PREFIX}:x", 1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.keys("*")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.eval("return 1", 0)
        with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
            client.register_script("return redis.call('SET', KEYS[1], 1)")(keys=[f"{PREFIX}:x"])
    finally:
        client.close()


def test_a_store_with_another_prefix_is_refused_not_silently_used(acl_server: RedisServer) -> None:
    """A worker configured with the wrong prefix gets store errors (its fail mode), not other keys."""
    store = RedisStore.from_url(f"redis://limitpal:{PASSWORD}@127.0.0.1:{acl_server.port}/0", prefix="other")
    try:
        decision = Pipeline(store).admit(Policy("p", fail_mode="closed"), TaskContext("t"))
    finally:
        store.close()
    assert isinstance(decision, Deferred)
    assert decision.reason == "store_unavailable"


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[int, Path]]:
    """A TLS-only redis-server of our own; its port and the CA that signed its certificate."""
    require_binaries("redis-server", "openssl")
    with tempfile.TemporaryDirectory(prefix="limitpal-chaos-tls-") as name:
        d = Path(name)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

        ca = ["-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=limitpal-chaos-ca"]
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *ca)
        csr = ["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]
        openssl("req", "-newkey", "rsa:2048", "-nodes", *csr)
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        sign = ["-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
        openssl("x509", "-req", *sign, "-out", "server.pem", "-extfile", "san.ext")
        port = chaos_port()
        tls = ["--tls-port", str(port), "--tls-cert-file", "server.pem", "--tls-key-file", "server.key"]
        tls += ["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"]
        process = subprocess.Popen(
            ["redis-server", "--port", "0", "--bind", "127.0.0.1", *tls, "--save", "", "--appendonly", "no"],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(d / "ca.pem"))
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if process.poll() is not None:
                        pytest.fail("the TLS redis-server exited")
                    subprocess.run(["sleep", "0.02"], check=True)
            client.close()
            yield port, d / "ca.pem"
        finally:
            process.terminate()
            process.wait(timeout=10)
            release_port(port)


def test_rediss_url_with_the_ca_in_its_query_works_end_to_end(tls_server: tuple[int, Path]) -> None:
    """``rediss://host:port/0?ssl_ca_certs=...&ssl_cert_reqs=required`` verifies the server and works."""
    port, ca = tls_server
    store = RedisStore.from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
    pipeline = Pipeline(store)
    try:
        decision = pipeline.admit(Policy("tls", fail_mode="closed"), TaskContext("t"))
        assert isinstance(decision, Admitted)
        pipeline.record(decision.ticket, Outcome.success(0.0))
        assert pipeline.store_errors == 0
    finally:
        store.close()


def test_rediss_without_a_trusted_ca_or_plain_redis_to_a_tls_port_is_a_store_error(
    tls_server: tuple[int, Path],
) -> None:
    """An unverifiable certificate, or plaintext against TLS, fails closed: a StoreError, not a connection."""
    port, _ = tls_server
    for url in (f"rediss://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
        store = RedisStore.from_url(url, store_timeout=1.0)
        try:
            with pytest.raises(StoreError):
                store.status("k")
        finally:
            store.close()


# -- parked deferrals must not run code from the store --------------------------------------------


class _Marker:
    """Unpickling this runs code that sets ``builtins.limitpal_chaos_unpickled``: proof that pickle ran."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("import builtins; builtins.limitpal_chaos_unpickled = True",))


@pytest.mark.celery
def test_a_parked_entry_cannot_make_a_json_only_worker_unpickle(acl_server: RedisServer) -> None:
    """A JSON-only Celery app's releaser refuses a parked body in a content type the app does not accept
    (it used to decode with the content type stored next to the body: a planted pickle ran, 6beabc1)."""
    import pickle

    from celery import Celery
    from kombu.utils import json as kombu_json

    from limitpal_tasks.celery import install, releaser

    app = Celery("chaos-park", broker="memory://")
    app.conf.update(
        accept_content=["json"],
        task_serializer="json",
        limitpal_store_url=acl_server.url(),
        limitpal_key_prefix="park-rce",
        limitpal_defer_transport="park",
    )
    install(app)
    store = RedisStore.from_url(acl_server.url(), prefix="park-rce")
    body = pickle.dumps(((_Marker(),), {}))
    payload = {
        "signature": kombu_json.dumps(  # type: ignore[no-untyped-call]  # kombu is untyped
            {"task": "chaos.nothing", "args": (), "kwargs": {}, "options": {}}
        ),
        "body": base64.b64encode(body).decode(),
        "content_type": "application/x-python-serialize",
        "content_encoding": "binary",
    }
    planted = ParkedEntry(
        park="celery",
        task_name="chaos.nothing",
        policy="p",
        key="k",
        delay=0.0,
        interval=0.0,
        payload=payload,
    )
    try:
        assert store.park(planted, 10) is not None
        releaser(app).run_once()
    finally:
        store.close()
        app.close()
    unpickled = getattr(builtins, "limitpal_chaos_unpickled", False)
    if unpickled:
        delattr(builtins, "limitpal_chaos_unpickled")
    assert not unpickled, "the worker unpickled a body planted in the store"
