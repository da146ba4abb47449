"""Adapters that translate decisions into broker actions (Celery, Dramatiq)."""
