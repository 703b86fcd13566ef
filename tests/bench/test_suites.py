"""Each suite of `nencache bench`, run for real at a tiny scale: it measures what it says, beside its reference."""

from __future__ import annotations

import pytest

from nencache.bench.context import BenchContext
from nencache.bench.suites import disk, latency, memory, p2p, tiers, trace, ttft
from tests.redis_util import require_redis


def no_failures(notes: list[str]) -> None:
    assert not [note for note in notes if "failed" in note], notes


def test_tiers_measures_each_tier_beside_this_machines_limit(bench_context: BenchContext) -> None:
    require_redis()
    result = tiers.run(bench_context)
    no_failures(result.notes)
    measured = {name.split(":")[0] for name in result.figures}
    assert measured == {"CPU memory", "disk", "Redis", "server"}
    for name, figure in result.figures.items():
        assert len(figure["gbps"]) == bench_context.scale.reps and min(figure["gbps"]) > 0, name
        assert figure["reference"] and min(figure["reference_gbps"]) > 0, name
        assert figure["ratio_median"] > 0, name
    references = {figure["reference"] for figure in result.figures.values()}
    assert references == {"memcpy (copy_)", "dd oflag=direct conv=fsync", "dd iflag=direct", "redis-benchmark SET",
                          "redis-benchmark GET", "raw socket"}
    assert any("chunks copied out of its shared pool: " in note and not note.endswith(": 0") for note in result.notes)


def test_latency_checks_the_cpu_and_disk_targets_per_tier(bench_context: BenchContext) -> None:
    require_redis()
    result = latency.run(bench_context)
    assert {"CPU memory tier (read_into)", "CPU memory tier, back to back (read_into)", "disk tier, from the device",
            "Redis", "server, shared pool"} <= set(result.figures)
    for name, figure in result.figures.items():
        assert len(figure["samples_us"]) == bench_context.scale.samples
        assert 0 < figure["p50_us"] <= figure["p99_us"], name
    goals = {target.name: target for target in result.targets}
    cpu = goals["CPU tier access (8 KiB chunk)"]
    assert cpu.goal == "p50 < 10 us" and "back to back: p50 " in cpu.measured
    assert cpu.met == (result.figures["CPU memory tier (read_into)"]["p50_us"] < 10)  # judged on the interleaved reads
    assert all(target.met is not None for target in result.targets)


def test_p2p_reads_a_local_peer_through_shared_memory_and_a_remote_one_over_the_socket(
        bench_context: BenchContext) -> None:
    require_redis()
    result = p2p.run(bench_context)
    copied = result.figures["chunks copied out of the peer's shared pool"]
    assert copied["same machine"] > 0 and copied["across machines"] == 0
    for size in p2p.SIZES:
        for way in ("same machine", "across machines"):
            figure = result.figures[f"{size}, {way}"]
            assert figure["total_p50_us"] >= figure["fetch_p50_us"] > 0
            assert figure["raw_socket_p50_us"] > 0
    assert [t.name for t in result.targets] == ["P2P, same machine (5.9 MB chunk)",
                                                "P2P, across machines: against a raw socket",
                                                "P2P, across machines: chunks up to 1 MiB"]
    assert all(t.met is not None for t in result.targets)


def test_memory_counts_resident_bytes_per_token_and_compares_with_lmcache_where_installed(
        bench_context: BenchContext) -> None:
    result = memory.run(bench_context)
    per_token = {name: figure["median"] for name, figure in result.figures.items()}
    kv = memory.SMOLLM2.bytes_per_token
    assert per_token["NenCache raw"] >= kv  # the KV itself is resident
    pool = {name: figure["pool_bytes_per_token"] for name, figure in result.figures.items() if name != "LMCache"}
    assert pool["NenCache int8"] < 0.55 * pool["NenCache raw"] and pool["NenCache fp8"] < 0.55 * pool["NenCache raw"]
    [target] = result.targets
    if bench_context.lmcache_python is None:
        assert target.met is None and "not installed" in target.measured
    else:
        assert per_token["LMCache"] >= kv and target.met is not None


def test_disk_moves_fewer_bytes_with_lossy_codecs_and_measures_tokens_per_second(
        bench_context: BenchContext) -> None:
    result = disk.run(bench_context)
    no_failures(result.notes)
    for codec in disk.CODECS:
        figure = result.figures[codec]
        assert len(figure["store_tokens_per_s"]) == bench_context.scale.reps and min(figure["store_tokens_per_s"]) > 0
        assert min(figure["retrieve_tokens_per_s"]) > 0
    on_disk = {row[0]: row[1] for row in result.tables[0].rows}
    assert float(on_disk["int8"]) < 0.6 and float(on_disk["zstd+int4"]) < 0.4
    [target] = result.targets
    assert (target.met is None) == (bench_context.lmcache_python is None)
    if bench_context.lmcache_python is not None:
        assert min(result.figures["LMCache raw"]["store_tokens_per_s"]) > 0


@pytest.mark.slow
def test_ttft_reports_the_speedup_and_the_dtype_it_chose(bench_context: BenchContext) -> None:
    pytest.importorskip("transformers")
    result = ttft.run(bench_context)
    figure = result.figures["context 256"]
    assert min(figure["no_cache_s"]) > 0 and min(figure["cpu_tier_s"]) > 0 and min(figure["disk_tier_s"]) > 0
    assert result.figures["dtype"]["dtype"] in ("bf16", "fp32") and result.figures["dtype"]["reason"]
    assert any(note.startswith("dtype ") for note in result.notes)
    assert any(note.startswith("vLLM: not installed here") for note in result.notes)  # the main venv has no vLLM
    [target] = result.targets
    assert target.name == "TTFT savings" and target.met is not None


def test_trace_replays_every_policy_through_the_simulator(bench_context: BenchContext) -> None:
    result = trace.run(bench_context)
    for policy in trace.POLICIES:
        figure = result.figures[f"{policy} at 5%"]
        assert figure["requests"] == bench_context.scale.trace_requests
        assert 0 <= figure["cpu_hit_rate"] <= figure["token_hit_rate"] <= 1
    belady = result.figures["belady at 5%"]["cpu_hit_rate"]
    assert all(result.figures[f"{p} at 5%"]["cpu_hit_rate"] <= belady + 1e-9 for p in trace.POLICIES)
