"""The ``limitpal-tasks`` command line."""

from __future__ import annotations

import click

from . import __version__


@click.group()
@click.version_option(__version__, prog_name="limitpal-tasks")
def main() -> None:
    """Inspect and control limitpal_tasks' breakers, budgets and dead letters."""


@main.command()
def version() -> None:
    """Print the installed version."""
    click.echo(__version__)


@main.command()
@click.option("--broker", default=None, help="Celery broker URL (default: embedded, in memory).")
@click.option("--store", default=None, help="State store URL (default: memory://).")
@click.option("--timeout", default=50.0, show_default=True, help="Give up after this many seconds.")
def demo(broker: str | None, store: str | None, timeout: float) -> None:
    """Three tenants, a flaky upstream, and workers that never sleep."""
    from .demo import run_demo  # noqa: PLC0415 - needs celery, an optional extra

    raise SystemExit(run_demo(broker or None, store or None, timeout))
