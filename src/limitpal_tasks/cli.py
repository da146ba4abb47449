"""The ``limitpal-tasks`` command line: look at and steer breakers, pauses and dead letters.

Every command talks to the store named by ``--store`` (or ``LIMITPAL_STORE_URL``) under
``--prefix`` (or ``LIMITPAL_KEY_PREFIX``), the same settings the workers use.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from . import __version__
from .core.deadletter import DeadLetter
from .core.decisions import KeyStatus
from .core.store import Store
from .errors import LimitpalError
from .stores.factory import store_from_url
from .stores.memory import MemoryStore

_STORE = click.option(
    "--store",
    "store_url",
    envvar="LIMITPAL_STORE_URL",
    default="redis://localhost:6379/0",
    show_default=True,
    help="Store URL (env LIMITPAL_STORE_URL).",
)
_PREFIX = click.option(
    "--prefix",
    envvar="LIMITPAL_KEY_PREFIX",
    default="limitpal",
    show_default=True,
    help="Key prefix (env LIMITPAL_KEY_PREFIX).",
)


_SCAN_LIMIT = 100_000  # keys read by one status; beyond it, narrow with --match


@contextmanager
def _open(store_url: str, prefix: str) -> Iterator[Store]:
    try:
        if store_url.startswith("memory:"):
            store = store_from_url(store_url)
        else:
            store = store_from_url(store_url, prefix=prefix)
    except (LimitpalError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    if isinstance(store, MemoryStore):
        click.echo("note: memory:// is this process's own store; workers do not share it", err=True)
    try:
        yield store
    except LimitpalError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


@click.group()
@click.version_option(__version__, prog_name="limitpal-tasks")
def main() -> None:
    """Inspect and control limitpal_tasks' breakers, pauses and dead letters."""


@main.command()
def version() -> None:
    """Print the installed version."""
    click.echo(__version__)


def _limit_text(limit_id: str) -> str:
    """``"100/1/10"`` (a limit's id: limit/per seconds/burst) as ``100/s burst 10``."""
    try:
        limit, per, burst = limit_id.split("/")
    except ValueError:
        return limit_id
    return f"{limit}/{'s' if per == '1' else per + 's'} burst {burst}"


def _rate_rows(status: KeyStatus, at: float) -> dict[str, dict[str, Any]]:
    """Per limit: when the next execution may start, the reservations booked beyond the
    burst, and the tokens left now (GCRA: a schedule ``tat`` and room for ``burst`` slots)."""
    rows: dict[str, dict[str, Any]] = {}
    for limit_id, tat in sorted(status.rates.items()):
        override = status.overrides.get(limit_id)
        try:
            limit, per, burst = (float(x) for x in limit_id.split("/"))
        except ValueError:
            continue
        adaptive = status.adaptive.get(limit_id)
        interval = per / limit
        text = _limit_text(limit_id)
        if override:
            interval, text = override.interval, str(override)
        elif adaptive:
            interval = 1.0 / adaptive.rate
            text = f"adaptive {adaptive.rate:.3g}/s burst {int(burst)}"
            if adaptive.changed_at:
                text += f" (was {adaptive.previous:.3g}/s {max(0.0, at - adaptive.changed_at):.0f}s ago)"
        capacity = override.burst if override else int(burst)
        used = max(0.0, tat - at) / interval  # slots of the schedule taken beyond now
        rows[limit_id] = {
            "limit": text,
            "next_slot": max(tat - (capacity - 1) * interval, at),
            "booked_ahead": max(0, math.ceil(used - capacity - 1e-9)),
            "tokens": max(0, math.floor(capacity - used + 1e-9)),
            "overridden": override is not None,
            "adaptive": None
            if adaptive is None
            else {"rate": adaptive.rate, "previous": adaptive.previous, "changed_at": adaptive.changed_at},
        }
    return rows


