"""Helpers of the P2P tests: a deterministic stand-in for prefill, and a peer `KVCache` in a child process.

The child (`python -m tests.p2p.util CONFIG_JSON`) builds a `KVCache` with `enable_p2p`, prints one
JSON line (its endpoint address and namespace), then answers JSON commands on stdin, one per line:
`{"op": "store", "tokens": [...]}` computes and stores their KV (flushed: published when it answers),
`{"op": "lookup", "tokens": [...]}`, `{"op": "stats"}`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.tiers.peer.index import PeerIndex
from nencache.tiers.peer.mirror import IndexMirror

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
CHUNK = 16
MODEL = "p2p-test-model"
ROOT = Path(__file__).resolve().parents[2]


def compute_kv(tokens: list[int]) -> torch.Tensor:
    """A stand-in for prefill: KV at position i depends on (tokens[i], i), identical in every process."""
    t = torch.tensor(tokens, dtype=torch.int64).view(1, 1, -1, 1, 1)
    pos = torch.arange(len(tokens), dtype=torch.int64).view(1, 1, -1, 1, 1)
    cell = torch.arange(LAYOUT.num_layers * 2 * LAYOUT.num_kv_heads * LAYOUT.head_dim, dtype=torch.int64)
    cell = cell.view(LAYOUT.num_layers, 2, 1, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    mixed = (t * 2654435761 + pos * 40503 + cell * 97) % 65521
    return (mixed.to(torch.float32) / 65521.0 - 0.5).to(LAYOUT.dtype)


def settle(mirror: IndexMirror, index: PeerIndex, timeout: float = 5.0) -> None:
    """Return once `mirror` has applied every announcement made on `index`'s channel before this call: a
    sentinel key is announced after them and, one channel keeping its order, arrives last."""
    sentinel, peer = uuid.uuid4().bytes, f"settle-{uuid.uuid4().hex}:1"
    deadline = time.monotonic() + timeout
    while not mirror.live:  # announcements made before the subscription were never the mirror's to apply
        assert time.monotonic() < deadline, "the mirror did not subscribe"
        time.sleep(0.005)
    index.publish([sentinel], peer)
    while mirror.lookup([sentinel]) == [None]:
        assert time.monotonic() < deadline, "the mirror did not receive the sentinel announcement"
        time.sleep(0.001)
    index.unpublish([sentinel], peer)


def config(index_url: str, **changes: Any) -> CacheConfig:
    base: dict[str, Any] = dict(chunk_size=CHUNK, cpu_size=LAYOUT.nbytes(CHUNK) * 64, pin_memory=False,
                                enable_p2p=True, p2p_index_url=index_url, remote_timeout=0.5)
    return CacheConfig(**(base | changes))


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


@dataclass
class PeerProcess:
    """A peer `KVCache` in a child process (see the module docstring)."""

    settings: dict[str, Any]
    proc: subprocess.Popen[str] | None = None
    address: str = ""
    namespace: str = ""
    log: list[str] = field(default_factory=list)

    def start(self) -> PeerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.p2p.util", json.dumps(self.settings)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = self._read()
        self.address, self.namespace = hello["address"], hello["namespace"]
        return self

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()["result"]

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the child."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer process exited ({self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peer process: {reply['error']}")
        return reply


def _serve(settings: dict[str, Any]) -> None:
    cache = KVCache(CacheConfig(**settings), LAYOUT, MODEL)
    assert cache.peer is not None
    print(json.dumps({"address": cache.peer.address, "namespace": cache.namespace.hex()}), flush=True)  # type: ignore[attr-defined]
    for line in sys.stdin:
        command = json.loads(line)
        try:
            ids = command.get("tokens", [])
            if command["op"] == "store":
                result: Any = cache.store(ids, compute_kv(ids))
                assert cache.flush(timeout=30)
            elif command["op"] == "lookup":
                result = cache.lookup(ids)
            else:
                result = cache.stats()
            print(json.dumps({"result": result}), flush=True)
        except Exception as exc:  # reported to the test, which fails with it
            print(json.dumps({"error": repr(exc)}), flush=True)
    cache.close()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
