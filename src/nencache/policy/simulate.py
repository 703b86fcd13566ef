"""Replay a request trace through the real tier code, with a clock and no payload bytes.

The CPU tier is a real `MemoryTier` over a `MemoryPool` of one-byte pages (one page per chunk, as in
the cache); the disk tier is the real `LruIndex` of the disk tier, bounded by bytes as `DiskTier`
bounds it. Both order their evictions with the policy under test. Each request goes through the
steps `KVCache` takes for an engine: the history observes its chain (`lookup`), the leading run is
looked up tier by tier, the run is read — memory hits first, then the rest fetched from disk and
promoted into memory — and the chunks after the run are stored into memory and written to disk.

Costs come from a `CostModel`; decision time is the time spent inside the policies (and, for the
policies that read it, the access history and the prefetch planner), per chunk access.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


from nencache.errors import ConfigError
from nencache.policy.base import EvictionPolicy, Evictable, Key
from nencache.policy.calls import LoggedPolicy
from nencache.policy.clock import SimClock
from nencache.policy.history import AccessHistory
from nencache.policy.index import PolicyIndex
from nencache.policy.prefetch import PrefetchPlanner
from nencache.config import PREFETCH_POLICIES
from nencache.policy.registry import OBSERVING, PolicyContext, check_policy, make_policy
from nencache.policy.wrappers import MeteredPolicy
from nencache.policy.trace import Trace
from nencache.pool import MemoryPool
from nencache.tiers.disk.index import LruIndex
from nencache.tiers.memory import MemoryTier


@dataclass(slots=True)
class CostModel:
    """Seconds per token to prefill and to load from each tier, and the KV bytes of one token.

    Defaults: an 8B-parameter model with grouped-query attention in 16-bit (32 layers x 8 KV heads x
    128 dims x 2 x 2 bytes = 128 KiB per token), prefilling 10k tokens/s on one GPU; loading at about
    25 GB/s from pinned CPU memory and 3 GB/s from an NVMe disk.
    """

    prefill_s_per_token: float = 1e-4
    cpu_load_s_per_token: float = 5.2e-6
    disk_load_s_per_token: float = 4.4e-5
    kv_bytes_per_token: int = 131072


@dataclass(slots=True)
class SimConfig:
    """What to simulate: tier sizes (CPU in chunks, disk in chunks or 0 for none), policies, costs."""

    cpu_chunks: int
    disk_chunks: int = 0
    policy: str = "lru"
    prefetch: str = "off"
    cost: CostModel = field(default_factory=CostModel)
    prefetch_max_waste: float = 0.2
    prefetch_bandwidth: float = float(1 << 30)  # bytes per second
    measure_from: int = 0  # requests before this one warm the tiers and the model up, uncounted

    def __post_init__(self) -> None:
        if self.cpu_chunks < 1:
            raise ConfigError(f"the CPU tier must hold at least one chunk, got {self.cpu_chunks}")
        if self.disk_chunks < 0:
            raise ConfigError(f"the disk tier size must not be negative, got {self.disk_chunks}")
        check_policy(self.prefetch, PREFETCH_POLICIES, "prefetch")
        if self.prefetch != "off" and not self.disk_chunks:
            raise ConfigError("prefetch needs a disk tier to promote from; give a disk capacity")


@dataclass(slots=True)
class SimResult:
    """Figures of one replay. Rates are shares of the input tokens of the requests counted (from
    `measured_from` on); decision time is over every chunk access (`accesses`)."""

    policy: str
    prefetch: str
    requests: int
    accesses: int  # chunk accesses (blocks over all requests)
    cpu_chunks: int
    disk_chunks: int
    tokens: int  # input tokens of the requests counted
    blocks: int  # chunk accesses of the requests counted
    measured_from: int = 0
    cpu_hit_tokens: int = 0
    disk_hit_tokens: int = 0
    hit_blocks: int = 0
    prefill_seconds_saved: float = 0.0
    bytes_disk_to_cpu: int = 0
    bytes_cpu_to_disk: int = 0
    cpu_evictions: int = 0
    disk_evictions: int = 0
    prefetch_bytes: int = 0
    prefetch_used_bytes: int = 0
    prefetch_waste_bytes: int = 0
    prefetch_hit_tokens: int = 0  # CPU hits on chunks a prefetch brought in
    prefetch_skipped_bytes: int = 0  # planned but over the bandwidth budget
    decision_seconds: float = 0.0
    wall_seconds: float = 0.0
    per_request: list[tuple[int, int]] | None = None  # (CPU hit blocks, disk hit blocks), when recorded

    @property
    def token_hit_rate(self) -> float:
        return (self.cpu_hit_tokens + self.disk_hit_tokens) / max(1, self.tokens)

    @property
    def cpu_hit_rate(self) -> float:
        return self.cpu_hit_tokens / max(1, self.tokens)

    @property
    def disk_hit_rate(self) -> float:
        return self.disk_hit_tokens / max(1, self.tokens)

    @property
    def block_hit_rate(self) -> float:
        """Hit blocks over all blocks: every block weighted as a full one."""
        return self.hit_blocks / max(1, self.blocks)

    @property
    def decision_us(self) -> float:
        return self.decision_seconds * 1e6 / max(1, self.accesses)

    @property
    def prefetch_conversion(self) -> float:
        """Share of would-be disk hits that a prefetch turned into CPU hits."""
        return self.prefetch_hit_tokens / max(1, self.prefetch_hit_tokens + self.disk_hit_tokens)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("per_request")
        data.update(token_hit_rate=self.token_hit_rate, cpu_hit_rate=self.cpu_hit_rate,
                    disk_hit_rate=self.disk_hit_rate, block_hit_rate=self.block_hit_rate,
                    decision_us=self.decision_us, prefetch_conversion=self.prefetch_conversion)
        return data


class TimedPolicy:
    """An `EvictionPolicy` that adds the time spent in it to a shared meter."""

    __slots__ = ("inner", "meter", "name")

    def __init__(self, inner: EvictionPolicy, meter: list[int]) -> None:
        self.inner, self.meter, self.name = inner, meter, inner.name

    def insert(self, key: Key) -> None:
        start = time.perf_counter_ns()
        self.inner.insert(key)
        self.meter[0] += time.perf_counter_ns() - start

    def touch(self, key: Key) -> None:
        start = time.perf_counter_ns()
        self.inner.touch(key)
        self.meter[0] += time.perf_counter_ns() - start

    def remove(self, key: Key) -> None:
        start = time.perf_counter_ns()
        self.inner.remove(key)
        self.meter[0] += time.perf_counter_ns() - start

    def victim(self, evictable: Evictable) -> Key | None:
        start = time.perf_counter_ns()
        key = self.inner.victim(evictable)
        self.meter[0] += time.perf_counter_ns() - start
        return key

    def order(self) -> Iterator[Key]:
        return self.inner.order()

    def __len__(self) -> int:
        return len(self.inner)


class _CpuTier:
    """A `MemoryTier` whose pool pages are one byte: the real index, pinning and eviction, no payload."""

    def __init__(self, chunks: int, policy: EvictionPolicy, on_evict: Callable[[Key], None]) -> None:
        self.tier = MemoryTier(MemoryPool(chunks, 1, pin_memory=False), policy=policy)
        self.tier.on_evict = on_evict  # type: ignore[assignment]

    def read(self, key: Key) -> bool:
        lease = self.tier.lease(key)  # type: ignore[arg-type]
        if lease is None:
            return False
        lease.release()
        return True

    def store(self, key: Key, tokens: int) -> bool:
        """As `put_filled`: a held key counts as used (False); a new one takes a page (True)."""
        lease = self.tier.lease(key, count=False)  # type: ignore[arg-type]
        if lease is not None:
            lease.release()
            return False
        page = self.tier.reserve_page(0)
        self.tier.commit_page(key, page, 0, tokens)  # type: ignore[arg-type]
        return True


class _DiskTier:
    """The disk tier's real `LruIndex`, bounded by bytes as `DiskTier.put` bounds it."""

    def __init__(self, capacity_bytes: int, policy: EvictionPolicy) -> None:
        self.index = LruIndex(PolicyIndex(policy))
        self.capacity = capacity_bytes
        self.evictions = 0

    def contains_prefix(self, keys: list[Key]) -> int:
        entries = self.index.entries
        for count, key in enumerate(keys):
            if key not in entries:
                return count
        return len(keys)

    def put(self, key: Key, size: int) -> None:
        index = self.index
        if index.touch(key) or size > self.capacity:  # type: ignore[arg-type]
            return
        while index.bytes_used + size > self.capacity and len(index):
            index.pop_oldest()
            self.evictions += 1
        index.add(key, size)  # type: ignore[arg-type]
        index.touch(key)  # type: ignore[arg-type]  # DiskTier.put touches what it wrote: recency in write order


