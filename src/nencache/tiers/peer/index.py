"""`PeerIndex`: which peers hold which chunks of one namespace, kept in Redis (or Valkey).

One sorted set per chunk key, `<key_prefix>:p2p:<namespace>:` + the 16-byte key. Its members are
peer addresses (`host:port`), each scored with the wall-clock time (ms) its entry expires; the set
itself expires `ttl` after its last publish, so a dead peer's entries vanish even if nobody cleans
up. Beside it, a hash (the same key + `:at`) maps a holder whose pool is shared to where the chunk
sits in it (a packed `nencache.net.shared.Placement`), so a peer on the same machine copies the chunk
without asking the holder first; it expires with the sorted set, and a holder's field is only read
while the holder is listed. Publishing, unpublishing and looking up holders are each one redis-py
pipeline (per node, for a cluster, where redis-py follows MOVED/ASK and failovers), except lookups on a
single server: they run on a bare connection of the Redis tier's RESP client, which after other work
costs half of redis-py's round trip (benchmarks/RESULTS.md, "p2p: the index lookup on a bare RESP
connection"). Each publish and unpublish also PUBLISHes an announcement
(`nencache.tiers.peer.announce`) on the namespace's channel, which peers' mirrors follow
(`nencache.tiers.peer.mirror`). Failures raise `ControlError` (an `OSError`); `PeerTier` turns them into misses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nencache.errors import ConfigError
from nencache.tiers.peer.announce import Announcement
from nencache.tiers.redis.control import ControlError, ControlReplyError, RedisControl, Subscription
from nencache.tiers.redis.resp import ConnectionPool, ReplyError
from nencache.tiers.redis.url import parse_url

log = logging.getLogger("nencache.p2p")
BATCH_KEYS = 2048  # keys per pipeline when publishing many


@dataclass(frozen=True, slots=True)
class Holder:
    """A peer that holds a chunk, and where the chunk sits in its shared pool (None: not published)."""

    address: str
    placement: bytes | None = None


class PeerIndex:
    """The chunk -> holders index of one namespace. Thread-safe."""

    def __init__(self, url: str, namespace: str, *, ttl: float, timeout: float,
                 key_prefix: str = "nencache") -> None:
        if not ttl > 0:
            raise ConfigError(f"p2p_ttl must be > 0 seconds, got {ttl}")
        if not timeout > 0:
            raise ConfigError(f"the P2P index timeout must be > 0 seconds, got {timeout}")
        try:
            target = parse_url(url)
        except ConfigError as exc:
            raise ConfigError(f"p2p_index_url: {exc}") from None
        self.url = target.display()
        self._control = RedisControl(target, timeout)
        # A single server's lookups skip redis-py (see the module docstring); a cluster's need its routing.
        self._bare = None if target.cluster else ConnectionPool(target, timeout, max_idle=4)
        self._node = target.nodes[0]
        self.ttl_ms = max(1, math.ceil(ttl * 1000))
        self._prefix = f"{key_prefix}:p2p:{namespace}:".encode()
        self.channel = self._prefix + b"announce"  # pub/sub: every publish and unpublish, for peers' mirrors
        self.announce_failures = 0  # announcements Redis refused (no pub/sub allowed): see `_run_announced`

    def rkey(self, key: bytes) -> bytes:
        """The Redis key of a chunk key's holder set."""
        return self._prefix + bytes(key)

    def publish(self, keys: Sequence[bytes], peer: str, placements: Sequence[bytes | None] | None = None) -> None:
        """Record `peer` as a holder of `keys` for the next `ttl` (expired holders are pruned on the way), with
        where each sits in its shared pool (`placements`, None where it does not say: any older one is dropped)."""
        now = _now_ms()
        for start in range(0, len(keys), BATCH_KEYS):
            commands: list[tuple[Any, ...]] = []
            for i in range(start, min(start + BATCH_KEYS, len(keys))):
                rkey, placement = self.rkey(keys[i]), placements[i] if placements is not None else None
                commands += [("ZADD", rkey, now + self.ttl_ms, peer), ("ZREMRANGEBYSCORE", rkey, "-inf", now),
                             ("PEXPIRE", rkey, self.ttl_ms)]
                if placement is None:
                    commands.append(("HDEL", rkey + b":at", peer))
                else:
                    commands += [("HSET", rkey + b":at", peer, placement), ("PEXPIRE", rkey + b":at", self.ttl_ms)]
            batch = keys[start : start + BATCH_KEYS]
            batch_placements = placements[start : start + BATCH_KEYS] if placements is not None else [None] * len(batch)
            commands.append(("PUBLISH", self.channel,
                             Announcement(peer, True, now + self.ttl_ms, batch, batch_placements).pack()))
            self._run_announced(commands)

    def unpublish(self, keys: Sequence[bytes], peer: str) -> None:
        """Remove `peer` from the holders of `keys`."""
        for start in range(0, len(keys), BATCH_KEYS):
            commands: list[tuple[Any, ...]] = []
            batch = keys[start : start + BATCH_KEYS]
            for key in batch:
                commands += [("ZREM", self.rkey(key), peer), ("HDEL", self.rkey(key) + b":at", peer)]
            commands.append(("PUBLISH", self.channel, Announcement(peer, False, 0, batch, [None] * len(batch)).pack()))
            self._run_announced(commands)

    def _run_announced(self, commands: list[tuple[Any, ...]]) -> None:
        """Run index changes whose last command is their announcement. A refused announcement (a Redis whose
        ACL or configuration allows no pub/sub) is counted and logged once: the index itself is updated,
        and peers' mirrors fall back to asking it."""
        replies = self._control.pipeline(commands)
        _raise_errors(replies[:-1])
        if isinstance(replies[-1], ControlError):
            self.announce_failures += 1
            if self.announce_failures == 1:
                log.warning("the P2P index %s refused an announcement (%s); peers will ask the index for every "
                            "lookup instead of their mirror (allow PUBLISH and SUBSCRIBE on %r to use it)",
                            self.url, replies[-1], self.channel.decode("utf-8", "replace"))

    def lookup(self, keys: Sequence[bytes]) -> list[list[Holder]]:
        """The live holders of each key, most recently published first, with their placements: one round trip."""
        if not keys:
            return []
        now = _now_ms()
        commands: list[tuple[Any, ...]] = []
        for key in keys:
            commands += [("ZREVRANGEBYSCORE", self.rkey(key), "+inf", f"({now}"), ("HGETALL", self.rkey(key) + b":at")]
        replies = self._lookup_replies(commands)
        out: list[list[Holder]] = []
        for members, placed in zip(replies[::2], replies[1::2]):
            if isinstance(placed, list):  # HGETALL over RESP2: field, value, field, value, ...
                placed = {bytes(k): v for k, v in zip(placed[::2], placed[1::2])}
            at = {bytes(k): bytes(v) for k, v in placed.items()} if isinstance(placed, dict) else {}
            out.append([Holder(bytes(m).decode("utf-8", "replace"), at.get(bytes(m)))
                        for m in (members if isinstance(members, list) else [])])
        return out

    def _lookup_replies(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of a lookup's commands, in one round trip; `ControlError` on any failure."""
        if self._bare is None:
            return _raise_errors(self._control.pipeline(commands))
        try:
            conn = self._bare.acquire(self._node)
        except ReplyError as exc:  # AUTH or SELECT refused
            raise ControlReplyError(f"{exc}; check the user, password and database in the Redis URL", exc.code) from exc
        except OSError as exc:
            raise ControlError(str(exc) or type(exc).__name__) from exc
        try:
            conn.send(commands)
            replies = conn.read(len(commands))
        except OSError as exc:
            conn.close()
            raise ControlError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            conn.close()
            raise
        self._bare.release(conn)
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise ControlReplyError(str(reply), reply.code)
        return replies

    def subscribe(self) -> Subscription:
        """The announcements of this namespace's publishes and unpublishes from now on (`IndexMirror`)."""
        return self._control.subscribe(self.channel)

    def holders(self, keys: Sequence[bytes]) -> list[list[str]]:
        """The addresses of the live holders of each key, most recently published first: one round trip."""
        return [[holder.address for holder in found] for found in self.lookup(keys)]

    def check(self) -> None:
        """Return if the index answers; raise `ControlError` otherwise."""
        self._control.check()

    def reset(self) -> None:
        """Drop every connection (after a failure; the next call reconnects and re-reads a cluster's topology)."""
        self._control.reset()
        if self._bare is not None:
            self._bare.reset()

    def close(self) -> None:
        self._control.close()
        if self._bare is not None:
            self._bare.reset()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _raise_errors(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, ControlError):
            raise reply
    return replies
