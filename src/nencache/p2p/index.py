"""`PeerIndex`: which peers hold which chunks of one namespace, kept in Redis (or Valkey).

One sorted set per chunk key, `<key_prefix>:p2p:<namespace>:` + the 16-byte key. Its members are
peer addresses (`host:port`), each scored with the wall-clock time (ms) its entry expires; the set
itself expires `ttl` after its last publish, so a dead peer's entries vanish even if nobody cleans
up. Publishing, unpublishing and looking up holders are each one pipelined round trip per Redis
server. Failures raise (`OSError`, `ReplyError`); `PeerTier` turns them into misses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from nencache.errors import ConfigError
from nencache.tiers.redis_client import Plan, RedisClient
from nencache.tiers.redis_url import parse_url
from nencache.tiers.resp import Reply, ReplyError

BATCH_KEYS = 2048  # keys per pipeline when publishing many


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
        try:
            self._client = RedisClient(target, timeout)
        except OSError as exc:
            raise ConfigError(f"p2p_index_url {self.url}: cannot load its TLS files ({exc})") from exc
        self.ttl_ms = max(1, math.ceil(ttl * 1000))
        self._prefix = f"{key_prefix}:p2p:{namespace}:".encode()

    def rkey(self, key: bytes) -> bytes:
        """The Redis key of a chunk key's holder set."""
        return self._prefix + bytes(key)

    def publish(self, keys: Sequence[bytes], peer: str) -> None:
        """Record `peer` as a holder of `keys` for the next `ttl` (expired holders are pruned on the way)."""
        now = _now_ms()
        for start in range(0, len(keys), BATCH_KEYS):
            rkeys = [self.rkey(k) for k in keys[start : start + BATCH_KEYS]]
            plan = self._client.plan(rkeys, "ZADD", args=[(now + self.ttl_ms, peer)] * len(rkeys))
            _merge(plan, self._client.plan(rkeys, "ZREMRANGEBYSCORE", args=[("-inf", now)] * len(rkeys)))
            _merge(plan, self._client.plan(rkeys, "PEXPIRE", args=[(self.ttl_ms,)] * len(rkeys)))
            _raise_errors(self._client.run(plan))

    def unpublish(self, keys: Sequence[bytes], peer: str) -> None:
        """Remove `peer` from the holders of `keys`."""
        for start in range(0, len(keys), BATCH_KEYS):
            rkeys = [self.rkey(k) for k in keys[start : start + BATCH_KEYS]]
            _raise_errors(self._client.run(self._client.plan(rkeys, "ZREM", args=[(peer,)] * len(rkeys))))

    def holders(self, keys: Sequence[bytes]) -> list[list[str]]:
        """The live holders of each key, most recently published first: one round trip."""
        if not keys:
            return []
        rkeys = [self.rkey(k) for k in keys]
        plan = self._client.plan(rkeys, "ZREVRANGEBYSCORE", args=[("+inf", f"({_now_ms()}")] * len(rkeys))
        out: list[list[str]] = [[] for _ in keys]
        for positions, reply in self._client.run(plan):
            if isinstance(reply, ReplyError):
                raise reply
            if isinstance(reply, list):
                out[positions[0]] = [bytes(member).decode("utf-8", "replace") for member in reply
                                     if isinstance(member, bytes | memoryview)]
        return out

    def check(self) -> None:
        """Return if the index answers; raise otherwise."""
        self._client.check()

    def reset(self) -> None:
        """Drop every connection (after a failure; the next call reconnects)."""
        self._client.reset()
        self._client.mark_stale()

    def close(self) -> None:
        self._client.reset()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _merge(into: Plan, other: Plan) -> None:
    """Append `other`'s commands to `into` (per server, after `into`'s own)."""
    for address, commands in other.commands.items():
        for command, positions in zip(commands, other.positions[address]):
            into.add(address, command, positions)


def _raise_errors(results: list[tuple[list[int], Reply]]) -> None:
    for _, reply in results:
        if isinstance(reply, ReplyError):
            raise reply
