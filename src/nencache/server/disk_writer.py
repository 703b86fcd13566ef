"""The server's disk writes: chunks it received, written down to their namespace's disk tier behind the replies.

The queue is the shared `WriteBehind` (`nencache.writer`), and as for `KVCache` it is the pool:
each pending write pins its page, nothing else bounds them, and no disk write is given up while the
pool has a page for the next chunk. A PUT never waits for the disk: when every page is pinned, the
policy (`write_drop`) at once gives up the oldest pending disk write (the chunk stays in memory; the
default) or refuses the new chunk with BUSY (`newest`). What never reached the disk is counted
(`dropped`; `errors` for writes the disk did not take).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nencache.tiers.base import Tier
from nencache.tiers.memory import ChunkLease
from nencache.writer import Drop, WriteBehind, WritePolicy, put_counted

log = logging.getLogger("nencache.server")


@dataclass(slots=True)
class DiskWrite:
    """One chunk to write: its namespace's disk tier, its key, and its pinned page (`view`: the blob)."""

    tier: Tier
    key: bytes
    lease: ChunkLease
    view: Any

    def release(self) -> None:
        self.lease.release()


def disk_writer(drop: str) -> WriteBehind[DiskWrite]:
    """A write-behind that never makes a PUT wait (no backpressure): when full, `drop` gives a write up."""
    return WriteBehind(write_to_disk, WritePolicy(0.0, Drop(drop)), name="nencache-server-disk")


def write_to_disk(batch: list[DiskWrite]) -> int:
    """Write `batch`, one `put` per disk tier; how many chunks a tier did not take."""
    by_tier: dict[int, list[DiskWrite]] = {}
    for item in batch:
        by_tier.setdefault(id(item.tier), []).append(item)
    return sum(put_counted(items[0].tier, [(item.key, item.view) for item in items], _log_failure)
               for items in by_tier.values())


def _log_failure(tier: Tier, exc: BaseException) -> None:
    """A full or failing disk loses only its copy; memory still holds the chunk."""
    log.warning("disk tier write failed: %r", exc)