def _as_json(status: KeyStatus) -> dict[str, Any]:
    at = status.at if status.at is not None else time.time()
    return {
        "key": status.key,
        "policy": status.policy,
        "breaker": status.breaker,
        "generation": status.generation,
        "open_until": status.open_until,
        "calls": status.calls,
        "failures": status.failures,
        "slow_calls": status.slow_calls,
        "failure_rate": status.failures / status.calls if status.calls else None,
        "in_flight": status.in_flight,
        "probes_in_flight": status.probes_in_flight,
        "paused_until": status.paused_until,
        "pause_reason": status.pause_reason,
        "rates": _rate_rows(status, at),
        "overrides": {
            limit_id: {"rate": str(o), "burst": o.burst, "until": o.until}
            for limit_id, o in sorted(status.overrides.items())
        },
        "at": at,
    }


def _until(at: float | None, now: float) -> str:
    return "-" if at is None else f"in {max(0.0, at - now):.1f}s"


def _table(statuses: list[KeyStatus]) -> str:
    headers = ["POLICY", "KEY", "BREAKER", "FAILURES", "OPEN UNTIL", "RATE", "IN FLIGHT", "PAUSED UNTIL"]
    rows = [headers]
    for status in statuses:
        at = status.at if status.at is not None else time.time()
        rates = []
        for row in _rate_rows(status, at).values():
            mark = " (override)" if row["overridden"] else ""
            if row["booked_ahead"]:
                rates.append(f"{row['limit']}{mark}: {row['booked_ahead']} booked ahead")
            else:
                rates.append(
                    f"{row['limit']}{mark}: {row['tokens']} token{'' if row['tokens'] == 1 else 's'}"
                )
        failures = f"{status.failures}/{status.calls}" if status.calls else "-"
        if status.calls:
            failures += f" ({100 * status.failures / status.calls:.0f}%)"
        in_flight = str(status.in_flight)
        if status.probes_in_flight:
            in_flight += f" ({status.probes_in_flight} probes)"
        paused = _until(status.paused_until, at)
        if status.pause_reason:
            paused += f" ({status.pause_reason})"
        rows.append(
            [
                status.policy or "-",
                status.key,
                status.breaker,
                failures,
                _until(status.open_until if status.breaker == "open" else None, at),
                "; ".join(rates) or "-",
                in_flight,
                paused,
            ]
        )
    return _columns(rows)


