"""The admin HTTP endpoint (`/healthz`, `/metrics`, `/stats`) and the `nencache stats` client side.

A small asyncio HTTP/1.0 handler: GET only, one request per connection, bounded request size and
time. `/metrics` is Prometheus text (prometheus_client renders it); `/stats` is the same as JSON.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from nencache.errors import ConfigError, NenCacheError
from nencache.server.metrics import Collector

if TYPE_CHECKING:
    from nencache.server.server import NenCacheServer

_MAX_REQUEST = 8192
_TIMEOUT = 5.0


async def start_admin(server: NenCacheServer, host: str, port: int) -> asyncio.AbstractServer:
    """Listen for admin requests on `host:port` (0: any free port)."""
    registry = None
    try:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(server.counters, server.store.stats))
    except ImportError:
        pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, kind, body = route(head, server, registry)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            status, kind, body = "400 Bad Request", "text/plain", b"bad request\n"
        try:
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            async with asyncio.timeout(_TIMEOUT):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST)


def route(head: bytes, server: NenCacheServer, registry: Any) -> tuple[str, str, bytes]:
    """Status line, content type and body for one request head."""
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
        return "405 Method Not Allowed", "text/plain", b"only GET is served here\n"
    path = parts[1].split(b"?", 1)[0]
    if path == b"/healthz":
        return ("503 Service Unavailable", "text/plain", b"stopping\n") if server.stopping else \
            ("200 OK", "text/plain", b"ok\n")
    if path == b"/stats":
        return "200 OK", "application/json", json.dumps(server.stats(), indent=1).encode() + b"\n"
    if path == b"/metrics":
        if registry is None:
            return "503 Service Unavailable", "text/plain", b"pip install prometheus_client (nencache[server])\n"
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
    return "404 Not Found", "text/plain", b"try /healthz, /metrics or /stats\n"


def fetch_stats(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET `<url>/stats` from a server's admin endpoint."""
    target = url.rstrip("/")
    if not target.startswith(("http://", "https://")):
        raise ConfigError(f"--url {url!r}: give the admin endpoint as http://HOST:PORT")
    if not target.endswith("/stats"):
        target += "/stats"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as reply:
            return json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise NenCacheError(f"cannot read {target} ({exc}); is `nencache serve` running with that admin "
                            "port?") from None


def format_stats(data: dict[str, Any]) -> str:
    """The stats as a two-column table, nested keys joined with dots."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            rows.append((prefix, _human(prefix, value)))

    walk("", data)
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _human(name: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and name.endswith("bytes") and value >= 2**20:
        return f"{value} ({value / 2**30:.3g} GiB)"
    return str(value)
