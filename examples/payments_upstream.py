"""A simulated payments API and webhook receivers, on loopback, with the standard library only.

Both payments examples (``celery_payments.py``, ``dramatiq_payments.py``) call it over HTTP;
they start one in a thread unless given ``--upstream URL``. On its own::

    python examples/payments_upstream.py --port 8765 --quota acme=20 --receiver-limit globex=2

Endpoints (JSON in and out):

- ``GET /health`` — 200 ``{"healthy": true}``, or 503 while the payments API is down;
- ``POST /charges`` ``{"tenant_id", "charge_id", "amount"}`` — 200 ``{"charge_id", "duplicate"}``
  (charges are idempotent by ``charge_id``); 503 *without* ``Retry-After`` while the API is
  down (an outage: nobody knows when it ends); 429 with ``Retry-After`` when the tenant is
  over its quota (``--quota TENANT=N``: N calls in any second);
- ``POST /webhooks/<tenant_id>`` ``{"event_id", ...}`` — 204 when the tenant's receiver
  accepts it; 429 with ``Retry-After`` over the receiver's limit (``--receiver-limit``);
  503 with ``Retry-After`` during its maintenance window (``--maintenance TENANT=SECONDS``,
  starting at the receiver's first request);
- ``GET /stats`` — what was received: per tenant, charges applied (with the time of each),
  webhooks delivered, and every refused request by status;
- ``POST /admin`` — reconfigure: ``{"reset": true}`` clears the stats and maintenance
  windows, ``{"down_for": 2.0}`` takes the payments API down for that long from now,
  ``{"healthy": false}`` until ``{"healthy": true}``, ``{"quota": {...}}``,
  ``{"receiver_limits": {...}}``, ``{"maintenance": {...}}`` replace those settings.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Upstream", "UpstreamConfig", "main", "serve_in_thread"]

DEFAULT_QUOTA = 20.0  # charges per second per tenant the API accepts, unless configured


@dataclass
class UpstreamConfig:
    """How the simulated upstream behaves; every field can be changed at run time (``POST /admin``)."""

    quota: dict[str, float] = field(default_factory=dict)
    """Charges per second per tenant (``"*"``: every other tenant; default 20)."""
    receiver_limits: dict[str, float] = field(default_factory=lambda: {"globex": 2.0})
    """Webhooks per second each tenant's receiver accepts (none: unlimited)."""
    maintenance: dict[str, float] = field(default_factory=lambda: {"initech": 3.0})
    """Seconds a tenant's receiver answers 503 + Retry-After, from its first request."""
    healthy: bool = True
    """Whether the payments API answers at all (``False``: 503 to every charge)."""


class _Window:
    """Timestamps of accepted calls in the last second, per name."""

    def __init__(self) -> None:
        self._calls: dict[str, deque[float]] = defaultdict(deque)

    def admit(self, name: str, limit: float, now: float) -> float | None:
        """``None`` when a call conforms (and counts it), else the seconds until one would."""
        calls = self._calls[name]
        while calls and calls[0] <= now - 1.0:
            calls.popleft()
        if len(calls) >= limit:
            return max(0.001, calls[0] + 1.0 - now)
        calls.append(now)
        return None