def _columns(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart (the first row: the headers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _interest(status: KeyStatus) -> tuple[bool, bool, str]:
    """Keys that need an operator first: breakers not closed, then pauses."""
    return (status.breaker == "closed", status.paused_until is None, status.key)


def _statuses(
    store: Store, keys: tuple[str, ...], match: str, policy: str | None, limit: int
) -> list[KeyStatus]:
    names = list(keys) if keys else list(itertools.islice(store.keys(match), _SCAN_LIMIT))
    statuses = [store.status(key) for key in names]
    if policy is not None:
        statuses = [s for s in statuses if s.policy == policy]
    return sorted(statuses, key=_interest)[:limit]


@main.command()
@click.argument("keys", nargs=-1)
@click.option("--match", default="*", show_default=True, help="Only keys matching this glob.")
@click.option("--policy", default=None, help="Only keys last used by this policy.")
@click.option("--limit", default=100, show_default=True, help="Show at most this many keys.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.option("--watch", "watch", default=None, type=float, help="Refresh every this many seconds.")
@click.option("--times", default=0, hidden=True, help="Stop --watch after this many refreshes (tests).")
@_STORE
@_PREFIX
def status(
    keys: tuple[str, ...],
    match: str,
    policy: str | None,
    limit: int,
    as_json: bool,
    watch: float | None,
    times: int,
    store_url: str,
    prefix: str,
) -> None:
    """Breakers, failure rates, rate schedules, in-flight executions and pauses, as a table.

    Without KEYS, every key with state is found by SCAN over the prefix (open breakers and
    pauses first).
    """
    if watch is not None and not watch > 0:
        raise click.BadParameter(f"expected seconds > 0, got {watch}", param_hint="--watch")
    with _open(store_url, prefix) as store:
        shown = 0
        while True:
            statuses = _statuses(store, keys, match, policy, limit)
            if as_json:
                click.echo(json.dumps([_as_json(s) for s in statuses], indent=2))
            else:
                if watch is not None:
                    click.clear()
                    click.echo(f"{time.strftime('%H:%M:%S')}  every {watch:g}s  {store_url}  ({prefix})")
                click.echo(_table(statuses) if statuses else "no keys with state")
            shown += 1
            if watch is None or shown == times:
                return
            time.sleep(watch)


@main.command()
@click.argument("key")
@_STORE
@_PREFIX
def trip(key: str, store_url: str, prefix: str) -> None:
    """Force KEY's breaker open (FORCED_OPEN) until it is reset."""
    with _open(store_url, prefix) as store:
        store.force(key, "forced_open", policy="cli")
        click.echo(f"{key}: breaker forced open")


@main.command()
@click.argument("key")
@_STORE
@_PREFIX
def reset(key: str, store_url: str, prefix: str) -> None:
    """Close KEY's breaker and clear its counters."""
    with _open(store_url, prefix) as store:
        store.reset(key, policy="cli")
        click.echo(f"{key}: breaker closed, counters cleared")


@main.command()
@click.argument("key")
@click.option("--for", "duration", default="10m", show_default=True, help="How long, e.g. 30s, 10m, 2h.")
@_STORE
@_PREFIX
def pause(key: str, duration: str, store_url: str, prefix: str) -> None:
    """Pause KEY fleet-wide: its tasks are deferred until the pause ends."""
    from .core.units import parse_duration  # noqa: PLC0415

    try:
        seconds = parse_duration("--for", duration, allow_zero=False)
    except LimitpalError as exc:
        raise click.BadParameter(str(exc)) from exc
    with _open(store_url, prefix) as store:
        store.pause(key, seconds, "operator")
        click.echo(f"{key}: paused for {seconds:g}s")


@main.command()
@click.argument("key")
@_STORE
@_PREFIX
def resume(key: str, store_url: str, prefix: str) -> None:
    """End KEY's pause."""
    with _open(store_url, prefix) as store:
        store.resume(key)
        click.echo(f"{key}: resumed")


@main.command()
@click.argument("key")
@click.argument("rate", required=False)
@click.option("--burst", default=1, show_default=True, type=click.IntRange(min=1), help="Burst at that rate.")
@click.option("--for", "duration", default="1h", show_default=True, help="How long, e.g. 30s, 10m, 2h.")
@click.option("--permanent", is_flag=True, help="Keep it until lifted with --clear.")
@click.option("--clear", is_flag=True, help="Lift the override: the policy's own rate applies again.")
@click.option("--limit", "limit_id", default=None, help="Which limit of KEY (see status), if it has several.")
@_STORE
@_PREFIX
def override(
    key: str,
    rate: str | None,
    burst: int,
    duration: str,
    permanent: bool,
    clear: bool,
    limit_id: str | None,
    store_url: str,
    prefix: str,
) -> None:
    """Run KEY's rate limit at RATE (e.g. 20/s, 300/m) fleet-wide, without a restart.

    The override expires after --for (default 1h) unless --permanent; --clear lifts it.
    """
    from .core.units import Rate, parse_duration  # noqa: PLC0415

    if clear == (rate is not None):
        raise click.UsageError("give RATE, or --clear (not both)")
    try:
        parsed = None if rate is None else Rate.parse(rate, "RATE")
        seconds = None if permanent or clear else parse_duration("--for", duration, allow_zero=False)
    except LimitpalError as exc:
        raise click.BadParameter(str(exc)) from exc
    with _open(store_url, prefix) as store:
        status = store.status(key)
        known = sorted({*status.rates, *status.overrides})
        if limit_id is None:
            if len(known) != 1:
                hint = ", ".join(known) if known else "none yet (no task has used it)"
                raise click.UsageError(f"{key} has limits: {hint}; pick one with --limit")
            limit_id = known[0]
        store.override(key, limit_id, parsed, burst, seconds)
        if parsed is None:
            click.echo(f"{key}: override of {_limit_text(limit_id)} lifted")
        else:
            until = "until lifted" if seconds is None else f"for {seconds:g}s"
            click.echo(f"{key}: {_limit_text(limit_id)} now runs at {rate} burst {burst}, {until}")


_PARKS = click.option(
    "--park",
    "parks",
    multiple=True,
    default=("celery", "dramatiq"),
    show_default=True,
    help="Which park (limitpal_park_name; repeat for several).",
)


@main.group()
def parked() -> None:
    """Deferred tasks waiting in the store (DeferPolicy(transport="park"))."""


@parked.command("list")
@_PARKS
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@_STORE
@_PREFIX
def parked_list(parks: tuple[str, ...], as_json: bool, store_url: str, prefix: str) -> None:
    """Parked tasks per key: how many, and when the next one is due."""
    with _open(store_url, prefix) as store:
        rows = [(name, summary) for name in parks for summary in store.parked(name)]
    now = time.time()
    if as_json:
        click.echo(
            json.dumps(
                [{"park": n, "key": s.key, "count": s.count, "next_due": s.next_due} for n, s in rows],
                indent=2,
            )
        )
        return
    if not rows:
        click.echo("nothing parked")
        return
    table = [["PARK", "KEY", "PARKED", "NEXT DUE"]]
    table += [[n, s.key, str(s.count), _until(s.next_due, now)] for n, s in rows]
    click.echo(_columns(table))


@parked.command("release")
@click.argument("key")
@_PARKS
@_STORE
@_PREFIX
def parked_release(key: str, parks: tuple[str, ...], store_url: str, prefix: str) -> None:
    """Make KEY's parked tasks due now (the releasers still pace them at the key's rate)."""
    with _open(store_url, prefix) as store:
        count = sum(store.release_parked(name, key) for name in parks)
    click.echo(f"{key}: {count} parked tasks due now")


@parked.command("purge")
@click.argument("key", required=False)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_PARKS
@_STORE
@_PREFIX
def parked_purge(key: str | None, yes: bool, parks: tuple[str, ...], store_url: str, prefix: str) -> None:
    """Delete KEY's parked tasks (every key's without KEY): they will not run."""
    if not yes:
        click.confirm(f"Delete the parked tasks of {key or 'every key'}? They will not run.", abort=True)
    with _open(store_url, prefix) as store:
        count = sum(store.purge_parked(name, key) for name in parks)
    click.echo(f"deleted {count} parked tasks")


@main.group()
def dead() -> None:
    """Dead letters: tasks that exhausted their attempts, deferrals or deadline."""


@dead.command("list")
@click.option("--limit", default=50, show_default=True)
@_STORE
@_PREFIX
def dead_list(limit: int, store_url: str, prefix: str) -> None:
    """The newest dead letters, one line each."""
    with _open(store_url, prefix) as store:
        for letter in store.list_dead(limit):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.dead_at))
            click.echo(
                f"{letter.id}  {when}  {letter.task_name}  [{letter.policy}] {letter.key}  {letter.reason}"
            )


@dead.command("show")
@click.argument("letter_id")
@_STORE
@_PREFIX
def dead_show(letter_id: str, store_url: str, prefix: str) -> None:
    """One dead letter, whole, as JSON."""
    with _open(store_url, prefix) as store:
        for letter in store.list_dead(10_000):
            if letter.id == letter_id:
                click.echo(json.dumps(json.loads(letter.to_json()), indent=2, sort_keys=True))
                return
    raise click.ClickException(f"no dead letter {letter_id!r}")


@dead.command("replay")
@click.argument("letter_id")
@click.option("--celery-app", "celery_app", default=None, help="The Celery app, as module:attribute.")
@click.option(
    "--dramatiq-broker",
    "dramatiq_broker",
    default=None,
    help="The module declaring the actors, and its broker as module:attribute (default attribute: broker).",
)
@_STORE
@_PREFIX
def dead_replay(
    letter_id: str, celery_app: str | None, dramatiq_broker: str | None, store_url: str, prefix: str
) -> None:
    """Publish a dead-lettered task again, once, with its counters reset."""
    own_app = click.get_current_context().find_root().obj  # the app, under `celery -A proj limitpal`
    if celery_app is not None and dramatiq_broker is not None:
        raise click.UsageError("give --celery-app or --dramatiq-broker, not both")
    if celery_app is None and dramatiq_broker is None and own_app is None:
        raise click.UsageError("give --celery-app or --dramatiq-broker")
    if dramatiq_broker is None:
        from .integrations.celery import replay as replay_celery  # noqa: PLC0415 - an optional extra

        app = own_app if celery_app is None else _load_object(celery_app, "app", "--celery-app")

        def publish(letter: DeadLetter) -> str:
            return replay_celery(app, letter)
    else:
        from .integrations.dramatiq import replay as replay_dramatiq  # noqa: PLC0415 - an optional extra

        broker = _load_object(str(dramatiq_broker), "broker", "--dramatiq-broker")

        def publish(letter: DeadLetter) -> str:
            return replay_dramatiq(broker, letter)  # type: ignore[arg-type]  # checked by Dramatiq

    with _open(store_url, prefix) as store:
        letter = store.take_dead(letter_id)  # atomic: a second replay finds nothing
        if letter is None:
            raise click.ClickException(f"no dead letter {letter_id!r} (already replayed?)")
        try:
            task_id = publish(letter)
        except Exception:
            store.put_dead(letter)  # not published: keep it for another try
            raise
        click.echo(f"replayed {letter.task_name} {letter.id} as {task_id}")


@dead.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_STORE
@_PREFIX
def dead_purge(yes: bool, store_url: str, prefix: str) -> None:
    """Delete every dead letter."""
    if not yes:
        click.confirm("Delete every dead letter?", abort=True)
    with _open(store_url, prefix) as store:
        click.echo(f"deleted {store.purge_dead()} dead letters")


def _load_object(path: str, default: str, option: str) -> object:
    import importlib  # noqa: PLC0415

    module, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute or default)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"{path!r}: {exc}", param_hint=option) from exc


