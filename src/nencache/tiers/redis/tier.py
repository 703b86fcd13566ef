"""`RedisTier`: chunks in Redis or Valkey (standalone, TLS, unix socket or cluster), shared by processes.

Keys are `<key_prefix>:<namespace>:` + the 16-byte chunk key; values are the shared byte format,
checked (header, key, CRC) on the way back. Chunks over `segment_bytes` (2 MiB) are stored in parts
under `key`, `key#1`, `key#2`, ... (`nencache.tiers.redis.parts`). `contains_prefix` and `put` are one
pipelined round trip per server; `get` streams pipelined GETs with a few MiB in flight per server. These
three run on the hand-written RESP client (`nencache.tiers.redis.resp`: values sent from and received into
the caller's buffers), measured at more than 1.2x redis-py with hiredis in benchmarks/RESULTS.md;
`delete`, `clear`, health probes and the cluster's topology (MOVED/ASK, failover) go through redis-py
(`nencache.tiers.redis.control`). Redis being
down, slow or killed never raises: the call is counted as an error, the tier is marked down, and
until a background probe (exponential backoff, capped at `retry_cap`) reaches Redis again every call
is an immediate miss (puts are dropped and counted).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

from nencache.errors import ClosedError, ConfigError, CorruptChunkError, TierError
from nencache.format import HEADER_SIZE, parse_header, split_blob
from nencache.net.retry import FIRST_RETRY, Reconnector
from nencache.net.warn import ThrottledWarning
from nencache.tiers.base import Distance, TierStats
from nencache.tiers.redis.client import Plan, RedisClient
from nencache.tiers.redis.control import key_slot
from nencache.tiers.redis.parts import Assembly, part_count, part_key, split_parts
from nencache.tiers.redis.url import parse_url
from nencache.tiers.redis.resp import Reply, ReplyError

__all__ = ["RedisTier", "key_slot"]

log = logging.getLogger("nencache.redis")

_FAILURES = (OSError, ReplyError)
SEGMENT_BYTES = 2 << 20  # larger chunks are stored in parts of this size (see nencache.tiers.redis.parts)
_SCAN_COUNT = 1000


class RedisTier:
    """A byte tier in Redis/Valkey. See the module docstring for the fault behaviour."""

    name = "redis"
    checks_payload = True  # `get` returns only blobs whose payload checksum it has verified
    publish_only = False
    distance = Distance.REMOTE

    def __init__(self, url: str, namespace: str, *, timeout: float = 0.25, ttl: float | None = None,
                 key_prefix: str = "nencache", retry_cap: float = 2.0, segment_bytes: int = SEGMENT_BYTES) -> None:
        if not timeout > 0:
            raise ConfigError(f"Redis timeout must be > 0 seconds, got {timeout}")
        if ttl is not None and not ttl > 0:
            raise ConfigError(f"Redis key TTL must be > 0 seconds or None (no expiry), got {ttl}")
        if not retry_cap >= FIRST_RETRY:
            raise ConfigError(f"Redis retry_cap must be >= {FIRST_RETRY} seconds, got {retry_cap}")
        if segment_bytes < HEADER_SIZE:
            raise ConfigError(f"Redis segment size must be at least {HEADER_SIZE} bytes, got {segment_bytes}")
        self._segment = segment_bytes
        self._guess = 0  # length of the last multi-part chunk read: the next get asks for that many parts at once
        target = parse_url(url)
        self.url = target.display()
        try:
            self._client = RedisClient(target, timeout)
        except OSError as exc:
            raise ConfigError(f"cannot load the TLS files named in {self.url}: {exc}") from exc
        self._prefix = f"{key_prefix}:{namespace}:".encode()
        self._ttl_args: tuple[str | int, ...] = ("PX", max(1, math.ceil(ttl * 1000))) if ttl else ()
        self._stats = TierStats()
        self._state = threading.Lock()
        self._closed = threading.Event()
        self._retry = Reconnector("nencache-redis-retry", lambda: self._probe() is None, self._back_up, self._closed,
                                  retry_cap)
        self._warn = ThrottledWarning(log)
        problem = self._probe()
        self._up = problem is None
        if problem is not None:
            self._warn(f"Redis at {self.url} is unreachable ({_describe(problem)}); serving misses and "
                       f"retrying in the background every <= {retry_cap:g}s")
            self._retry.start()

    # -- the Tier protocol -------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        rkeys = self._rkeys(keys)
        if not rkeys or not self._up:
            return 0
        results = self._run_or_fail(lambda: self._client.plan(rkeys, "EXISTS"))
        if results is None:
            return 0
        present = [False] * len(rkeys)
        for positions, reply in results:
            if isinstance(reply, ReplyError):
                self._reply_error(reply)
            elif reply == 1:
                present[positions[0]] = True
        return present.index(False) if False in present else len(present)

    def get(self, keys: Sequence[bytes]) -> list[bytes | bytearray | memoryview | None]:
        rkeys = self._rkeys(keys)
        out: list[bytes | bytearray | memoryview | None] = [None] * len(rkeys)
        if not rkeys:
            return out
        started = time.perf_counter()
        if not self._up:  # an immediate miss until the background probe reconnects
            self._stats.add(misses=len(out))
            return out
        reads = Assembly(len(rkeys), self._segment, self._guess)
        try:
            self._read_parts(reads, rkeys, reads.first_round())
            self._read_parts(reads, rkeys, reads.second_round())  # parts beyond the guessed size
        except _FAILURES as exc:
            self._failed(exc)
            self._stats.add(misses=len(out))
            return out  # nothing from a failed exchange is used
        reads.finish()
        damaged: list[tuple[bytes, int]] = []  # (key, parts)
        incomplete: list[tuple[bytes, int]] = []
        for pos, chunk in enumerate(reads.chunks):
            if chunk.state == "done" and chunk.buffer is not None and self._valid(chunk.buffer, keys[pos], rkeys[pos]):
                out[pos] = chunk.buffer
                if chunk.total > self._segment:
                    self._guess = chunk.total
            elif chunk.state in ("done", "damaged"):
                damaged.append((rkeys[pos], chunk.parts))
            elif chunk.state == "incomplete" and chunk.segment != self._segment:  # not how parts are cut: truncated
                self._warn(f"Redis key {rkeys[pos]!r} held a truncated chunk; deleting it")
                damaged.append((rkeys[pos], chunk.parts))
            elif chunk.state == "incomplete":
                incomplete.append((rkeys[pos], chunk.parts))
        hits = sum(b is not None for b in out)
        self._stats.add(hits=hits, misses=len(out) - hits, corrupt=len(damaged),
                        read_bytes=sum(len(b) for b in out if b is not None),
                        read_seconds=time.perf_counter() - started)
        if damaged or incomplete:  # a part evicted by Redis leaves the others useless: drop them too
            self._unlink([part_key(rkey, p) for rkey, parts in damaged + incomplete for p in range(parts)])
        return out

    def _read_parts(self, reads: Assembly, rkeys: list[bytes], parts: list[tuple[int, int]]) -> None:
        if not parts:
            return
        plan = self._client.plan([part_key(rkeys[i], p) for i, p in parts], "GET")
        for [pos], reply in self._client.exchange(plan, window=True, into=lambda at: reads.into(parts[at[0]])):
            if isinstance(reply, ReplyError):
                self._reply_error(reply)
                reply = None
            reads.take(parts[pos], reply if isinstance(reply, memoryview) else None)

    def put(self, items: Sequence[tuple[bytes, bytes | bytearray | memoryview]]) -> None:
        rkeys = self._rkeys([k for k, _ in items])
        if not rkeys:
            return
        if not self._up:
            self._stats.add(dropped=len(rkeys))
            return
        started = time.perf_counter()
        values = [memoryview(v).cast("B") for _, v in items]
        names: list[bytes] = []
        args: list[tuple[object, ...]] = []
        owner: list[int] = []
        for i, (rkey, value) in enumerate(zip(rkeys, values)):
            parts = split_parts(value, self._segment)
            for p in reversed(range(len(parts))):  # part 0 last: EXISTS finds a chunk only once it is whole
                names.append(part_key(rkey, p))
                args.append((parts[p], *self._ttl_args))
                owner.append(i)
        results = self._run_or_fail(lambda: self._client.plan(names, "SET", args=args))  # type: ignore[arg-type]
        failed: set[int] = set() if results is not None else set(range(len(rkeys)))
        for positions, reply in results or ():
            if isinstance(reply, ReplyError):
                self._reply_error(reply)
                failed.add(owner[positions[0]])
        stored = [i for i in range(len(rkeys)) if i not in failed]
        self._stats.add(stored_chunks=len(stored), stored_bytes=sum(values[i].nbytes for i in stored),
                        dropped=len(rkeys) - len(stored), write_seconds=time.perf_counter() - started)

    def _valid(self, blob: memoryview, key: bytes, rkey: bytes) -> bool:
        try:
            split_blob(blob, expected_key=bytes(key))
        except CorruptChunkError as exc:
            self._warn(f"Redis key {rkey!r} held a damaged chunk ({exc}); deleting it")
            return False
        return True

    def delete(self, keys: Sequence[bytes]) -> None:
        """Forget `keys`: each chunk's first part says how many parts it has, then all go in one UNLINK round."""
        rkeys = self._rkeys(keys)
        if not rkeys or not self._up:
            return
        names = list(rkeys)
        control = self._client.control
        commands = [("GETRANGE", k, 0, HEADER_SIZE - 1) for k in rkeys] + [("STRLEN", k) for k in rkeys]
        try:
            replies = control.pipeline(commands)
        except _FAILURES as exc:
            self._failed(exc)
            return
        for pos, (head, length) in enumerate(zip(replies[: len(rkeys)], replies[len(rkeys) :])):
            if not isinstance(head, bytes) or not isinstance(length, int) or length < HEADER_SIZE:
                continue
            try:
                total = HEADER_SIZE + parse_header(head).payload_len
            except CorruptChunkError:
                continue  # a damaged first part: its further parts (if any) stay until they expire or clear()
            names += [part_key(rkeys[pos], p) for p in range(1, part_count(total, length))]
        self._unlink(names)

    def _unlink(self, names: list[bytes]) -> None:
        try:
            self._client.control.unlink(names)
        except _FAILURES as exc:
            self._failed(exc)

    def clear(self) -> None:
        """Delete every key of this namespace (SCAN + UNLINK on every server); best effort while down."""
        self._check_open()
        if not self._up:
            self._stats.add(errors=1)
            self._warn(f"clear() skipped: Redis at {self.url} is unreachable; its keys stay until they expire")
            return
        pattern = bytes(b for c in self._prefix for b in (b"\\%c" % c if c in b"*?[]\\" else bytes([c]))) + b"*"
        control = self._client.control
        try:
            for found in control.scan(pattern, _SCAN_COUNT):
                control.unlink(found)
        except _FAILURES as exc:
            self._failed(exc)

    def flush(self) -> None:
        """Puts are synchronous: nothing to wait for."""

    def stats(self) -> TierStats:
        return self._stats.snapshot()

    def close(self) -> None:
        self._closed.set()
        with self._state:
            self._up = False
        self._client.reset()
        self._retry.join()

    @property
    def is_up(self) -> bool:
        """True while Redis answers; False while calls are served as misses."""
        return self._up

    # -- helpers -----------------------------------------------------------------------------------

    def _rkeys(self, keys: Sequence[bytes]) -> list[bytes]:
        self._check_open()
        out = []
        for key in keys:
            if not isinstance(key, bytes | bytearray | memoryview):
                raise TierError(f"RedisTier keys must be bytes (16-byte chunk keys), got {type(key).__name__}")
            out.append(self._prefix + bytes(key))
        return out

    def _run_or_fail(self, make_plan: Callable[[], Plan]) -> list[tuple[list[int], Reply]] | None:
        try:
            return self._client.run(make_plan())
        except _FAILURES as exc:
            self._failed(exc)
            return None

    # -- health ---------------------------------------------------------------------------------

    def _probe(self) -> BaseException | None:
        """None if Redis answers, else the problem."""
        try:
            self._client.check()
        except _FAILURES as exc:
            return exc
        return None

    def _failed(self, exc: BaseException) -> None:
        self._stats.add(errors=1)
        with self._state:
            was_up, self._up = self._up, False
        self._client.reset()
        if was_up and not self._closed.is_set():
            self._warn(f"Redis at {self.url} failed ({_describe(exc)}); serving misses and retrying in the background")
        self._retry.start()

    def _back_up(self) -> None:
        with self._state:
            self._up = not self._closed.is_set()
        log.info("Redis at %s is reachable again", self.url)

    def _reply_error(self, reply: ReplyError) -> None:
        self._stats.add(errors=1)
        if reply.code in ("MOVED", "ASK"):
            self._client.mark_stale()
        else:
            self._warn(f"Redis at {self.url} replied {reply}")

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ClosedError("this RedisTier was closed; create a new one to use Redis again")


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, ReplyError) and exc.code in ("WRONGPASS", "NOAUTH"):  # ControlError says so itself
        text += "; check the user and password in the Redis URL"
    return text