def next_uses(trace: Trace) -> list[float]:
    """For each block access, the index of the next request that uses the block (inf: none)."""
    out = [math.inf] * trace.num_blocks
    later: dict[int, int] = {}
    offsets = trace.offsets.tolist()
    ids = trace.ids.tolist()
    for request in range(trace.num_requests - 1, -1, -1):
        for position in range(offsets[request], offsets[request + 1]):
            block = ids[position]
            out[position] = later.get(block, math.inf)
        for position in range(offsets[request], offsets[request + 1]):
            later[ids[position]] = request
    return out


def simulate(trace: Trace, config: SimConfig, *, progress: bool = False, record: bool = False,
             calls: list[tuple] | None = None) -> SimResult:
    """Replay `trace` under `config` and return its figures; `record`: keep the hits of each request;
    `calls`: append every policy call to it (see `calls.replay_calls`)."""
    started = time.perf_counter()
    clock = SimClock()
    context = PolicyContext.create(clock, trace.block_tokens, max_keys=max(1 << 16, 4 * trace.unique_blocks()),
                                   learn=config.policy == "learned" or config.prefetch != "off")
    meter = [0]
    cpu_policy = make_policy(config.policy, context, simulator=True)
    disk_policy = make_policy(config.policy, context, simulator=True) if config.disk_chunks else None
    observes = config.policy in OBSERVING or config.prefetch != "off"
    history: AccessHistory = context.history
    planner = (PrefetchPlanner(history, context.model, max_waste=config.prefetch_max_waste,
                               bandwidth=config.prefetch_bandwidth) if config.prefetch == "learned" else None)
    bytes_per_token = config.cost.kv_bytes_per_token
    counted = int(trace.offsets[min(config.measure_from, trace.num_requests)])
    result = SimResult(config.policy, config.prefetch, trace.num_requests, trace.num_blocks, config.cpu_chunks,
                       config.disk_chunks, int(trace.tokens[counted:].sum()), trace.num_blocks - counted,
                       config.measure_from, per_request=[] if record else None)
    prefetched: dict[Key, int] = {}  # promoted by a prefetch, not read since: key -> tokens

    def evicted(key: Key) -> None:
        tokens = prefetched.pop(key, None)
        if tokens is not None:
            result.prefetch_waste_bytes += tokens * bytes_per_token

    metered = MeteredPolicy(cpu_policy, history)
    first_policy: EvictionPolicy = metered if planner is not None else cpu_policy
    if calls is not None:
        first_policy = LoggedPolicy(first_policy, calls, 0, clock)
    disk_first = (LoggedPolicy(disk_policy, calls, 1, clock) if calls is not None and disk_policy is not None
                  else disk_policy)
    cpu = _CpuTier(config.cpu_chunks, TimedPolicy(first_policy, meter), evicted)
    disk = (_DiskTier(config.disk_chunks * trace.block_tokens * bytes_per_token, TimedPolicy(disk_first, meter))
            if disk_first is not None else None)
    oracle = next_uses(trace) if config.policy == "belady" else None
    ids, tokens, offsets, times = trace.ids.tolist(), trace.tokens.tolist(), trace.offsets.tolist(), trace.times.tolist()
    plans: list[tuple[float, int, list[Key], list[int], float]] = []  # (due, order, keys, tokens, planned at)
    cost = config.cost
    bar = _progress_bar(trace.num_requests) if progress else None

    def promote(key: Key, count: int) -> None:
        disk.index.touch(key)  # type: ignore[union-attr,arg-type]
        cpu.store(key, count)
        result.bytes_disk_to_cpu += count * bytes_per_token

    for request in range(trace.num_requests):
        now = times[request]
        if request == config.measure_from and request:  # the warm-up is over: count from here
            _restart_counts(result, cpu.tier.stats().evicted_chunks, disk)
            prefetched.clear()
        while plans and plans[0][0] <= now:  # prefetches due before this request
            due, _, plan_keys, plan_tokens, planned_at = heapq.heappop(plans)
            slot = history.slot_of.get(plan_keys[-1])
            if slot is None or history.last[slot] != planned_at:
                continue  # the chain came back (or was forgotten) before the plan was due
            clock.now = due
            for key, count in zip(plan_keys, plan_tokens):
                if key in cpu.tier or key not in disk.index:  # type: ignore[union-attr]
                    continue
                size = count * bytes_per_token
                if not planner.spend(size, due):  # type: ignore[union-attr]
                    result.prefetch_skipped_bytes += size
                    continue
                promote(key, count)
                prefetched[key] = count
                result.prefetch_bytes += size
        clock.now = now
        first, end = offsets[request], offsets[request + 1]
        keys, counts = ids[first:end], tokens[first:end]
        if observes:
            tick = time.perf_counter_ns()
            slots = history.observe(keys, counts, now)
            meter[0] += time.perf_counter_ns() - tick
            if calls is not None:
                calls.append(("observe", 0, (keys, counts), now))
        if oracle is not None:
            uses = {key: (oracle[first + depth], depth, keys[depth - 1] if depth else None)
                    for depth, key in enumerate(keys)}
            cpu_policy.next_use = uses  # type: ignore[attr-defined]
            if disk_policy is not None:
                disk_policy.next_use = uses  # type: ignore[attr-defined]
        # lookup: the leading run, memory first, then the disk for what memory lacks
        found = 0
        while found < len(keys):
            found += cpu.tier.contains_prefix(keys[found:])  # type: ignore[arg-type]
            if found == len(keys) or disk is None:
                break
            more = disk.contains_prefix(keys[found:])
            if not more:
                break
            found += more
        # retrieve the run: memory hits, then disk hits promoted
        missing = []
        cpu_blocks = 0
        for key, count in zip(keys[:found], counts[:found]):
            if cpu.read(key):
                cpu_blocks += 1
                result.cpu_hit_tokens += count
                result.prefill_seconds_saved += count * (cost.prefill_s_per_token - cost.cpu_load_s_per_token)
                if prefetched.pop(key, None) is not None:
                    result.prefetch_hit_tokens += count
                    result.prefetch_used_bytes += count * bytes_per_token
            else:
                missing.append((key, count))
        for key, count in missing:
            promote(key, count)
            result.disk_hit_tokens += count
            result.prefill_seconds_saved += count * (cost.prefill_s_per_token - cost.disk_load_s_per_token)
        result.hit_blocks += found
        if result.per_request is not None:
            result.per_request.append((cpu_blocks, len(missing)))
        # store what follows the run: into memory, written behind to disk
        for key, count in zip(keys[found:], counts[found:]):
            if cpu.store(key, count) and disk is not None:
                disk.put(key, count * bytes_per_token)
                result.bytes_cpu_to_disk += count * bytes_per_token
        if planner is not None:
            tick = time.perf_counter_ns()
            full = [i for i, count in enumerate(counts) if count == trace.block_tokens]
            due = planner.plan(slots[full], now, metered.residence) if full else None
            if due is not None:
                heapq.heappush(plans, (due, request, [keys[i] for i in full], [counts[i] for i in full], now))
            meter[0] += time.perf_counter_ns() - tick
        if bar is not None and request % 256 == 255:
            bar.update(256)
    if bar is not None:
        bar.update(trace.num_requests % 256)
        bar.close()
    result.prefetch_waste_bytes += sum(prefetched.values()) * bytes_per_token
    result.cpu_evictions = cpu.tier.stats().evicted_chunks - result.cpu_evictions
    result.disk_evictions = disk.evictions - result.disk_evictions if disk is not None else 0
    result.decision_seconds = meter[0] / 1e9
    result.wall_seconds = time.perf_counter() - started
    return result


def _restart_counts(result: SimResult, cpu_evictions: int, disk: _DiskTier | None) -> None:
    """Zero the hit and traffic counts (eviction counts keep their base, subtracted at the end)."""
    for name in ("cpu_hit_tokens", "disk_hit_tokens", "hit_blocks", "bytes_disk_to_cpu", "bytes_cpu_to_disk",
                 "prefetch_bytes", "prefetch_used_bytes", "prefetch_waste_bytes", "prefetch_hit_tokens",
                 "prefetch_skipped_bytes"):
        setattr(result, name, 0)
    result.prefill_seconds_saved = 0.0
    result.cpu_evictions = cpu_evictions
    result.disk_evictions = disk.evictions if disk is not None else 0
    if result.per_request is not None:
        result.per_request.clear()


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="replaying", leave=False)