@main.command()
@click.option("--broker", default=None, help="Celery broker URL (default: embedded, in memory).")
@click.option("--store", default=None, help="State store URL (default: memory://).")
@click.option("--timeout", default=50.0, show_default=True, help="Give up after this many seconds.")
def demo(broker: str | None, store: str | None, timeout: float) -> None:
    """Three tenants, a flaky upstream, and workers that never sleep."""
    from .demo import run_demo  # noqa: PLC0415 - needs celery, an optional extra

    raise SystemExit(run_demo(broker or None, store or None, timeout))


def _defaults(group: click.Group, values: dict[str, Any]) -> dict[str, Any]:
    """A click ``default_map`` giving ``values`` to every command of ``group`` that takes them."""
    out: dict[str, Any] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            given = _defaults(command, values)
        else:
            names = {param.name for param in command.params}
            given = {k: v for k, v in values.items() if k in names}
        if given:  # a command without these options gets no entry (`version` is also a flag)
            out[name] = given
    return out


@click.command(
    "limitpal",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def celery_command(ctx: click.Context, args: tuple[str, ...]) -> None:
    """limitpal-tasks with this app's store: ``celery -A proj limitpal status``."""
    from .integrations._runtime import Settings  # noqa: PLC0415

    app = ctx.obj.app
    try:
        settings = Settings.from_mapping(app.conf)
    except LimitpalError as exc:
        raise click.ClickException(str(exc)) from exc
    defaults = _defaults(main, {"store_url": settings.store_url, "prefix": settings.key_prefix})
    main.main(args=list(args), prog_name="celery limitpal", default_map=defaults, obj=app)
