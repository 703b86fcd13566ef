"""Tier throughput: NenCache against the physical baseline of each tier, and LMCache 0.5.6 beside it.

    python benchmarks/tiers.py --part cpu      # memory tier vs a raw copy_ (and LMCache's local CPU backend)
    python benchmarks/tiers.py --part disk     # disk tier vs dd
    python benchmarks/tiers.py --part remote   # Redis tier vs redis-benchmark
    python benchmarks/tiers.py                 # all of them

Each part prints a table and writes it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lmcache import ensure_lmcache, run_lmcache  # noqa: E402
from _results import command_line, median, table, write_section  # noqa: E402

from nencache import CacheConfig, KVCache, KVLayout  # noqa: E402

SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_cpu_part(chunks: int, reps: int, chunk_size: int, with_lmcache: bool) -> str:
    """Memory tier store/retrieve of `chunks` chunks against `copy_` of the same bytes, medians over reps."""
    layout = SMOLLM2
    tokens = chunks * chunk_size
    nbytes = layout.nbytes(tokens)
    engine_kv = torch.randn(layout.shape(tokens)).to(layout.dtype)  # the engine's KV, as a connector sees it
    out = torch.empty_like(engine_kv)
    raw_dst = torch.empty_like(engine_kv)
    ids = torch.randint(0, 50000, (tokens,)).tolist()
    cache = KVCache(CacheConfig(chunk_size=chunk_size, cpu_size=int(nbytes * 1.1)), layout, model_id="bench")
    cache.store(ids, engine_kv)  # touch every pool page once: the pool is static, like a pinned one
    cache.retrieve(ids, out=out)
    raw, store, retrieve = [], [], []
    for _ in range(reps):
        raw.append(timed(lambda: raw_dst.copy_(engine_kv)))
        cache.invalidate()
        store.append(timed(lambda: cache.store(ids, engine_kv)))
        out.zero_()
        retrieve.append(timed(lambda: cache.retrieve(ids, out=out)))
        assert torch.equal(out, engine_kv), "retrieved KV differs from the stored KV"
    cache.close()
    gbps = lambda seconds: nbytes / median(seconds) / 1e9  # noqa: E731
    rows = [
        ["raw copy_ (preallocated)", f"{gbps(raw):.2f}", f"{gbps(raw):.2f}", "1.00", "1.00"],
        ["NenCache memory tier", f"{gbps(store):.2f}", f"{gbps(retrieve):.2f}",
         f"{gbps(store) / gbps(raw):.2f}", f"{gbps(retrieve) / gbps(raw):.2f}"],
    ]
    if with_lmcache and ensure_lmcache(install=True):
        result = run_lmcache("cpu", layers=layout.num_layers, kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                             dtype="bf16", chunk_size=chunk_size, chunks=chunks, reps=reps,
                             extra=["--torch-threads", str(torch.get_num_threads())])
        if "error" in result:
            rows.append(["LMCache 0.5.6 local CPU", "error", "error", "-", "-"])
            note = f"\nLMCache: {result['error']}\n"
        else:
            lm_store, lm_retrieve = result["store_gbps"], result["retrieve_gbps"]
            rows.append(["LMCache 0.5.6 local CPU (+1 real copy each way)", f"{lm_store:.2f}", f"{lm_retrieve:.2f}",
                         f"{lm_store / gbps(raw):.2f}", f"{lm_retrieve / gbps(raw):.2f}"])
            note = (f"\nNenCache / LMCache: store {gbps(store) / lm_store:.2f}x, retrieve "
                    f"{gbps(retrieve) / lm_retrieve:.2f}x. LMCache runs in its own process right after NenCache "
                    "(its mock GPU connector copies no bytes, so the benchmark adds the one real copy each way a GPU "
                    "connector makes, and checks the bytes after retrieve).\n")
    else:
        note = "\nLMCache side skipped (no .venv-lmcache; run benchmarks/setup_lmcache.sh).\n"
    body = (f"{chunks} chunks of {chunk_size} tokens, SmolLM2-135M KV shape (30 layers, 3 KV heads, head dim 64, bf16): "
            f"{nbytes / 2**20:.0f} MiB per pass; medians of {reps} passes; GB/s = 1e9 bytes/s; torch intra-op "
            f"threads: {torch.get_num_threads()} on both sides.\n\n"
            + table(["system", "store GB/s", "retrieve GB/s", "store / raw", "retrieve / raw"], rows) + "\n" + note)
    print(body)
    write_section("tiers: CPU memory tier", body, command_line())
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cpu", "disk", "remote", "all"], default="all")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-lmcache", action="store_true", help="skip the LMCache side")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads, the same setting LMCache's side runs with (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.part in ("cpu", "all"):
        run_cpu_part(args.chunks, args.reps, args.chunk_size, not args.no_lmcache)
    if args.part in ("disk", "all"):
        from tiers_disk import run_disk_part

        run_disk_part(args.chunks, min(args.reps, 5))
    if args.part in ("remote", "all"):
        from tiers_remote import run_remote_part

        run_remote_part(reps=min(args.reps, 5))


if __name__ == "__main__":
    main()
