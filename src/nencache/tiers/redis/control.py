"""`RedisControl`: redis-py for everything of a Redis deployment that is not bulk chunk data.

Cluster topology (slot -> primary, reloaded after MOVED/ASK and after a failover), health checks, SCAN
and UNLINK, and the P2P index's sorted sets go through redis-py (with hiredis when installed): a
maintained client owns the cluster protocol. Only the bulk GET/SET/EXISTS pipelines of `RedisTier`
use the hand-written RESP client (`nencache.tiers.redis.resp`), which benchmarks/RESULTS.md ("tiers: remote
(Redis clients)") measures at more than 1.2x redis-py on chunk-sized values.

Calls fail fast (no retries of their own, one for a cluster while it re-reads its topology): the tier
above counts the failure, serves misses and probes in the background (`nencache.net.retry`).
Failures surface as `ControlError` (an `OSError`: the callers already treat those as "Redis is down")
or `ControlReplyError` for an error reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.crc import key_slot
    from redis.retry import Retry
except ImportError as exc:  # the `redis` extra
    raise ImportError("the Redis tier and the P2P index need redis-py: pip install 'nencache[redis]'") from exc

from nencache.tiers.redis.url import Address, RedisTarget

__all__ = ["SLOTS", "ControlError", "ControlReplyError", "RedisControl", "Subscription", "key_slot"]

SLOTS = 16384
PING_EVERY = 5.0  # seconds of silence on a subscription before it is asked for a PONG


class ControlError(ConnectionError):
    """Redis did not answer a control command (unreachable, timed out, cluster down, bad credentials)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code  # the Redis error code when Redis refused (WRONGPASS, NOAUTH, CLUSTERDOWN, ...)


class ControlReplyError(ControlError):
    """Redis answered a control command with an error reply (WRONGTYPE, OOM, ...)."""


class RedisControl:
    """A redis-py client for one `RedisTarget`: `redis.Redis`, or `redis.cluster.RedisCluster` for a cluster.

    The cluster client is made on first use (its constructor reads the topology, which fails while the
    cluster is down); `reset` drops it and every connection. Thread-safe.
    """

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        self.target = target
        self._timeout = timeout
        self._lock = threading.Lock()
        self._client: Any = None

    # -- commands ------------------------------------------------------------------------------

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run `commands` in one non-transactional pipeline (per node, for a cluster); replies in order.

        An error reply of one command comes back in its place as a `ControlReplyError`.
        """
        def run() -> list[Any]:
            pipe = self.client().pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute(raise_on_error=False)

        return [ControlReplyError(str(r), _code(r)) if isinstance(r, redis.exceptions.ResponseError) else r
                for r in self._call(run)]

    def call(self, *command: Any) -> Any:
        """One command (a cluster routes it by its first key)."""
        return self._call(lambda: self.client().execute_command(*command))

    def unlink(self, names: Sequence[bytes]) -> None:
        """UNLINK `names`, grouped per hash slot for a cluster (a multi-key command must stay in one slot)."""
        if not names:
            return
        if not self.target.cluster:
            self.call("UNLINK", *names)
            return
        groups: dict[int, list[bytes]] = {}
        for name in names:
            groups.setdefault(key_slot(name), []).append(name)
        for reply in self.pipeline([("UNLINK", *group) for group in groups.values()]):
            if isinstance(reply, ControlError):
                raise reply

    def scan(self, pattern: bytes, count: int) -> Iterator[list[bytes]]:
        """Batches of the keys matching `pattern`, on every server (every primary of a cluster)."""
        for node in self._nodes():
            cursor: int | bytes = 0
            while True:
                cursor, found = self._call(lambda: node.scan(cursor, match=pattern, count=count))
                if found:
                    yield [bytes(k) for k in found]
                if int(cursor) == 0:
                    break

    def check(self) -> None:
        """Return if every server answers (a cluster: its topology reloaded, every slot served, state ok)."""
        if not self.target.cluster:
            self._call(lambda: self.client().ping())
            return
        self.refresh()
        owners = self.slot_owners()
        if None in owners:
            raise ControlError("the cluster does not cover every hash slot")
        for node in self._nodes():
            info = self._call(lambda: node.execute_command("CLUSTER INFO"))
            state = info.get("cluster_state") if isinstance(info, dict) else None
            if state != "ok":
                raise ControlError(f"a cluster node reports cluster_state {state}, not ok", "CLUSTERDOWN")

    def subscribe(self, channel: bytes) -> Subscription:
        """The messages PUBLISHed on `channel` from now on (once this returns, the subscription is in place)."""
        return Subscription(self, channel, self._timeout)

    # -- cluster topology ----------------------------------------------------------------------

    def slot_owners(self) -> list[Address | None]:
        """slot -> the address of the primary serving it (None where no node does), from redis-py's table."""
        client = self.client()
        owners: list[Address | None] = [None] * SLOTS
        for slot, nodes in client.nodes_manager.slots_cache.items():
            if nodes:
                owners[slot] = (nodes[0].host, int(nodes[0].port))
        return owners

    def refresh(self) -> None:
        """Reload the topology (after a MOVED or ASK reply on the bulk path, or a failover)."""
        if not self.target.cluster:
            return
        with self._lock:
            client = self._client
        if client is None:
            self.client()  # its constructor reads the topology
            return
        self._call(client.nodes_manager.initialize)

    # -- lifecycle -----------------------------------------------------------------------------

    def client(self) -> Any:
        """The redis-py client, made now if needed."""
        with self._lock:
            if self._client is None:
                self._client = self._call(self._connect)
            return self._client

    def reset(self) -> None:
        """Drop the client and its connections (after a failure; the next call reconnects)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken client must not fail the caller
                pass

    close = reset

    # -- internals -----------------------------------------------------------------------------

    def _nodes(self) -> list[Any]:
        """One redis-py client per server: the standalone client, or one per cluster primary."""
        client = self.client()
        if not self.target.cluster:
            return [client]
        return [client.get_redis_connection(node) for node in client.get_primaries()]

    def _connect(self) -> redis.Redis:
        options: dict[str, Any] = dict(socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                                       username=self.target.username, password=self.target.password)
        if self.target.tls is not None:
            tls = self.target.tls
            reqs = tls.get("ssl_cert_reqs", "required")
            options.update(ssl=True, ssl_cert_reqs=reqs, ssl_ca_certs=tls.get("ssl_ca_certs"),
                           ssl_certfile=tls.get("ssl_certfile"), ssl_keyfile=tls.get("ssl_keyfile"),
                           ssl_check_hostname=tls.get("ssl_check_hostname",
                                                      "true" if reqs == "required" else "false") == "true")
        first = self.target.nodes[0]
        if self.target.cluster:
            nodes = [ClusterNode(host, port) for host, port in self.target.nodes]  # type: ignore[misc]
            # One retry: a command that meets a failed-over node re-reads the topology and tries once more.
            return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 1), **options)
        options.update(db=self.target.db, retry=Retry(NoBackoff(), 0))
        if isinstance(first, str):
            return redis.Redis(unix_socket_path=first, **options)
        return redis.Redis(host=first[0], port=first[1], **options)

    def _call(self, fn: Any) -> Any:
        """`fn()`, with redis-py's failures turned into `ControlError` / `ControlReplyError`."""
        errors = redis.exceptions
        try:
            return fn()
        except errors.AuthenticationError as exc:  # before ResponseError: NOAUTH is both
            raise ControlError(f"{exc}; check the user and password in the Redis URL", "WRONGPASS") from exc
        except errors.ResponseError as exc:
            raise ControlReplyError(str(exc), _code(exc)) from exc
        except (errors.RedisError, OSError) as exc:
            raise ControlError(str(exc) or type(exc).__name__, _code(exc)) from exc


