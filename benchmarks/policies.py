"""Eviction and prefetch policies on a real request trace, through the real tier code (`nencache sim`).

For each capacity (a share of the trace's unique blocks): every policy's token hit rate, the share of
the LRU -> Belady gap it closes, and its decision time per chunk access (median and range over reps,
policies interleaved rep by rep). Then learned prefetch with a disk tier below the CPU tier, the
policies measured on the second half of the trace only (the first half warms them up), and on
synthetic conversation traces they were never looked at on. Writes its section of RESULTS.md and a
PNG plot of hit rate against capacity.

    python benchmarks/policies.py [--trace PATH] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import table, write_section  # noqa: E402

from nencache.policy.calls import replay_calls  # noqa: E402
from nencache.policy.simulate import SimConfig, SimResult, simulate  # noqa: E402
from nencache.policy.synthetic import ConversationModel, conversation_trace  # noqa: E402
from nencache.policy.trace import Trace, load_trace  # noqa: E402

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_conversation.jsonl"
PLOT = Path(__file__).resolve().parent / "policies_hit_rate.png"
CAPACITIES = (0.01, 0.02, 0.05, 0.10, 0.25)
GOAL_CAPACITIES = (0.01, 0.05, 0.10)
POLICIES = ("lru", "leaf-lru", "s3fifo", "learned", "belady")
ONLINE = POLICIES[:-1]
SYNTHETIC = {
    "default": ConversationModel(),
    "quick follow-ups": ConversationModel(think_median=25.0, think_sigma=0.6, continue_base=0.45),
    "long documents, rare follow-ups": ConversationModel(first_blocks=(20, 120), continue_base=0.15,
                                                         continue_growth=0.15, think_median=200.0, rate=0.8),
}


def chunks(trace: Trace, share: float) -> int:
    return max(1, round(share * trace.unique_blocks()))


def gap_closed(value: float, lru: float, belady: float) -> float:
    return (value - lru) / (belady - lru) if belady > lru else float("nan")


def us(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def cpu_us(trace: Trace, policy: str, calls: list[tuple]) -> float:
    """Decision CPU time per chunk access: the run's policy calls replayed alone (not for belady, which
    needs the simulator's oracle)."""
    if policy == "belady":
        return float("nan")
    seconds = replay_calls(calls, policy, 1, trace.block_tokens, learn=policy == "learned",
                           max_keys=max(1 << 16, 4 * trace.unique_blocks()))
    return seconds * 1e6 / trace.num_blocks


def main_table(trace: Trace, reps: int) -> tuple[str, dict[tuple[float, str], SimResult], dict[tuple[float, str], list[float]]]:
    results: dict[tuple[float, str], SimResult] = {}
    times: dict[tuple[float, str], list[float]] = {}
    walls: dict[tuple[float, str], list[float]] = {}
    for rep in range(reps):
        for share in CAPACITIES:
            for policy in POLICIES:
                calls: list[tuple] = []
                result = simulate(trace, SimConfig(cpu_chunks=chunks(trace, share), policy=policy),
                                  calls=calls if policy != "belady" else None)
                results[(share, policy)] = result
                times.setdefault((share, policy), []).append(cpu_us(trace, policy, calls))
                walls.setdefault((share, policy), []).append(result.decision_us)
                del calls
                print(f"rep {rep} {share:.0%} {policy}: {result.token_hit_rate:.4f} cpu {times[(share, policy)][-1]:.2f} "
                      f"wall {result.decision_us:.2f} us", file=sys.stderr, flush=True)
    parts = []
    for share in CAPACITIES:
        lru, belady = results[(share, "lru")], results[(share, "belady")]
        rows = []
        for policy in POLICIES:
            r = results[(share, policy)]
            rows.append((policy, f"{r.token_hit_rate:.4f}", f"{r.block_hit_rate:.4f}",
                         f"{gap_closed(r.token_hit_rate, lru.token_hit_rate, belady.token_hit_rate):.2f}",
                         r.cpu_evictions, us(times[(share, policy)]) if policy != "belady" else "-",
                         us(walls[(share, policy)])))
        parts.append(f"### capacity {share:.0%} ({chunks(trace, share)} chunks)\n\n" + table(
            ["policy", "token hit rate", "block hit rate", "LRU->Belady gap closed", "evictions",
             "decision us per access: CPU time, median (range)", "wall clock in the run"], rows))
    return "\n\n".join(parts), results, times


def goals(results: dict[tuple[float, str], SimResult], times: dict[tuple[float, str], list[float]]) -> str:
    """The issue's goals per capacity: the gap closed at 1, 5 and 10%; beating leaf-lru and s3fifo, and the
    decision cost, at every capacity measured."""
    rows = []
    for share in CAPACITIES:
        get = lambda p: results[(share, p)].token_hit_rate  # noqa: E731
        closed = gap_closed(get("learned"), get("lru"), get("belady"))
        beats = get("learned") > max(get("leaf-lru"), get("s3fifo"))
        cost = statistics.median(times[(share, "learned")])
        verdict = ("met" if closed >= 0.5 else "not met") if share in GOAL_CAPACITIES else "no goal at this capacity"
        rows.append((f"{share:.0%}", f"{closed:.2f} ({verdict})",
                     f"{get('learned'):.4f} vs {get('leaf-lru'):.4f} / {get('s3fifo'):.4f} ({'met' if beats else 'not met'})",
                     f"{cost:.2f} ({'met' if cost <= 5 else 'not met'})"))
    return table(["capacity", "gap closed (goal >= 0.5 at 1, 5, 10%)", "learned vs leaf-lru / s3fifo (goal: beats both)",
                  "learned decision us, CPU time (goal <= 5)"], rows)


