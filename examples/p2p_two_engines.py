"""P2P between two engines: engine B finds the document's KV in engine A's memory, found through the index.

    python examples/p2p_two_engines.py --index redis://10.0.0.5:6379 [--tiny]

Redis holds only the index (which engine holds which chunk); the chunks go from A to B directly: through
shared memory when both run on one machine, over A's peer endpoint otherwise (set `p2p_host` to an
address B can reach, and `auth_token`, when they do not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from engine import answer, load, prompt

from nencache import CacheConfig
from nencache.integrations.hf import CachedModel


def settings(index: str) -> dict[str, object]:
    return {"cpu_size": "256MiB", "enable_p2p": True, "p2p_index_url": index, "remote_timeout": 5.0}


def serve(index: str, tiny: bool) -> None:
    """Engine A: read the document once, publish its chunks, serve them until stdin closes."""
    loaded = load(tiny)
    cached = CachedModel.wrap(loaded.model, CacheConfig(**settings(index)), model_id="examples-engine")
    ids = prompt(loaded, 300 if tiny else 1500)
    cached.prefill(ids)
    cached.cache.flush()
    print(json.dumps({"ready": True, "address": cached.cache.peer.address}), flush=True)  # type: ignore[union-attr]
    sys.stdin.read()
    cached.cache.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="Redis URL of the P2P index")
    parser.add_argument("--tiny", action="store_true", help="a two-layer random model (a quick check)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # engine A's own process
    args = parser.parse_args()
    if args.serve:
        serve(args.index, args.tiny)
        return
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--index", args.index]
    engine_a = subprocess.Popen(command + (["--tiny"] if args.tiny else []), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert engine_a.stdout is not None
        ready = json.loads(engine_a.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise SystemExit("engine A did not start")
        print(f"engine A holds the document's KV and serves it at {ready['address']}")
        print(f"engine B: {answer(settings(args.index), args.tiny)}")
    finally:
        if engine_a.stdin is not None:
            engine_a.stdin.close()
        engine_a.wait(60)


if __name__ == "__main__":
    main()
