"""`Host`: what a connection and the admin endpoint use of the server that runs them.

Declared as a Protocol so that `connection.py` and `admin.py` depend on this small surface and not on
`server.py` (which imports them): the server's modules then import one way, with no cycle.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Protocol

from nencache.server.budget import FairBudget
from nencache.server.metrics import ServerCounters
from nencache.server.settings import ServerSettings
from nencache.server.store import ChunkStore


class Host(Protocol):
    """The server state a connection or the admin endpoint reads."""

    settings: ServerSettings
    store: ChunkStore
    counters: ServerCounters
    token: bytes | None  # the auth token, None when the server takes none
    stopping: bool  # set at shutdown: connections finish their frame, /healthz answers 503
    replies: FairBudget  # pages of replies on the wire, shared fairly among client addresses
    bodies: FairBudget  # pages of PUT bodies being received
    executor: Executor  # the threads that run store calls off the event loop

    def stats(self) -> dict[str, Any]:
        """The counters and store figures as plain JSON-able values (`/stats`, STATS)."""
        ...
