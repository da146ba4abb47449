"""Scenario benchmarks: real Celery and Dramatiq workers against a scripted upstream.

``make scenarios`` (or ``cd benchmarks && python -m scenarios``) runs every scenario for
limitpal_tasks and for the baseline a user would otherwise pick, side by side, and writes
``benchmarks/results/*.json``, PNG plots and the README's "Why" table. See
``scenarios/__main__.py`` for the options and ``scenarios/definitions.py`` for what each
scenario does and measures.
"""
