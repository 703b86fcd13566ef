"""The admin HTTP endpoint as clients see it: routes, methods, status codes, content types, keep-alive."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from nencache.server.server import BackgroundServer
from tests.server.conftest import small_settings


@pytest.fixture(scope="module")
def admin() -> Iterator[BackgroundServer]:
    with BackgroundServer(small_settings()) as server:
        yield server


def request(server: BackgroundServer, method: str, path: str,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    assert server.server is not None and server.server.admin_port
    conn = http.client.HTTPConnection("127.0.0.1", server.server.admin_port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def test_healthz_get_and_head(admin: BackgroundServer) -> None:
    assert request(admin, "GET", "/healthz")[::2] == (200, b"ok\n")
    status, headers, body = request(admin, "HEAD", "/healthz")
    assert (status, body) == (200, b"")


def test_stats_is_json_with_the_server_section(admin: BackgroundServer) -> None:
    status, headers, body = request(admin, "GET", "/stats?pretty=1")
    assert status == 200 and headers["content-type"].startswith("application/json")
    stats = json.loads(body)
    assert stats["server"]["port"] == admin.port and stats["server"]["auth"] is False


def test_metrics_prometheus_text_and_openmetrics_on_request(admin: BackgroundServer) -> None:
    status, headers, body = request(admin, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    assert b"# TYPE nencache_server_hits_total counter" in body
    status, headers, body = request(admin, "GET", "/metrics",
                                    {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_unknown_paths_and_other_methods(admin: BackgroundServer) -> None:
    status, _, body = request(admin, "GET", "/nowhere")
    assert status == 404 and b"/healthz" in body
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = request(admin, method, "/stats")
        assert status == 405 and headers["allow"] == "GET, HEAD", method


def test_oversized_request_is_refused_and_the_endpoint_keeps_serving(admin: BackgroundServer) -> None:
    status, _, _ = request(admin, "GET", "/stats?" + "x" * 20000)
    assert 400 <= status < 500
    status, _, _ = request(admin, "GET", "/healthz", {"X-Big": "y" * 20000})
    assert 400 <= status < 500
    assert request(admin, "GET", "/healthz")[0] == 200


def test_keep_alive_serves_several_requests_on_one_connection(admin: BackgroundServer) -> None:
    assert admin.server is not None and admin.server.admin_port
    conn = http.client.HTTPConnection("127.0.0.1", admin.server.admin_port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/healthz")
            reply = conn.getresponse()
            assert (reply.status, reply.read()) == (200, b"ok\n")
    finally:
        conn.close()


def test_healthz_answers_503_while_stopping() -> None:
    server = BackgroundServer(small_settings()).start()
    try:
        assert server.server is not None
        server.server.stopping = True  # what `stop` sets first, before connections drain
        status, _, body = request(server, "GET", "/healthz")
        assert (status, body) == (503, b"stopping\n")
    finally:
        server.server.stopping = False  # type: ignore[union-attr]
        server.stop()