class Upstream:
    """The state behind the HTTP handlers (thread-safe: one lock, short critical sections)."""

    def __init__(self, config: UpstreamConfig | None = None) -> None:
        self.config = config or UpstreamConfig()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._reset()

    def _reset(self) -> None:
        self._charges: dict[str, dict[str, Any]] = {}
        self._webhooks: dict[str, set[str]] = defaultdict(set)
        self._refused: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._quota_window = _Window()
        self._receiver_window = _Window()
        self._maintenance_started: dict[str, float] = {}

    # -- behaviour ------------------------------------------------------------------

    def healthy(self, now: float) -> bool:
        return self.config.healthy and now >= self._down_until

    def charge(self, body: Mapping[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        tenant, charge_id = str(body.get("tenant_id", "")), str(body.get("charge_id", ""))
        if not tenant or not charge_id:
            return 400, {}, {"error": "tenant_id and charge_id are required"}
        now = time.time()
        with self._lock:
            if not self.healthy(now):
                self._refused[tenant]["charges 503"] += 1
                return 503, {}, {"error": "payments API unavailable"}
            if charge_id in self._charges:
                return 200, {}, {"charge_id": charge_id, "duplicate": True}
            limit = self.config.quota.get(tenant, self.config.quota.get("*", DEFAULT_QUOTA))
            wait = self._quota_window.admit(tenant, limit, now)
            if wait is not None:
                self._refused[tenant]["charges 429"] += 1
                return 429, {"Retry-After": _seconds(wait)}, {"error": f"quota of {limit:g}/s exceeded"}
            self._charges[charge_id] = {"tenant_id": tenant, "amount": body.get("amount"), "at": now}
        return 200, {}, {"charge_id": charge_id, "duplicate": False}

    def webhook(self, tenant: str, body: Mapping[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        event_id = str(body.get("event_id", ""))
        if not event_id:
            return 400, {}, {"error": "event_id is required"}
        now = time.time()
        with self._lock:
            window = self.config.maintenance.get(tenant)
            if window is not None:
                started = self._maintenance_started.setdefault(tenant, now)
                if now < started + window:
                    self._refused[tenant]["webhooks 503"] += 1
                    return 503, {"Retry-After": _seconds(started + window - now)}, {"error": "maintenance"}
            limit = self.config.receiver_limits.get(tenant)
            if limit is not None:
                wait = self._receiver_window.admit(tenant, limit, now)
                if wait is not None:
                    self._refused[tenant]["webhooks 429"] += 1
                    return 429, {"Retry-After": _seconds(wait)}, {"error": "slow down"}
            self._webhooks[tenant].add(event_id)
        return 204, {}, {}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            charged = {c["tenant_id"] for c in self._charges.values()}
            tenants = sorted(charged | set(self._webhooks) | set(self._refused))
            return {
                "healthy": self.healthy(time.time()),
                "tenants": {
                    tenant: {
                        "charges": {
                            cid: c["at"] for cid, c in self._charges.items() if c["tenant_id"] == tenant
                        },
                        "webhooks": sorted(self._webhooks.get(tenant, ())),
                        "refused": dict(self._refused.get(tenant, {})),
                    }
                    for tenant in tenants
                },
            }

    def admin(self, body: Mapping[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        with self._lock:
            if body.get("reset"):
                self._reset()
                self._down_until = 0.0
            if "down_for" in body:
                self._down_until = time.time() + float(body["down_for"])
            if "healthy" in body:
                self.config.healthy = bool(body["healthy"])
            for name in ("quota", "receiver_limits", "maintenance"):
                if name in body:
                    setattr(self.config, name, {str(k): float(v) for k, v in dict(body[name]).items()})
        return 200, {}, {"ok": True}


def _seconds(value: float) -> str:
    """A ``Retry-After`` value: whole seconds (as HTTP says), at least 1."""
    return str(max(1, math.ceil(value)))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _reply(self, status: int, headers: Mapping[str, str], body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode() if status != 204 else b""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            data = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def do_GET(self) -> None:
        upstream = self.server.upstream
        if self.path == "/health":
            ok = upstream.healthy(time.time())
            self._reply(200 if ok else 503, {}, {"healthy": ok})
        elif self.path == "/stats":
            self._reply(200, {}, upstream.stats())
        else:
            self._reply(404, {}, {"error": "not found"})

    def do_POST(self) -> None:
        upstream = self.server.upstream
        body = self._body()
        if self.path == "/charges":
            self._reply(*upstream.charge(body))
        elif self.path.startswith("/webhooks/") and len(self.path) > len("/webhooks/"):
            self._reply(*upstream.webhook(self.path.removeprefix("/webhooks/"), body))
        elif self.path == "/admin":
            self._reply(*upstream.admin(body))
        else:
            self._reply(404, {}, {"error": "not found"})

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request log line per call would drown the examples' output."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], upstream: Upstream) -> None:
        super().__init__(address, _Handler)
        self.upstream = upstream


@contextmanager
def serve_in_thread(
    config: UpstreamConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve the upstream in a background thread; yields its base URL (port 0: any free port)."""
    server = _Server((host, port), Upstream(config))
    thread = threading.Thread(target=server.serve_forever, name="upstream", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _pairs(option: str, values: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for value in values:
        name, _, number = value.partition("=")
        try:
            out[name] = float(number)
        except ValueError:
            raise SystemExit(f"{option}: expected NAME=NUMBER, got {value!r}") from None
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="A simulated payments API and webhook receivers (see the module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback)")
    parser.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    parser.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="TENANT=N",
        help=f"charges per second TENANT may make ('*' for every tenant; default {DEFAULT_QUOTA:g})",
    )
    parser.add_argument(
        "--receiver-limit",
        action="append",
        default=[],
        metavar="TENANT=N",
        help="webhooks per second TENANT's receiver accepts (default: globex=2)",
    )
    parser.add_argument(
        "--maintenance",
        action="append",
        default=[],
        metavar="TENANT=SECONDS",
        help="TENANT's receiver answers 503 + Retry-After this long after its first request "
        "(default: initech=3)",
    )
    args = parser.parse_args(argv)
    config = UpstreamConfig(quota=_pairs("--quota", args.quota))
    if args.receiver_limit:
        config.receiver_limits = _pairs("--receiver-limit", args.receiver_limit)
    if args.maintenance:
        config.maintenance = _pairs("--maintenance", args.maintenance)
    server = _Server((args.host, args.port), Upstream(config))
    print(f"upstream listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
