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
