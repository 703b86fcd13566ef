"""The read requests every client of the protocol makes: EXISTS over a key run, and a pipelined GET."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nencache.server.protocol import Op, pack_keyed_meta
from nencache.server.wire import ErrorReply, Reply, WireConnection, split_keys


def count_present(conn: WireConnection, namespace: bytes, keys: Sequence[bytes]) -> int:
    """How many of `keys`, from the first, the other end holds (one EXISTS per `max_keys` group)."""
    found = 0
    for group in split_keys(keys, conn.limits.max_keys):
        reply = conn.call(Op.EXISTS, count=len(group), meta=pack_keyed_meta(namespace, group))
        found += min(reply.frame.count, len(group))
        if reply.frame.count < len(group):
            break
    return found


def fetch(conn: WireConnection, namespace: bytes, keys: Sequence[bytes],
          on_error: Callable[[ErrorReply], None] | None = None) -> list[memoryview | None]:
    """The blobs of `keys` (None where absent), all GETs in flight at once.

    An error reply raises, unless `on_error` takes it (the connection stays usable; its keys are None).
    """
    conn.start()
    groups = split_keys(keys, conn.limits.max_get_keys)
    ids = [conn.send(Op.GET, count=len(g), meta=pack_keyed_meta(namespace, g)) for g in groups]
    pending = {request_id: len(group) for request_id, group in zip(ids, groups)}
    replies: dict[int, Reply] = {}
    while pending:
        reply = conn.read(pending)
        replies[reply.frame.request_id] = reply
        if reply.error is not None:
            if on_error is None:
                raise reply.error
            on_error(reply.error)
    out: list[memoryview | None] = []
    for request_id, group in zip(ids, groups):
        blobs = replies[request_id].blobs
        out.extend(blobs if blobs is not None else [None] * len(group))
    return out
