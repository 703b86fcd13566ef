"""The contract every tier honours. A tier's test module subclasses `TierContract` and provides `tier`.

Blobs here are real chunks in the shared byte format, so tiers that check headers accept them.

Chunks are written through the `holder` fixture and read, looked up and counted through `tier`. For
most tiers the holder is the tier itself. A `publish_only` tier keeps no bytes of what it is given
(its `put` announces keys its own cache holds), so its test module provides a `holder`: the cache
that tier publishes for, written to as that cache writes. Reads then go through a tier of another
cache, which must find and fetch what the holder published.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pytest
import torch

from nencache.codecs import RawCodec
from nencache.tiers.base import Distance, Tier, TierStats


def make_blob(key: bytes, tokens: int = 8, seed: int = 0) -> bytes:
    """A small raw-codec chunk stamped with `key`."""
    gen = torch.Generator().manual_seed(seed)
    chunk = torch.randn((2, 2, tokens, 2, 8), generator=gen).to(torch.bfloat16)
    return RawCodec().encode(chunk, key)


def make_key(i: int) -> bytes:
    return i.to_bytes(16, "little")


class ChunkHolder(Protocol):
    """Where the contract writes chunks: puts, flushes, deletes and clears, and counts what it stored.
    Every `Tier` is one."""

    def put(self, items: Sequence[tuple[bytes, bytes | bytearray | memoryview]]) -> None: ...

    def flush(self) -> None: ...

    def delete(self, keys: Sequence[bytes]) -> None: ...

    def clear(self) -> None: ...

    def stats(self) -> TierStats: ...


class TierContract:
    """Subclass and define a `tier` fixture that yields a fresh, empty tier (closed by the fixture); a
    `publish_only` tier also defines `holder` (see the module docstring)."""

    @pytest.fixture
    def holder(self, tier: Tier) -> ChunkHolder:
        """The tier itself. A publish-only tier stores none of the bytes it is given, so writing through
        it and reading back would test nothing: its module must provide the cache it publishes for."""
        if tier.publish_only:
            pytest.fail(f"tier {tier.name!r} is publish_only: its contract needs a `holder` fixture, the cache "
                        "whose chunks it publishes, written to as that cache writes")
        return tier

    def test_is_a_tier(self, tier: Tier) -> None:
        assert isinstance(tier, Tier)
        assert isinstance(tier.name, str) and tier.name

    def test_put_get_roundtrip_exact(self, tier: Tier, holder: ChunkHolder) -> None:
        items = [(make_key(i), make_blob(make_key(i), seed=i)) for i in range(5)]
        holder.put(items)
        holder.flush()
        got = tier.get([k for k, _ in items])
        assert [bytes(g) if g is not None else None for g in got] == [b for _, b in items]

    def test_missing_keys_are_none(self, tier: Tier, holder: ChunkHolder) -> None:
        key = make_key(1)
        holder.put([(key, make_blob(key))])
        holder.flush()
        got = tier.get([make_key(99), key, make_key(100)])
        assert got[0] is None and got[2] is None and bytes(got[1]) == make_blob(key)

    def test_contains_prefix_stops_at_first_gap(self, tier: Tier, holder: ChunkHolder) -> None:
        keys = [make_key(i) for i in range(6)]
        holder.put([(k, make_blob(k)) for i, k in enumerate(keys) if i != 3])
        holder.flush()
        assert tier.contains_prefix(keys) == 3
        assert tier.contains_prefix(keys[:2]) == 2
        assert tier.contains_prefix([]) == 0
        assert tier.contains_prefix([make_key(50)] + keys) == 0

    def test_delete_and_clear(self, tier: Tier, holder: ChunkHolder) -> None:
        keys = [make_key(i) for i in range(4)]
        holder.put([(k, make_blob(k)) for k in keys])
        holder.flush()
        holder.delete([keys[0], make_key(77)])
        assert tier.get([keys[0]]) == [None]
        assert tier.contains_prefix(keys[1:]) == 3
        holder.clear()
        assert tier.contains_prefix(keys) == 0
        assert tier.get(keys) == [None] * 4

    def test_overwrite_same_key_keeps_a_valid_value(self, tier: Tier, holder: ChunkHolder) -> None:
        key = make_key(3)
        holder.put([(key, make_blob(key, seed=1))])
        holder.put([(key, make_blob(key, seed=1))])
        holder.flush()
        assert bytes(tier.get([key])[0]) == make_blob(key, seed=1)

    def test_stats_count_hits_and_misses(self, tier: Tier, holder: ChunkHolder) -> None:
        key = make_key(5)
        holder.put([(key, make_blob(key))])
        holder.flush()
        tier.get([key, make_key(6)])
        stats = tier.stats()
        assert isinstance(stats, TierStats)
        assert stats.hits >= 1 and stats.misses >= 1
        assert holder.stats().stored_chunks >= 1  # the holder is the tier, but for a publish-only tier

    def test_stats_are_a_snapshot(self, tier: Tier, holder: ChunkHolder) -> None:
        key = make_key(7)
        holder.put([(key, make_blob(key))])
        holder.flush()
        tier.get([key])
        for counted in {id(one): one for one in (tier, holder)}.values():  # both sides of a publish-only tier
            before = counted.stats()
            before.stored_chunks += 1000
            before.hits += 1000
            before.errors += 1000
            after = counted.stats()
            assert after is not before and after.stored_chunks < 1000 and after.hits < 1000 and after.errors < 1000

    def test_declares_its_capabilities(self, tier: Tier) -> None:
        assert isinstance(tier.checks_payload, bool) and isinstance(tier.publish_only, bool)
        assert isinstance(tier.distance, Distance)

    def test_many_chunks_of_varied_sizes(self, tier: Tier, holder: ChunkHolder) -> None:
        items = [(make_key(1000 + i), make_blob(make_key(1000 + i), tokens=1 + i % 17, seed=i)) for i in range(40)]
        holder.put(items)
        holder.flush()
        got = tier.get([k for k, _ in items])
        assert all(g is not None and bytes(g) == b for g, (_, b) in zip(got, items))


@pytest.fixture
def blob_factory():
    return make_blob