class Subscription:
    """One channel's messages, through redis-py's PubSub (on one node of a cluster: PUBLISH reaches them all).

    A connection that stops answering is found out: after `PING_EVERY` seconds without a message it is
    sent a PING, and `next` raises `ControlError` if no answer comes within the timeout.
    """

    def __init__(self, control: RedisControl, channel: bytes, timeout: float) -> None:
        self._call, self._timeout = control._call, timeout
        self._pubsub = self._call(lambda: control.client().pubsub())
        try:
            self._call(lambda: self._pubsub.subscribe(channel))
            deadline = time.monotonic() + timeout
            while (message := self._call(lambda: self._pubsub.get_message(timeout=0.05))) is None \
                    or message["type"] != "subscribe":
                if time.monotonic() > deadline:
                    raise ControlError(f"Redis did not confirm the subscription to {channel!r} within {timeout}s")
        except BaseException:
            self.close()
            raise
        self._heard = time.monotonic()
        self._pinged: float | None = None

    def next(self, timeout: float) -> bytes | None:
        """The next message, waiting at most `timeout` seconds; None if none came. `ControlError` on failure."""
        message = self._call(lambda: self._pubsub.get_message(timeout=timeout))
        now = time.monotonic()
        if message is not None:
            self._heard, self._pinged = now, None
            return bytes(message["data"]) if message["type"] == "message" else None
        if self._pinged is not None and now - self._pinged > self._timeout:
            raise ControlError(f"the Redis subscription did not answer a PING within {self._timeout}s")
        if self._pinged is None and now - self._heard > PING_EVERY:
            self._call(self._pubsub.ping)
            self._pinged = now
        return None

    def close(self) -> None:
        try:
            self._pubsub.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not fail the caller
            pass


def _code(exc: BaseException) -> str:
    text = str(exc)
    head = text.split(" ", 1)[0]
    return head if head.isupper() else ""
