"""Fixtures of the P2P tests: a Redis index per module, one per test where a test kills it, a peer process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.p2p.util import PeerProcess
from tests.redis_util import RedisServer, redis_server, start_server  # noqa: F401  (module-wide index)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may kill and restart."""
    server = start_server(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def peer() -> Iterator[Callable[..., PeerProcess]]:
    """Start peer processes (`peer(settings)`); they are killed after the test."""
    started: list[PeerProcess] = []

    def start(settings: dict[str, Any]) -> PeerProcess:
        started.append(PeerProcess(settings).start())
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
