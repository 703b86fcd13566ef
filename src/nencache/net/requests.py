"""The read requests every client of the protocol makes: EXISTS over a key run, a pipelined GET, and
LOCATE (where chunks sit in a server's shared pool)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nencache.net.protocol import NONCE_SIZE, SPOT, UNPLACED, Op, pack_keyed_meta
from nencache.net.shared import Spot
from nencache.net.wire import ErrorReply, Reply, WireConnection, split_keys


def count_present(conn: WireConnection, namespace: bytes, keys: Sequence[bytes]) -> int:
    """How many of `keys`, from the first, the other end holds (one EXISTS per `max_keys` group)."""
    found = 0
    for group in split_keys(keys, conn.limits.max_keys):
        reply = conn.call(Op.EXISTS, count=len(group), meta=pack_keyed_meta(namespace, group))
        found += min(reply.frame.count, len(group))
        if reply.frame.count < len(group):
            break
    return found


def _pipelined(conn: WireConnection, op: Op, namespace: bytes, groups: list[list[bytes]],
               on_error: Callable[[ErrorReply], None] | None) -> list[Reply]:
    """One `op` per key group, all in flight at once; the replies in group order.

    An error reply raises, unless `on_error` takes it (the connection stays usable).
    """
    conn.start()
    ids = [conn.send(op, count=len(g), meta=pack_keyed_meta(namespace, g)) for g in groups]
    pending = {request_id: len(group) for request_id, group in zip(ids, groups)}
    replies: dict[int, Reply] = {}
    while pending:
        reply = conn.read(pending)
        replies[reply.frame.request_id] = reply
        if reply.error is not None:
            if on_error is None:
                raise reply.error
            on_error(reply.error)
    return [replies[request_id] for request_id in ids]


def fetch(conn: WireConnection, namespace: bytes, keys: Sequence[bytes],
          on_error: Callable[[ErrorReply], None] | None = None) -> list[memoryview | None]:
    """The blobs of `keys` (None where absent), all GETs in flight at once.

    An error reply raises, unless `on_error` takes it (the connection stays usable; its keys are None).
    """
    groups = split_keys(keys, conn.limits.max_get_keys)
    out: list[memoryview | None] = []
    for reply, group in zip(_pipelined(conn, Op.GET, namespace, groups, on_error), groups):
        out.extend(reply.blobs if reply.blobs is not None else [None] * len(group))
    return out


def locate(conn: WireConnection, namespace: bytes, keys: Sequence[bytes],
           nonce: bytes) -> list[Spot | bool] | None:
    """Per key, its `Spot` in the shared pool whose nonce is `nonce`, False if absent, True if held but not placed.

    None if the server answers about another pool (it restarted since that pool was mapped).
    """
    out: list[Spot | bool] = []
    for reply in _pipelined(conn, Op.LOCATE, namespace, split_keys(keys, conn.limits.max_keys), None):
        meta = memoryview(reply.body)
        if bytes(meta[:NONCE_SIZE]) != nonce:
            return None
        for offset, length, generation in SPOT.iter_unpack(meta[NONCE_SIZE:]):
            out.append(Spot(offset, length, generation) if length else offset == UNPLACED)
    return out
