"""`FairBudget`: pool pages that connections hold while a frame is on the wire, shared fairly.

A GET reply pins its chunks' pages until the client has read it; a PUT body is received straight into
a page. Left unbounded, a few clients that read or send slowly would pin the whole pool. So these
pages come from budgets with three bounds: the whole budget, a share per client address, and a cap
per connection. Requests that must wait are granted connection by connection in turn (round robin),
not in arrival order, and a request that does not fit its own connection's or address's bound never
holds up the others: a client that does not read its replies only slows itself down.

Used on the event loop thread only.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds pages: a connection (by identity) and its client address."""

    connection: object
    client: str


class FairBudget:
    """`total` pages; a client address holds at most `per_client`, a connection at most `per_connection`."""

    def __init__(self, total: int, per_client: int, per_connection: int) -> None:
        self.total = max(1, total)
        self.per_connection = max(1, min(per_connection, self.total))
        self.per_client = max(self.per_connection, min(per_client, self.total))
        self.free = self.total
        self._by_client: dict[str, int] = {}
        self._by_connection: dict[object, int] = {}
        self._waiting: OrderedDict[object, deque[tuple[Holder, int, asyncio.Future[None]]]] = OrderedDict()

    def held_by(self, client: str) -> int:
        return self._by_client.get(client, 0)

    async def take(self, holder: Holder, pages: int, timeout: float | None = None) -> bool:
        """Wait (at most `timeout` seconds) for `pages` (at most `per_connection`); False if not granted."""
        pages = min(pages, self.per_connection)
        if not self._waiting and self._fits(holder, pages):
            self._grant(holder, pages)
            return True
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(holder.connection, deque()).append((holder, pages, granted))
        self._serve()
        try:
            async with asyncio.timeout(timeout):
                await granted
        except TimeoutError:
            self._undo(holder, pages, granted)
            return False
        except asyncio.CancelledError:
            self._undo(holder, pages, granted)
            raise
        return True

    def give(self, holder: Holder, pages: int) -> None:
        """Return pages taken with `take`; waiting connections are served in turn."""
        pages = min(pages, self.per_connection)
        self.free += pages
        self._count(holder, -pages)
        self._serve()

    def forget(self, connection: object) -> None:
        """A connection ends: its waiting requests fail with `ConnectionAbortedError`."""
        for _, _, granted in self._waiting.pop(connection, ()):
            if not granted.done():
                granted.set_exception(ConnectionAbortedError("the connection closed"))

    # --- internals -------------------------------------------------------------------------------
    def _fits(self, holder: Holder, pages: int) -> bool:
        return (pages <= self.free
                and self._by_connection.get(holder.connection, 0) + pages <= self.per_connection
                and self._by_client.get(holder.client, 0) + pages <= self.per_client)

    def _grant(self, holder: Holder, pages: int) -> None:
        self.free -= pages
        self._count(holder, pages)

    def _count(self, holder: Holder, pages: int) -> None:
        for table, name in ((self._by_client, holder.client), (self._by_connection, holder.connection)):
            left = table.get(name, 0) + pages
            if left:
                table[name] = left
            else:
                table.pop(name, None)

    def _serve(self) -> None:
        """Grant the first request of each waiting connection in turn while any fits."""
        progress = True
        while progress and self._waiting and self.free:
            progress = False
            for connection in list(self._waiting):
                queue = self._waiting[connection]
                while queue and queue[0][2].done():  # cancelled while waiting
                    queue.popleft()
                if not queue:
                    del self._waiting[connection]
                    continue
                holder, pages, granted = queue[0]
                if self._fits(holder, pages):
                    queue.popleft()
                    self._grant(holder, pages)
                    granted.set_result(None)
                    self._waiting.move_to_end(connection)  # its next request waits for the others' turn
                    if not queue:
                        del self._waiting[connection]
                    progress = True

    def _undo(self, holder: Holder, pages: int, granted: asyncio.Future[None]) -> None:
        """A wait ended without its pages being used: give them back if granted meanwhile, else stop waiting."""
        if granted.done() and not granted.cancelled() and granted.exception() is None:
            self.give(holder, pages)
            return
        queue = self._waiting.get(holder.connection)
        if queue is None:
            return
        for item in list(queue):
            if item[2] is granted:
                queue.remove(item)
        if not queue:
            del self._waiting[holder.connection]
