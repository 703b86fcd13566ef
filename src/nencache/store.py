"""`Store`: the one chunk store. The memory tier, the ordered byte tiers below it, the write-behind, the guard.

Everything that keeps chunks sits on it: `KVCache` (keys from token prefixes), the SGLang page store
(keys from the engine's page names), the server (`nencache serve`: opaque chunks of many namespaces),
a peer endpoint (serving the memory tier). A key ends with the chunk's 16-byte key, the one its
header names; a layer may put a scope in front of it (the server: its namespace).

- Reads: the leading run of keys is looked up in memory, then in each lower tier in `Distance` order.
  Chunks only a lower tier holds are fetched (in batches, the next batch read ahead while this one is
  decoded), checked, decoded and promoted into memory.
- Writes: a chunk lands in a pool page (pinned), and the write-behind (`nencache.writer`) encodes it
  and writes it to every lower tier; its `WritePolicy` decides what happens when pending writes pin
  the whole pool.
- Blobs: a store of chunks it never decodes (no layout; the server's) receives each chunk's bytes
  straight into a pool page (`reserve_page`, `commit_page`), writes that page as it is to lower tiers
  declared without a codec, and reads lower tiers with `fetch_blobs`: checked and promoted as bytes.
- Guard: a lower tier that raises, or serves a corrupt chunk, is counted (per tier, here and only
  here), logged once, and treated as a miss. The caller recomputes: slower, never wrong.

The store knows no URL scheme, no config file and no concrete tier (`nencache.assemble` builds it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

from nencache.codecs import RawCodec, decode_any
from nencache.codecs.base import EncodesInPlace, WarmsUp
from nencache.copy import as_numpy, copy_into
from nencache.errors import CorruptChunkError, LayoutError, PoolExhaustedError, TierError
from nencache.format import KEY_SIZE, parse_header, split_blob
from nencache.layout import KVLayout
from nencache.tiers.base import Tier
from nencache.tiers.memory import ChunkLease, Fill, MemoryTier
from nencache.workers import Workers, core_threads
from nencache.writer import LowerTier, TierSink, WriteBehind, WritePolicy
from nencache.net.warn import WarnOnce

log = logging.getLogger("nencache")
T = TypeVar("T")
_RAW = RawCodec()
FETCH_BATCH_BYTES = 32 << 20  # chunks read from a lower tier per batch (their buffers are reused batch to batch)
Blob = bytes | bytearray | memoryview


def leading_run(total: int, sources: Sequence[Callable[[int], int]]) -> int:
    """How many of `total` leading items some source holds. Each source, fastest first, answers how many
    items it holds in a row from a given position; after any advance the fastest is asked again."""
    found = 0
    while found < total:
        for holds_from in sources:
            advanced = holds_from(found)
            if advanced:
                found += advanced
                break
        else:
            break
    return found


@dataclass(slots=True)
class StoreCounters:
    """What the store saw of its lower tiers: chunks they served, calls that failed, corrupt chunks."""

    lower_hits: int = 0
    tier_errors: int = 0
    corrupt: int = 0


@dataclass(slots=True)
class Want:
    """One chunk a read asks for: its key, its token count, and where to copy it (None: promote only)."""

    key: bytes
    num_tokens: int
    out: torch.Tensor | None = None


class Store:
    """Chunks in a memory tier and the byte tiers below it. Thread-safe.

    `lower` is asked in `Distance` order (stable: equal distances keep the given order). `policy`
    None: no write-behind (chunks stay in memory only). `keep_in_memory=False`: the pool only stages
    chunks until the write-behind has written them below, and fetched chunks are not promoted unless a
    prefetch asked for them. `layout` None: a store of blobs only (the tensor path needs a layout).
    """

    def __init__(self, memory: MemoryTier, lower: Sequence[LowerTier] = (), *, layout: KVLayout | None = None,
                 policy: WritePolicy | None = None, keep_in_memory: bool = True, io_threads: int = 8,
                 warn: WarnOnce | None = None) -> None:
        self.memory = memory
        self.layout = layout
        self.lower = sorted(lower, key=lambda one: one.tier.distance)
        self.keep_in_memory = keep_in_memory
        self.io_threads = io_threads
        self.warn = warn or WarnOnce(log)
        self._lock = threading.Lock()
        self._counts = StoreCounters()
        self._per_tier: dict[str, StoreCounters] = {one.tier.name: StoreCounters() for one in self.lower}
        self._inflight: dict[bytes, Future[Any]] = {}
        self._io: ThreadPoolExecutor | None = None
        self._decoders = Workers(core_threads(), "nencache-decode")  # apart from _io: prefetch tasks wait on decodes
        # the write-behind's, apart from reads': encodes take turns on the cores, the other threads write
        self._encoders = Workers(4 * core_threads(), "nencache-encode")
        self._fetcher: ThreadPoolExecutor | None = None  # reads the next batch of a fetch ahead
        self._closed = False
        sink = TierSink(self.lower, self.tier_failed, after_write=None if keep_in_memory else self._forget_staged,
                        each=self._encoders.map)
        self.writer: WriteBehind[ChunkLease] | None = (
            WriteBehind(sink, policy, sync=sink.sync, batch=sink.batch) if self.lower and policy is not None else None)
        # Compile the codecs' loops and map the pool's pages in the background: stores then never wait for
        # either (first-touch page faults included).
        self.prefault = threading.Thread(target=self._prepare, name="nencache-prefault", daemon=True)
        self.prefault.start()

    def _prepare(self) -> None:
        for codec in (self.memory.codec, *(one.codec for one in self.lower)):
            if isinstance(codec, WarmsUp) and self.layout is not None:
                try:
                    codec.warm_up(self.layout.dtype)
                except Exception as exc:  # the first chunk compiles the loops instead, and fails there if it must
                    self.warn("warm-up", f"could not prepare codec {codec.name} ({exc}); its first chunk will")
        self.memory.pool.prefault()

    # --- lookups -------------------------------------------------------------------------------------
    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading `keys` some tier holds (memory first, then each lower tier in order)."""
        held = self.memory.contains_prefix(keys)
        if held == len(keys) or not self.lower:
            return held
        sources = [lambda start: self.memory.contains_prefix(keys[start:])]
        sources += [lambda start, t=one.tier: self.guard(t, lambda: t.contains_prefix(keys[start:]), 0)
                    for one in self.lower]
        return held + leading_run(len(keys) - held, [lambda start, s=s: s(start + held) for s in sources])

    def holds(self, key: bytes) -> bool:
        """Whether some tier holds `key`."""
        return key in self.memory or any(self.guard(one.tier, lambda t=one.tier: t.contains_prefix([key]), 0)
                                         for one in self.lower)

    # --- reads ---------------------------------------------------------------------------------------
    def read(self, wants: Sequence[Want]) -> list[bool]:
        """Copy the wanted chunks into their `out`: from memory, else (after any prefetch of them lands)
        fetched from the lower tiers. Which of them were served."""
        if len(wants) == 1 and self.memory.read_into(wants[0].key, wants[0].out):  # type: ignore[arg-type]
            return [True]  # the common single-chunk hit: nothing else to do
        keys = [want.key for want in wants]
        outs = [want.out for want in wants]
        if len(wants) == 1:
            got = [False]
        else:
            got = self._read_memory(keys, outs)
            if all(got):
                return got
        missing = [i for i, ok in enumerate(got) if not ok]
        if self._inflight:
            self._wait_inflight([keys[i] for i in missing])
            for i in missing:
                got[i] = self.memory.read_into(keys[i], outs[i])  # type: ignore[arg-type]
            missing = [i for i in missing if not got[i]]
        if missing and self.lower:
            fetched = self.fetch([wants[i] for i in missing])
            for i in missing:
                got[i] = keys[i] in fetched
        return got

    def _read_memory(self, keys: list[bytes], outs: list[torch.Tensor | None]) -> list[bool]:
        read = self.memory.read_many(keys, outs)  # type: ignore[arg-type]
        if read == len(keys):
            return [True] * read
        rest = [self.memory.read_into(k, o) for k, o in zip(keys[read:], outs[read:])]  # type: ignore[arg-type]
        return [True] * read + rest

    def fetch(self, wants: Sequence[Want]) -> set[bytes]:
        """Fetch `wants` from the lower tiers, check, decode, copy into their `out` and promote into memory.

        In batches of about `FETCH_BATCH_BYTES`, the first tier's read of the next batch running while
        this one is decoded: read buffers are reused instead of faulted in fresh, and reads overlap
        decoding. A chunk no tier has ends the run: nothing after its batch is fetched.
        """
        fetched: set[bytes] = set()
        if not self.lower or not wants:
            return fetched
        tokens, first = max(w.num_tokens for w in wants), self.lower[0].codec
        chunk_bytes = self._layout().nbytes(tokens) if first is None else first.max_encoded_size(self._layout(), tokens)
        per_batch = max(1, FETCH_BATCH_BYTES // max(1, chunk_bytes))  # by the bytes the first tier reads
        batches = [list(wants[i : i + per_batch]) for i in range(0, len(wants), per_batch)]
        # A single batch has nothing to overlap its read with: it is read on this thread, with no hand-off.
        ahead: Future[Any] | None = self._read_ahead(batches[0]) if len(batches) > 1 else None
        for index, batch in enumerate(batches):
            for order, lower in enumerate(self.lower):
                wanted = [want for want in batch if want.key not in fetched]
                if not wanted:
                    break
                if order == 0 and ahead is None:
                    blobs = self._read_first(batch)
                elif order == 0:
                    blobs = ahead.result()
                    ahead = self._read_ahead(batches[index + 1]) if index + 1 < len(batches) else None
                else:
                    blobs = self.guard(lower.tier, lambda t=lower.tier, w=wanted: t.get([x.key for x in w]), None)
                hits = [(want, blob) for want, blob in zip(wanted, blobs or ()) if blob is not None]
                landed = self._decoders.map(lambda hit, l=lower: self._land(l, *hit), hits)
                served = [want.key for (want, _), ok in zip(hits, landed) if ok]
                fetched.update(served)
                if served:
                    self._count(lower.tier, lower_hits=len(served))
            if any(want.key not in fetched for want in batch):
                break  # the run ends in this batch (a read ahead, if any, finishes unused)
        return fetched

    def prefetch(self, wants: Sequence[Want]) -> Future[int]:
        """Start promoting what memory lacks of `wants` from the lower tiers; `read` waits for it.

        The future resolves to the number of chunks promoted."""
        todo = [Want(want.key, want.num_tokens) for want in wants if want.key not in self.memory]
        if not todo or not self.lower:
            done: Future[int] = Future()
            done.set_result(0)
            return done
        future = self._executor().submit(self.promote, todo)
        with self._lock:
            for want in todo:
                self._inflight.setdefault(want.key, future)
        future.add_done_callback(lambda _: self._clear_inflight(todo, future))
        return future

    def promote(self, wants: Sequence[Want]) -> int:
        """Bring `wants` into memory from the lower tiers now; how many were."""
        return len(self.fetch([Want(w.key, w.num_tokens) for w in wants if w.key not in self.memory]))

    def pin(self, wants: Sequence[Want]) -> list[ChunkLease]:
        """Pin the leading run of `wants` in memory (promoting what only lower tiers hold first)."""
        missing = [want for want in wants if want.key not in self.memory]
        if missing:
            self._wait_inflight([want.key for want in missing])
            missing = [want for want in missing if want.key not in self.memory]
            if missing:
                self.fetch([Want(w.key, w.num_tokens) for w in missing])
        leases: list[ChunkLease] = []
        for want in wants:
            lease = self.memory.lease(want.key)
            if lease is None:  # not held anywhere, or evicted again before it could be pinned
                break
            leases.append(lease)
        return leases

    def fetch_blobs(self, keys: Sequence[bytes]) -> list[Blob | None]:
        """The chunks of `keys` from the lower tiers as their bytes (None where no tier has a sound one),
        never decoded, each promoted into memory as it is (with `keep_in_memory`). Checked like `commit_page`,
        plus the payload checksum where the tier did not check it; a corrupt chunk is counted, dropped and a
        miss. For stores of chunks they do not decode (the server's); memory is not asked."""
        blobs: list[Blob | None] = [None] * len(keys)
        for lower in self.lower:
            wanted = [i for i, blob in enumerate(blobs) if blob is None]
            if not wanted:
                break
            got = self.guard(lower.tier, lambda t=lower.tier: t.get([keys[i] for i in wanted]), None)
            served = 0
            for i, blob in zip(wanted, got or ()):
                if blob is None or not self._sound(lower.tier, keys[i], blob):
                    continue
                blobs[i] = blob
                served += 1
                if self.keep_in_memory:
                    try:
                        self.memory.put([(keys[i], blob)])
                    except (PoolExhaustedError, TierError):
                        pass  # served, just not promoted
            if served:
                self._count(lower.tier, lower_hits=served)
        return blobs

    # --- writes --------------------------------------------------------------------------------------
    def deadline(self) -> float:
        """The end of a backpressure wait starting now (one per caller's operation, shared by its chunks)."""
        return self.writer.deadline() if self.writer is not None else 0.0

    def put(self, key: bytes, num_tokens: int, fill: Fill, deadline: float) -> bool:
        """Copy one chunk into the pool (`fill` writes it, or is it) and queue it for the lower tiers. False if it
        was already held.

        A pool whose every page is pinned (pending writes, readers) gets room from the write-behind's
        policy: backpressure until `deadline`, then a dropped write. `PoolExhaustedError` when the policy
        gives up the new chunk or nothing can be freed.
        """
        lease = self._with_room(lambda: self.memory.store_filled(key, num_tokens, fill), deadline)
        if lease is None:
            return False
        if self.writer is not None:
            self.writer.submit(lease, deadline)
        else:
            lease.release()
        return True

    def reserve_page(self, nbytes: int, deadline: float) -> int:
        """A pool page for a chunk of `nbytes` to be received into, owned by the caller until `commit_page`
        indexes it or `memory.pool.release(page)` gives it back. Room as for `put` (`PoolExhaustedError`
        when the policy gives up the new chunk)."""
        return self._with_room(lambda: self.memory.reserve_page(nbytes), deadline)

    def commit_page(self, key: bytes, page: int, nbytes: int, deadline: float) -> bool:
        """Index a page filled after `reserve_page` as the chunk under `key`, and queue its bytes as they are
        for the lower tiers (pinned from the moment it is indexed). False, the page given back, when its
        first `nbytes` are not a whole chunk stored under `key` (header, length, key; the payload checksum is
        left to whoever decodes it). A key already held keeps its chunk; that is still True."""
        received = memoryview(as_numpy(self.memory.pool.page(page)))[:nbytes]
        try:
            header, _ = split_blob(received, expected_key=key[-KEY_SIZE:], verify=False)
        except CorruptChunkError:
            self.memory.pool.release(page)
            return False
        lease = self.memory.commit_page(key, page, nbytes, header.num_tokens, pin=self.writer is not None)
        if lease is not None and self.writer is not None:
            self.writer.submit(lease, deadline)
        return True

    def delete(self, keys: Sequence[bytes], below: Callable[[Tier], object] | None = None) -> None:
        """Forget `keys` in every tier (queued writes land first: they must not bring a key back).

        `below(tier)` replaces what each lower tier is asked (guarded): the server forgets a whole namespace
        there, of which memory holds only `keys`."""
        if self.writer is not None:
            self.writer.drain()
        self.memory.delete(keys)
        forget = below or (lambda tier: tier.delete(keys))
        for lower in self.lower:
            self.guard(lower.tier, lambda t=lower.tier: forget(t), None)

    def clear(self) -> None:
        """Forget everything in every tier."""
        if self.writer is not None:
            self.writer.drain()
        self.memory.clear()
        for lower in self.lower:
            self.guard(lower.tier, lower.tier.clear, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is written below and durable; False on timeout or a lost write."""
        return True if self.writer is None else self.writer.flush(timeout)

    # --- state ---------------------------------------------------------------------------------------
    def write_stats(self) -> dict[str, int]:
        """Chunks through the write-behind: pending, written, dropped by its policy, not taken by a tier
        (nothing without a write-behind)."""
        if self.writer is None:
            return {}
        counts = self.writer.counts()
        return {"write_pending": counts.pending, "written_chunks": counts.written, "write_dropped": counts.dropped,
                "write_failed_chunks": counts.failed}

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self._counts, f.name) for f in fields(StoreCounters)}

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """A snapshot per tier: its own counters, with the failures and corrupt chunks the store saw of it."""
        data: dict[str, dict[str, Any]] = {"memory": self.memory.stats().as_dict()}
        for lower in self.lower:
            one = lower.tier.stats().as_dict()
            with self._lock:
                seen = self._per_tier[lower.tier.name]
                one["errors"] += seen.tier_errors
                one["corrupt"] += seen.corrupt
            data[lower.tier.name] = one
        return data

    def close(self) -> None:
        """Flush pending writes, stop background work, release the pool, close the lower tiers."""
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            self.writer.close()
        for pool in (self._io, self._fetcher):
            if pool is not None:
                pool.shutdown(wait=True)
        self._decoders.shutdown()
        self._encoders.shutdown()
        self.prefault.join()
        self.memory.close()
        for lower in self.lower:
            self.guard(lower.tier, lower.tier.close, None)

    # --- the guard -----------------------------------------------------------------------------------
    def guard(self, tier: Tier, call: Callable[[], T], default: T) -> T:
        """Run a lower-tier call; any failure is counted, logged once per tier, and returns `default`."""
        try:
            return call()
        except Exception as exc:
            self.tier_failed(tier, exc)
            return default

    def tier_failed(self, tier: Tier, exc: BaseException) -> None:
        self._count(tier, tier_errors=1)
        self.warn(f"tier:{tier.name}", f"tier {tier.name} failed ({exc!r}); treating it as a miss")

    def _count(self, tier: Tier, **amounts: int) -> None:
        with self._lock:
            per_tier = self._per_tier.setdefault(tier.name, StoreCounters())
            for name, amount in amounts.items():
                setattr(self._counts, name, getattr(self._counts, name) + amount)
                setattr(per_tier, name, getattr(per_tier, name) + amount)

    # --- internals -----------------------------------------------------------------------------------
    def _read_ahead(self, batch: list[Want]) -> Future[Any]:
        """Start the first lower tier's read of `batch` on a fetch thread."""
        with self._lock:
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="nencache-fetch")
        return self._fetcher.submit(self._read_first, batch)

    def _read_first(self, batch: list[Want]) -> Any:
        """The first lower tier's blobs of `batch` (None if it failed: counted by `guard`)."""
        tier = self.lower[0].tier
        return self.guard(tier, lambda: tier.get([w.key for w in batch]), None)

    def _land(self, lower: LowerTier, want: Want, blob: Any) -> bool:
        """Decode one fetched chunk, copy it into its `out` and promote it; False if it was corrupt."""
        in_place = self._in_place(lower, blob) if want.out is not None and want.out.device.type == "cpu" else None
        if in_place is not None:
            chunk: torch.Tensor | None = self._decode_into(lower, in_place, want, blob)
        else:
            chunk = self._decode(lower, want, blob)
            if chunk is not None and want.out is not None:
                copy_into(want.out, chunk)
        if chunk is None:
            return False
        if want.out is None or self.keep_in_memory:  # without keep_in_memory, only prefetches stage in the pool
            try:
                self.memory.put_tensor(want.key, chunk)
            except PoolExhaustedError:
                pass  # served, just not promoted
        return True

    @staticmethod
    def _in_place(lower: LowerTier, blob: Any) -> EncodesInPlace | None:
        """`lower`'s codec if it decodes `blob` straight into a tensor (the codec wrote it, unwrapped)."""
        codec = lower.codec
        if codec is None or not isinstance(codec, EncodesInPlace):
            return None
        try:
            header = parse_header(blob)
        except CorruptChunkError:
            return None  # `_decode` counts it
        return codec if header.codec_id == codec.codec_id and header.wrapper_id == 0 else None

    def _decode_into(self, lower: LowerTier, codec: EncodesInPlace, want: Want, blob: Any) -> torch.Tensor | None:
        """Decode `blob` straight into `want.out` (no decoded copy in between); None if it was corrupt, and
        then `want.out` is untouched (the checks come before the first value is written)."""
        assert want.out is not None
        layout = self._layout()
        try:
            if tuple(want.out.shape) != layout.shape(want.num_tokens) or want.out.dtype != layout.dtype:
                raise LayoutError(f"out is {tuple(want.out.shape)} {want.out.dtype}, not this layout's chunk")
            codec.decode_into(blob, want.out, expected_key=want.key, verify=not lower.tier.checks_payload)
            return want.out
        except (CorruptChunkError, LayoutError) as exc:  # the header claims another chunk than was asked for
            self._corrupt(lower.tier, want.key, CorruptChunkError(str(exc)))
            return None

    def _decode(self, lower: LowerTier, want: Want, blob: Any) -> torch.Tensor | None:
        try:
            header = parse_header(blob)
            if header.codec_id == _RAW.codec_id and header.wrapper_id == 0:
                # Copied into the pool and `out` right away: no need for a private copy first.
                chunk = _RAW.view(blob, want.key, verify=not lower.tier.checks_payload)
            elif lower.codec is not None and header.codec_id == lower.codec.codec_id:
                chunk = lower.codec.decode(blob, expected_key=want.key)
            else:  # written by an instance with another codec: the header says which
                chunk = decode_any(blob, expected_key=want.key)
            layout = self._layout()
            if tuple(chunk.shape) != layout.shape(want.num_tokens) or chunk.dtype != layout.dtype:
                raise CorruptChunkError(f"chunk holds {tuple(chunk.shape)} {chunk.dtype}, not this layout")
            return chunk
        except CorruptChunkError as exc:
            self._corrupt(lower.tier, want.key, exc)
            return None

    def _sound(self, tier: Tier, key: bytes, blob: Blob) -> bool:
        """Whether a fetched blob is a whole chunk stored under `key` (see `fetch_blobs`)."""
        try:
            split_blob(blob, expected_key=key[-KEY_SIZE:], verify=not tier.checks_payload)
            return True
        except CorruptChunkError as exc:
            self._corrupt(tier, key, exc)
            return False

    def _corrupt(self, tier: Tier, key: bytes, exc: CorruptChunkError) -> None:
        """A lower tier served a corrupt chunk: counted, warned once, and dropped there."""
        self._count(tier, corrupt=1)
        self.warn(f"corrupt:{tier.name}", f"{tier.name}: dropped a corrupt chunk ({exc})")
        self.guard(tier, lambda: tier.delete([key]), None)

    def _layout(self) -> KVLayout:
        if self.layout is None:
            raise TypeError("this store holds blobs only (built without a layout); use fetch_blobs")
        return self.layout

    def _with_room(self, take: Callable[[], T], deadline: float) -> T:
        """`take()` a pool page; while every page is pinned (pending writes, readers), the write-behind's
        policy makes room (backpressure until `deadline`, then a dropped write) and it is tried again."""
        writer = self.writer
        while True:
            progress = writer.progress if writer is not None else 0
            try:
                return take()
            except PoolExhaustedError:
                if writer is None or not writer.make_room(deadline, progress):
                    raise

    def _wait_inflight(self, keys: list[bytes]) -> None:
        with self._lock:
            futures = {id(f): f for k in keys if (f := self._inflight.get(k)) is not None}
        for future in futures.values():
            try:
                future.result()
            except Exception:  # a failed prefetch is just a miss
                pass

    def _clear_inflight(self, wants: list[Want], future: Future[Any]) -> None:
        with self._lock:
            for want in wants:
                if self._inflight.get(want.key) is future:
                    del self._inflight[want.key]

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="nencache-io")
            return self._io

    def _forget_staged(self, key: bytes) -> None:
        """Without `keep_in_memory`, the pool only stages chunks until they are written below."""
        self.memory.delete([key])
