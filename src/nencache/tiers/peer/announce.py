"""`Announcement`: what a peer tells the other peers of its namespace when it publishes or unpublishes keys.

Beside each change to the index (`nencache.tiers.peer.index`), the peer PUBLISHes one announcement on
the namespace's channel, so that every peer subscribed to it keeps a local copy of the holder lists
(`nencache.tiers.peer.mirror`) and finds holders without a round trip to the index. The bytes come from
outside this process: `unpack` checks every length and answers None for anything malformed.

Layout (little-endian): a header `<4sBBQHI` (magic `NCAN`, version 1, kind 1 held / 0 gone, the wall-clock
time in ms the entries expire, the address's length, the number of keys), the holder's address (UTF-8),
then per key its 16 bytes and its placement in the holder's shared pool (one length byte, 0: none, then
that many bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from nencache.net.protocol import KEY_SIZE

MAGIC = b"NCAN"
VERSION = 1
_HEADER = struct.Struct("<4sBBQHI")
MAX_ADDRESS = 1024
MAX_PLACEMENT = 255


@dataclass(frozen=True, slots=True)
class Announcement:
    """`peer` holds `keys` until `expires_ms` (each with its placement, None: not in a shared pool), or,
    with `held` False, no longer holds them."""

    peer: str
    held: bool
    expires_ms: int
    keys: Sequence[bytes]
    placements: Sequence[bytes | None]

    def pack(self) -> bytes:
        address = self.peer.encode("utf-8")
        if len(address) > MAX_ADDRESS:
            raise ValueError(f"a peer address is at most {MAX_ADDRESS} bytes, got {len(address)}")
        if len(self.placements) != len(self.keys):
            raise ValueError("an announcement needs one placement (or None) per key")
        parts = [_HEADER.pack(MAGIC, VERSION, int(self.held), self.expires_ms, len(address), len(self.keys)), address]
        for key, placement in zip(self.keys, self.placements):
            if len(key) != KEY_SIZE:
                raise ValueError(f"a chunk key is {KEY_SIZE} bytes, got {len(key)}")
            placed = placement or b""
            if len(placed) > MAX_PLACEMENT:
                raise ValueError(f"a placement is at most {MAX_PLACEMENT} bytes, got {len(placed)}")
            parts += [bytes(key), bytes((len(placed),)), placed]
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> Announcement | None:
        """The announcement `data` packs; None if it is not a well-formed one."""
        if len(data) < _HEADER.size:
            return None
        magic, version, kind, expires_ms, address_len, count = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or kind > 1 or address_len > MAX_ADDRESS:
            return None
        at = _HEADER.size + address_len
        if len(data) < at or count > (len(data) - at) // (KEY_SIZE + 1):
            return None
        try:
            peer = bytes(data[_HEADER.size : at]).decode("utf-8")
        except UnicodeDecodeError:
            return None
        keys: list[bytes] = []
        placements: list[bytes | None] = []
        for _ in range(count):
            end = at + KEY_SIZE + 1
            if end > len(data):
                return None
            placed = data[end - 1]
            if end + placed > len(data):
                return None
            keys.append(bytes(data[at : end - 1]))
            placements.append(bytes(data[end : end + placed]) if placed else None)
            at = end + placed
        if at != len(data):
            return None
        return cls(peer, bool(kind), expires_ms, keys, placements)
