"""`nencache sim`: replay a trace, print per-tier hit rates, prefill time saved, bytes moved, decision cost."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

from nencache.errors import ConfigError
from nencache.policy.simulate import CostModel, SimConfig, SimResult, simulate
from nencache.policy.trace import Trace, load_trace
from nencache.sizes import parse_size

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")
PROGRESS_FROM = 2000  # requests: a bar on longer replays


@dataclass(slots=True)
class SimArgs:
    """The `sim` subcommand's options, as parsed by the CLI."""

    trace: str
    cpu_capacity: str = "5%"
    disk_capacity: str | None = None
    policy: str = "lru"
    prefetch: str = "off"
    block_tokens: int = 512
    prefill_us_per_token: float = 100.0
    cpu_load_us_per_token: float = 5.2
    disk_load_us_per_token: float = 44.0
    kv_bytes_per_token: int = 131072
    prefetch_max_waste: float = 0.2
    prefetch_bandwidth: str = "1GiB"
    as_json: bool = False


def capacity_chunks(text: str, trace: Trace, chunk_bytes: int, what: str) -> int:
    """Chunks a capacity stands for: a fraction of the trace's unique blocks ('5%', '0.05'), a size ('4GiB'),
    or a count of chunks ('2000 chunks')."""
    spec = text.strip().lower()
    if spec.endswith("chunks"):
        try:
            return int(spec.removesuffix("chunks").strip())
        except ValueError:
            raise ConfigError(f"{what} {text!r}: expected e.g. '2000 chunks'") from None
    match = _FRACTION.match(spec)
    if match and (match.group(2) or float(match.group(1)) <= 1.0):
        share = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
        if not 0.0 < share <= 1.0:
            raise ConfigError(f"{what} {text!r}: a share of the trace's blocks must be in (0, 100%]")
        return max(1, round(share * trace.unique_blocks()))
    return parse_size(text, key=what) // chunk_bytes


def run_sim(args: SimArgs) -> int:
    trace = load_trace(args.trace, block_tokens=args.block_tokens)
    cost = CostModel(prefill_s_per_token=args.prefill_us_per_token * 1e-6,
                     cpu_load_s_per_token=args.cpu_load_us_per_token * 1e-6,
                     disk_load_s_per_token=args.disk_load_us_per_token * 1e-6,
                     kv_bytes_per_token=args.kv_bytes_per_token)
    chunk_bytes = args.block_tokens * args.kv_bytes_per_token
    config = SimConfig(
        cpu_chunks=capacity_chunks(args.cpu_capacity, trace, chunk_bytes, "--cpu-capacity"),
        disk_chunks=capacity_chunks(args.disk_capacity, trace, chunk_bytes, "--disk-capacity") if args.disk_capacity else 0,
        policy=args.policy, prefetch=args.prefetch, cost=cost, prefetch_max_waste=args.prefetch_max_waste,
        prefetch_bandwidth=float(parse_size(args.prefetch_bandwidth, key="--prefetch-bandwidth")))
    result = simulate(trace, config, progress=trace.num_requests >= PROGRESS_FROM and sys.stderr.isatty())
    if args.as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(report(result, trace))
    return 0


def report(result: SimResult, trace: Trace) -> str:
    """The figures of one replay as aligned text."""
    gib = float(1 << 30)
    prefetched = result.prefetch_bytes
    rows = [
        ("trace", f"{trace.num_requests} requests, {trace.num_blocks} block accesses, {trace.unique_blocks()} unique "
                  f"blocks of {trace.block_tokens} tokens"),
        ("tiers", f"CPU {result.cpu_chunks} chunks" + (f", disk {result.disk_chunks} chunks" if result.disk_chunks else "")),
        ("policy", f"eviction {result.policy}, prefetch {result.prefetch}"),
        ("token hit rate", f"{result.token_hit_rate:.4f}  (CPU {result.cpu_hit_rate:.4f}, disk {result.disk_hit_rate:.4f}; "
                           f"blocks {result.block_hit_rate:.4f})"),
        ("prefill saved", f"{result.prefill_seconds_saved:.1f} s"),
        ("bytes moved", f"disk->CPU {result.bytes_disk_to_cpu / gib:.1f} GiB, CPU->disk {result.bytes_cpu_to_disk / gib:.1f} GiB"),
        ("evictions", f"CPU {result.cpu_evictions}, disk {result.disk_evictions}"),
        ("prefetch", f"{prefetched / gib:.2f} GiB promoted, {result.prefetch_waste_bytes / gib:.2f} GiB wasted "
                     f"({result.prefetch_waste_bytes / max(1, prefetched):.0%}), turned {result.prefetch_conversion:.1%} "
                     "of disk hits into CPU hits"),
        ("decision time", f"{result.decision_us:.2f} us per chunk access ({result.decision_seconds:.2f} s in all; "
                          f"replay took {result.wall_seconds:.1f} s)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
