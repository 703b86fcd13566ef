"""Fixtures of the server tests: an in-process server (a thread) and one in a child process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nencache.server.server import BackgroundServer
from nencache.server.settings import ServerSettings
from tests.server.util import ServerProcess


def small_settings(**changes: object) -> ServerSettings:
    base: dict[str, object] = dict(port=0, admin_port=0, pool_bytes=64 << 20, max_chunk_bytes=1 << 20,
                                   max_request_bytes=8 << 20, io_timeout=5.0)
    return ServerSettings(**(base | changes))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def local_server() -> Iterator[BackgroundServer]:
    """A server on an event-loop thread of this process (64 MiB pool, 1 MiB pages)."""
    with BackgroundServer(small_settings()) as server:
        yield server


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A factory-configured `nencache serve` child process (started by the test)."""
    proc = ServerProcess(tmp_path, {"cpu_size": "64MiB", "server_max_chunk_bytes": "1MiB",
                                    "server_max_request_bytes": "8MiB"})
    yield proc
    proc.kill()
