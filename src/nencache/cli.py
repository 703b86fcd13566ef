"""The `nencache` command: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from nencache.config import CacheConfig, load_config
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
        if args.command == "demo":
            from nencache.demo import run_demo

            run_demo(args.model, args.doc_tokens, args.max_new_tokens, loaded.config)
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
