"""Integration tests: real Celery workers against real Redis and RabbitMQ servers."""
