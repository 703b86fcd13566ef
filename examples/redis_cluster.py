"""Redis Cluster as the shared tier: one engine stores the document's KV, another engine finds it there.

    python examples/redis_cluster.py --url redis-cluster://10.0.0.5:7000,10.0.0.6:7000,10.0.0.7:7000 [--tiny]

Any node list works; NenCache reads the slot map from the cluster and follows MOVED/ASK redirections.
Chunks are spread over the nodes by key; the CPU tier of each engine stays in front of it.
"""

from __future__ import annotations

import argparse

from engine import run_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="redis-cluster://host:port,host:port,...")
    parser.add_argument("--tiny", action="store_true", help="a two-layer random model (a quick check)")
    args = parser.parse_args()
    settings = {"cpu_size": "256MiB", "remote_url": args.url, "remote_timeout": 5.0, "remote_ttl": 3600}
    for name in ("engine 1", "engine 2"):
        result = run_engine(settings, args.tiny)
        print(f"{name}: {result['cached']} of {result['prompt']} prompt tokens from the cache, "
              f"TTFT {result['ttft_ms']} ms")


if __name__ == "__main__":
    main()
