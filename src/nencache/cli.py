"""The `nencache` command: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from nencache.config import CacheConfig
from nencache.config_loader import load_config
from nencache.errors import NenCacheError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nencache", description="NenCache: a multi-tier KV cache for LLM inference.")
    parser.add_argument("--config", help="YAML config file (also NENCACHE_CONFIG_FILE / LMCACHE_CONFIG_FILE)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="a real model answers questions about a long document, "
                                            "without and with the cache, with TTFT for each")
    demo.add_argument("--model", help="HF model id, directory or .gguf file (default: packaged SmolLM2-135M-Instruct)")
    demo.add_argument("--doc-tokens", type=int, default=3000, help="length of the shared document (default 3000)")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate per answer (default 24)")
    demo.add_argument("--dtype", default="auto", help="auto (bf16 where this machine computes it natively, else "
                                                      "fp32), bf16 or fp32 (default auto)")

    show = commands.add_parser("config", help="print the effective config and where each value came from")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")

    serve = commands.add_parser("serve", help="run a NenCache server that KV caches share (remote_url nencache://...)")
    serve.add_argument("--host", help="address to bind (default server_host, 127.0.0.1); any other address "
                                      "needs auth_token / NENCACHE_AUTH_TOKEN")
    serve.add_argument("--port", type=int, help="data port (default server_port, 5870; 0: any free port)")
    serve.add_argument("--admin-port", type=int, help="admin HTTP port for /healthz, /metrics, /stats "
                                                      "(default server_admin_port, 5871; 0: any free port; -1: none)")
    serve.add_argument("--config", default=argparse.SUPPRESS, help="YAML config file (pool size: cpu_size, "
                                                                   "disk tier: disk_path/disk_size, server_* limits)")

    sim = commands.add_parser(
        "sim", help="replay a request trace through the tiers' policies and report hit rates and costs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay a request trace through the real memory-tier and disk-tier code (no payload bytes) "
                    "and report the token hit rate per tier, prefill seconds saved, bytes moved, prefetch waste "
                    "and the policies' decision time per chunk access.",
        epilog="trace formats:\n"
               "  Mooncake JSONL, one request a line:\n"
               '    {"timestamp": <ms>, "input_length": <tokens>, "hash_ids": [<block id>, ...]}\n'
               "  plain text, one request a line ('#' starts a comment):\n"
               "    <seconds> <input tokens> <block id> <block id> ...\n"
               "  Block ids name prefix blocks of --block-tokens tokens: equal ids are reusable prefix KV.\n"
               "capacities: a share of the trace's unique blocks ('5%' or 0.05), a size ('64GiB', with\n"
               "  --kv-bytes-per-token), or a count ('2000 chunks').")
    sim.add_argument("trace", help="trace file (Mooncake JSONL or plain text, see below)")
    sim.add_argument("--cpu-capacity", default="5%", help="CPU tier size (default 5%%)")
    sim.add_argument("--disk-capacity", help="disk tier size (default: no disk tier)")
    sim.add_argument("--policy", default=None, help="eviction policy: lru, leaf-lru, s3fifo, learned, belady "
                                                   "(default: the config's eviction)")
    sim.add_argument("--prefetch", default=None, help="off or learned (default: the config's prefetch)")
    sim.add_argument("--block-tokens", type=int, default=512, help="tokens per trace block (default 512)")
    sim.add_argument("--prefill-us-per-token", type=float, default=100.0, help="prefill cost (default 100)")
    sim.add_argument("--cpu-load-us-per-token", type=float, default=5.2, help="load cost from the CPU tier (default 5.2)")
    sim.add_argument("--disk-load-us-per-token", type=float, default=44.0, help="load cost from disk (default 44)")
    sim.add_argument("--kv-bytes-per-token", type=int, default=131072, help="KV bytes of one token (default 131072)")
    sim.add_argument("--prefetch-max-waste", type=float, default=0.2,
                     help="prefetch only when at most this share of the bytes is expected to go unused (default 0.2)")
    sim.add_argument("--prefetch-bandwidth", default="1GiB", help="promotion budget per second (default 1GiB)")
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    bench = commands.add_parser(
        "bench", help="measure NenCache on this machine against its limits (and LMCache), with an HTML report",
        description="Measure NenCache against the tiers of your config (disk_path, remote_url, p2p_index_url) and "
                    "against what this machine allows (memcpy, dd with direct I/O, redis-benchmark, a raw socket); "
                    "where no Redis or NenCache server is configured, throwaway ones are started. Writes bench.json, "
                    "PNG plots and report.html into --out.")
    bench.add_argument("suites", nargs="*", metavar="SUITE",
                       help="tiers, latency, p2p, memory, disk, ttft, trace (default: all)")
    bench.add_argument("--quick", action="store_true", help="small runs (about a minute a suite): indicative figures")
    bench.add_argument("--out", default="nencache-bench", help="directory for the report (default ./nencache-bench)")
    bench.add_argument("--compare", action="append", default=[], choices=["lmcache"],
                       help="also measure LMCache where it is installed (memory and disk suites)")
    bench.add_argument("--lmcache-python", help="an interpreter that imports LMCache (default: this one, else "
                                                "./.venv-lmcache/bin/python)")
    bench.add_argument("--trace", help="request trace for the trace suite (Mooncake JSONL or plain; default: a "
                                       "synthetic conversation trace)")
    bench.add_argument("--wait-idle", type=float, default=0.0, metavar="MINUTES",
                       help="wait up to this long for the machine to go idle before measuring (default 0)")

    stats = commands.add_parser("stats", help="print a running server's counters (its admin /stats) as a table")
    stats.add_argument("--url", help="admin endpoint (default http://127.0.0.1:<server_admin_port>)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = load_config(args.config)
        if args.command == "config":
            return print_config(loaded.config, loaded.sources, as_json=args.json)
        if args.command == "serve":
            from nencache.server.command import serve_command

            return serve_command(loaded, config_file=args.config, host=args.host, port=args.port,
                                 admin_port=args.admin_port)
        if args.command == "stats":
            from nencache.server.command import stats_command

            return stats_command(loaded, url=args.url, as_json=args.json)
        if args.command == "sim":
            from nencache.policy.sim_command import SimArgs, run_sim

            return run_sim(SimArgs(
                args.trace, args.cpu_capacity, args.disk_capacity, args.policy or loaded.config.eviction,
                args.prefetch or loaded.config.prefetch, args.block_tokens, args.prefill_us_per_token,
                args.cpu_load_us_per_token, args.disk_load_us_per_token, args.kv_bytes_per_token,
                args.prefetch_max_waste, args.prefetch_bandwidth, args.json))
        if args.command == "bench":
            from nencache.bench.command import BenchArgs, parse_suites, run_bench

            command = "nencache " + " ".join(sys.argv[1:] if argv is None else argv)
            return run_bench(BenchArgs(parse_suites(args.suites), args.quick, args.out, args.compare,
                                       args.lmcache_python, args.trace, args.wait_idle, command), loaded.config)
        if args.command == "demo":
            from nencache.demo import run_demo

            run_demo(args.model, args.doc_tokens, args.max_new_tokens, loaded.config, dtype=args.dtype)
            return 0
    except NenCacheError as exc:
        print(f"nencache: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def print_config(config: CacheConfig, sources: dict[str, str], *, as_json: bool) -> int:
    values = config.as_dict()
    if as_json:
        print(json.dumps({k: {"value": v, "source": sources.get(k, "default")} for k, v in values.items()}, indent=2))
        return 0
    width = max(len(k) for k in values)
    for key, value in values.items():
        shown = "***" if key == "auth_token" and value else value
        print(f"{key:<{width}}  {shown!s:<24}  {sources.get(key, 'default')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