def prefetch_table(trace: Trace) -> str:
    rows = []
    for share in GOAL_CAPACITIES:
        base = SimConfig(cpu_chunks=chunks(trace, share), disk_chunks=trace.unique_blocks(), policy="learned")
        for prefetch, waste in (("off", 0.2), ("learned", 0.2), ("learned", 0.5), ("learned", 0.8)):
            r = simulate(trace, replace(base, prefetch=prefetch, prefetch_max_waste=waste))
            wasted = r.prefetch_waste_bytes / r.prefetch_bytes if r.prefetch_bytes else 0.0
            rows.append((f"{share:.0%}", prefetch if prefetch == "off" else f"learned, max_waste {waste}",
                         f"{r.cpu_hit_rate:.4f}", f"{r.disk_hit_rate:.4f}", f"{r.prefetch_conversion:.3f}",
                         f"{r.prefetch_bytes / 2**30:.1f}", f"{wasted:.2f}", f"{r.decision_us:.2f}"))
            print(f"prefetch {share:.0%} {prefetch} {waste}: {rows[-1]}", file=sys.stderr, flush=True)
    return table(["CPU capacity", "prefetch", "CPU hit rate", "disk hit rate", "disk hits turned CPU hits (goal >= 0.30)",
                  "prefetched GiB", "share wasted (goal <= 0.20)", "decision us"], rows)


def split_table(trace: Trace) -> str:
    half = trace.num_requests // 2
    rows = []
    for share in GOAL_CAPACITIES:
        rates = {p: simulate(trace, SimConfig(cpu_chunks=chunks(trace, share), policy=p, measure_from=half)).token_hit_rate
                 for p in POLICIES}
        rows.append((f"{share:.0%}", *(f"{rates[p]:.4f}" for p in POLICIES),
                     f"{gap_closed(rates['learned'], rates['lru'], rates['belady']):.2f}"))
    return table(["capacity", *POLICIES, "learned: gap closed"], rows)


def synthetic_table() -> str:
    rows = []
    for name, model in SYNTHETIC.items():
        trace = conversation_trace(model, seed=1)
        for share in GOAL_CAPACITIES:
            rates = {p: simulate(trace, SimConfig(cpu_chunks=chunks(trace, share), policy=p)).token_hit_rate
                     for p in POLICIES}
            rows.append((name, f"{share:.0%}", *(f"{rates[p]:.4f}" for p in POLICIES),
                         f"{gap_closed(rates['learned'], rates['lru'], rates['belady']):.2f}"))
            print(f"synthetic {name} {share:.0%}: {rows[-1]}", file=sys.stderr, flush=True)
    return table(["trace", "capacity", *POLICIES, "learned: gap closed"], rows)


def plot(results: dict[tuple[float, str], SimResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in POLICIES:
        ax.plot([100 * s for s in CAPACITIES], [results[(s, policy)].token_hit_rate for s in CAPACITIES],
                marker="o", linestyle="--" if policy == "belady" else "-", label=policy)
    ax.set_xscale("log")
    ax.set_xticks([100 * s for s in CAPACITIES], [f"{100 * s:g}%" for s in CAPACITIES])
    ax.set_xlabel("CPU tier capacity (share of the trace's unique blocks)")
    ax.set_ylabel("token hit rate")
    ax.set_title("Mooncake conversation trace: hit rate against capacity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    trace = load_trace(args.trace)
    load_before = os.getloadavg()[0]
    body, results, times = main_table(trace, args.reps)
    load_after = os.getloadavg()[0]
    plot(results)
    text = [
        f"Trace `{args.trace.name}`: {trace.num_requests} requests, {trace.num_blocks} block accesses, "
        f"{trace.unique_blocks()} unique blocks of {trace.block_tokens} tokens. Each policy replays the trace "
        "through the real `MemoryTier` (one-byte pages, no payload) with the cache's request steps (lookup, "
        "retrieve, store); token hit rate counts each block's real tokens (the last block of a request is "
        "partial), block hit rate counts every block as a full one (the measure of the trace's README: LRU "
        "0.052 / 0.195 / 0.278 / 0.353 at 1 / 5 / 10 / 25%). Belady evicts orphans (chunks whose parent is not "
        "held) first, then the farthest next use. Decision time per chunk access covers the policy calls and, "
        "for leaf-lru and learned, the access history they read. It is measured twice: as the CPU time of "
        "the run's policy calls replayed alone through fresh policies (`nencache.policy.calls`; the replay "
        "checks that every victim is the same, and its loop overhead, about 0.1 us a call, is included), "
        "and as the wall-clock time inside the calls during the run, which on a busy machine also counts "
        f"time spent waiting for a CPU. Medians and ranges over {args.reps} reps, policies interleaved "
        f"within each rep. The machine is shared: its load average was {load_before:.1f} before and "
        f"{load_after:.1f} after these runs (2 cores).",
        "### goals\n\n" + goals(results, times),
        body,
        f"![hit rate against capacity]({PLOT.name})",
        "### learned prefetch (CPU tier as above, disk tier holding every unique block, learned eviction)\n\n"
        "A prefetch promotes a conversation's chunks before its predicted next turn; `max_waste` is the share "
        "of prefetched bytes the planner accepts to lose (it plans only when the lower 95% bound of the chance "
        "of use within the CPU tier's residence time is at least 1 - max_waste). Disk hits turned CPU hits: "
        "CPU hits on prefetched chunks over those plus the disk hits left.\n\n" + prefetch_table(trace),
        "### second half only (the first half warms the tiers and the model up)\n\n" + split_table(trace),
        "### synthetic conversation traces (`nencache.policy.synthetic`, seed 1; no setting was chosen on them "
        "or on the trace above)\n\n" + synthetic_table(),
    ]
    write_section("policies: eviction and prefetch on a request trace", "\n\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
