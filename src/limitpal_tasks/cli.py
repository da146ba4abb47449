"""The ``limitpal-tasks`` command line: look at and steer breakers, pauses and dead letters.

Every command talks to the store named by ``--store`` (or ``LIMITPAL_STORE_URL``) under
``--prefix`` (or ``LIMITPAL_KEY_PREFIX``), the same settings the workers use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click

from . import __version__
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


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return f"{time.strftime('%H:%M:%S', time.localtime(at))} (in {max(0.0, at - time.time()):.1f}s)"


@click.group()
@click.version_option(__version__, prog_name="limitpal-tasks")
def main() -> None:
    """Inspect and control limitpal_tasks' breakers, pauses and dead letters."""


@main.command()
def version() -> None:
    """Print the installed version."""
    click.echo(__version__)


@main.command()
@click.argument("keys", nargs=-1, required=True)
@_STORE
@_PREFIX
def status(keys: tuple[str, ...], store_url: str, prefix: str) -> None:
    """Breaker state, window counts, in-flight executions, pause and rate schedule of KEYS."""
    with _open(store_url, prefix) as store:
        for key in keys:
            s = store.status(key)
            click.echo(f"{key}")
            click.echo(
                f"  breaker {s.breaker} (generation {s.generation}; open until {_when(s.open_until)}); "
                f"window {s.calls} calls, {s.failures} failures, {s.slow_calls} slow"
            )
            click.echo(f"  in flight {s.in_flight}, probes {s.probes_in_flight}")
            if s.paused_until is not None:
                click.echo(f"  paused until {_when(s.paused_until)} ({s.pause_reason})")
            for limit, tat in sorted(s.rates.items()):
                click.echo(f"  rate {limit}: next free slot {_when(tat)}")


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
@click.option(
    "--celery-app",
    "celery_app",
    required=True,
    help="The Celery app, as module:attribute (e.g. proj.celery:app).",
)
@_STORE
@_PREFIX
def dead_replay(letter_id: str, celery_app: str, store_url: str, prefix: str) -> None:
    """Re-publish a dead-lettered Celery task, once, with its counters reset."""
    from .integrations.celery import replay  # noqa: PLC0415 - needs celery, an optional extra

    app = _load_object(celery_app)
    with _open(store_url, prefix) as store:
        letter = store.take_dead(letter_id)  # atomic: a second replay finds nothing
        if letter is None:
            raise click.ClickException(f"no dead letter {letter_id!r} (already replayed?)")
        task_id = replay(app, letter)
        click.echo(f"replayed {letter.task_name} {letter.id} as task {task_id}")


def _load_object(path: str) -> object:
    import importlib  # noqa: PLC0415

    module, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute or "app")
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"{path!r}: {exc}", param_hint="--celery-app") from exc


@main.command()
@click.option("--broker", default=None, help="Celery broker URL (default: embedded, in memory).")
@click.option("--store", default=None, help="State store URL (default: memory://).")
@click.option("--timeout", default=50.0, show_default=True, help="Give up after this many seconds.")
def demo(broker: str | None, store: str | None, timeout: float) -> None:
    """Three tenants, a flaky upstream, and workers that never sleep."""
    from .demo import run_demo  # noqa: PLC0415 - needs celery, an optional extra

    raise SystemExit(run_demo(broker or None, store or None, timeout))
