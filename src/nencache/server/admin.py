"""The admin HTTP endpoint (`/healthz`, `/metrics`, `/stats`) and the `nencache stats` client side.

Served by aiohttp (request parsing, keep-alive, limits and timeouts are its job, not ours): GET and
HEAD only. `/metrics` is Prometheus text through prometheus_client's aiohttp exposition (OpenMetrics
when the scraper's `Accept` asks for it); `/stats` is the same figures as JSON.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from functools import partial
from typing import TYPE_CHECKING, Any

from nencache.errors import ConfigError, NenCacheError
from nencache.server.host import Host
from nencache.server.metrics import Collector

if TYPE_CHECKING:
    from aiohttp import web

_MAX_REQUEST_LINE = 8190  # aiohttp's own default; longer request lines or headers are answered 400
_SHUTDOWN_GRACE = 1.0  # seconds an admin request in flight may take to finish at shutdown


class AdminEndpoint:
    """The running admin HTTP server: its port, and `close` for shutdown."""

    __slots__ = ("port", "_runner")

    def __init__(self, port: int, runner: web.AppRunner) -> None:
        self.port, self._runner = port, runner

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_admin(host_state: Host, host: str, port: int) -> AdminEndpoint:
    """Listen for admin requests on `host:port` (0: any free port); raise OSError if it cannot bind."""
    try:
        from aiohttp import web
    except ImportError:
        raise ConfigError("the admin endpoint needs aiohttp: pip install 'nencache[server]', or pass "
                          "--admin-port -1 (server_admin_port = -1) to run without it") from None
    app = web.Application(handler_args={"max_line_size": _MAX_REQUEST_LINE, "max_field_size": _MAX_REQUEST_LINE})
    app.router.add_get("/healthz", partial(_healthz, host_state))
    app.router.add_get("/stats", partial(_stats, host_state))
    app.router.add_get("/metrics", _metrics_handler(host_state))
    app.router.add_route("*", "/{tail:.*}", _elsewhere)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_GRACE)
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family)
    except OSError:
        await runner.cleanup()
        raise
    site = web.SockSite(runner, listener)
    await site.start()
    return AdminEndpoint(listener.getsockname()[1], runner)


async def _healthz(host_state: Host, _: web.Request) -> web.Response:
    from aiohttp import web

    if host_state.stopping:
        return web.Response(status=503, text="stopping\n")
    return web.Response(text="ok\n")


async def _stats(host_state: Host, _: web.Request) -> web.Response:
    from aiohttp import web

    return web.Response(body=json.dumps(host_state.stats(), indent=1).encode() + b"\n",
                        content_type="application/json")


def _metrics_handler(host_state: Host) -> Any:
    """prometheus_client's aiohttp handler over this server's collector (503 if prometheus_client is missing)."""
    from aiohttp import web

    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.aiohttp import make_aiohttp_handler
    except ImportError:
        async def missing(_: web.Request) -> web.Response:
            return web.Response(status=503, text="pip install prometheus_client (nencache[server])\n")

        return missing
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(host_state.counters, host_state.store.stats))
    return make_aiohttp_handler(registry)


async def _elsewhere(request: web.Request) -> web.Response:
    from aiohttp import web

    if request.method not in ("GET", "HEAD"):
        return web.Response(status=405, text="only GET is served here\n", headers={"Allow": "GET, HEAD"})
    return web.Response(status=404, text="try /healthz, /metrics or /stats\n")


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
