"""`trace`: a request trace replayed through the eviction policies by the simulator of `nencache sim`.

The trace is `--trace` (Mooncake JSONL or the plain format `nencache sim` reads), else a synthetic
conversation trace (`nencache.policy.synthetic`, seed 1). Each policy replays it through the real
memory-tier code at CPU capacities of 1%, 5% and 10% of the trace's unique blocks (quick: 5%, and the
first 3000 requests), with a disk tier holding every block; the figures are those `nencache
sim --json` prints: token hit rate per tier, prefill seconds saved, and the policies' decision time per
chunk access. LRU and Belady (the offline optimum) bound the others. No target: what the trace says.
"""

from __future__ import annotations

from nencache.bench.context import BenchContext
from nencache.bench.results import Plot, Series, SuiteResult, Table, fmt
from nencache.policy.sim_command import capacity_chunks
from nencache.policy.simulate import CostModel, SimConfig, simulate
from nencache.policy.synthetic import ConversationModel, conversation_trace
from nencache.policy.trace import Trace, load_trace

POLICIES = ("lru", "leaf-lru", "s3fifo", "learned", "belady")
BLOCK_TOKENS = 512


def _trace(ctx: BenchContext) -> tuple[Trace, str]:
    if ctx.trace is not None:
        trace, name = load_trace(ctx.trace, block_tokens=BLOCK_TOKENS), ctx.trace.name
    else:
        trace = conversation_trace(ConversationModel(block_tokens=BLOCK_TOKENS), seed=1)
        name = "synthetic conversations (nencache.policy.synthetic, seed 1)"
    limit = ctx.scale.trace_requests
    if limit and trace.num_requests > limit:
        return trace.head(limit), f"{name}, first {limit} requests"
    return trace, name


def run(ctx: BenchContext) -> SuiteResult:
    result = SuiteResult("trace", "Request trace through the eviction policies")
    ctx.progress.step("loading the trace")
    trace, name = _trace(ctx)
    shares = ctx.scale.capacities
    cost = CostModel()
    chunk_bytes = BLOCK_TOKENS * cost.kv_bytes_per_token
    table = Table(["CPU capacity", "policy", "token hit rate", "CPU hit rate", "disk hit rate", "prefill s saved",
                   "decision us per access"], [])
    series = {policy: Series(policy, [], []) for policy in POLICIES}
    for share in shares:
        chunks = capacity_chunks(share, trace, chunk_bytes, "--cpu-capacity")
        for policy in POLICIES:
            ctx.progress.step(f"{policy} at {share}")
            config = SimConfig(cpu_chunks=chunks, disk_chunks=trace.unique_blocks(), policy=policy, cost=cost)
            sim = simulate(trace, config)
            table.rows.append([f"{share} ({chunks} chunks)", policy, f"{sim.token_hit_rate:.4f}",
                               f"{sim.cpu_hit_rate:.4f}", f"{sim.disk_hit_rate:.4f}", fmt(sim.prefill_seconds_saved),
                               "-" if policy == "belady" else f"{sim.decision_us:.2f}"])
            result.figures[f"{policy} at {share}"] = sim.as_dict()
            series[policy].x.append(share)
            series[policy].y.append(sim.cpu_hit_rate)
    result.tables.append(table)
    result.notes.append(f"trace: {name}: {trace.num_requests} requests, {trace.num_blocks} block accesses, "
                        f"{trace.unique_blocks()} unique blocks of {BLOCK_TOKENS} tokens; disk tier holds every block; "
                        "cost model: nencache sim's defaults (an 8B model, 128 KiB of KV per token). Belady knows the "
                        "future: the bound no online policy reaches.")
    result.plots.append(Plot("CPU-tier token hit rate by policy", "CPU hit rate", list(series.values())))
    return result


STEPS = 16
