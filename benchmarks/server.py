"""NenCache server benchmark: chunk throughput against raw loopback sockets, EXISTS latency, LMCache beside it.

- Raw reference: a child process that `recv_into`s / `sendall`s the same bytes over one loopback TCP
  connection from and into preallocated, already-touched buffers (no framing, no index): the ceiling
  for any Python server on this machine.
- NenCache: `nencache serve` as a child process; `ServerTier.put` of a batch of 16 chunk blobs of 4 MiB
  (pipelined frames, received straight into pool pages), then `ServerTier.get` of the batch (sent
  straight from pool pages, header/key/length checked). Fresh keys every rep. GB/s = 1e9 bytes/s.
- EXISTS round trip: `contains_prefix` of one key, one at a time; p50 and p99.
- P2P fetch (`_p2p.py`): one SmolLM2-shaped 256-token chunk (5.9 MB) fetched by one `KVCache` from another
  process's `KVCache` through the P2P index (a throwaway redis-server): index lookup, fetch, check; p50, p99.
- LMCache 0.5.6 (`lmcache_side.py --backend server`: its `lm://` server, `local_cpu=False`) where
  `.venv-lmcache` exists, against NenCache run the same way: a `KVCache` with `remote_url=nencache://...`
  and `local_cpu=False`; store until the server holds every chunk, retrieve into an engine KV tensor
  (every chunk crosses the socket; NenCache also checks each chunk's CRC32 on the way back, LMCache's
  naive serde does not). 16 chunks of 256 tokens (32 layers x 2 KV heads x 64, bf16 = 4 MiB each).

    python benchmarks/server.py [--reps 5] [--no-lmcache] [--p2p-only]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, median, paired_ratio, table, write_section  # noqa: E402

from nencache.cache import KVCache  # noqa: E402
from nencache.config import CacheConfig  # noqa: E402
from nencache.format import HEADER_SIZE, ChunkHeader, checksum  # noqa: E402
from nencache.layout import KVLayout  # noqa: E402
from nencache.tiers.remote import ServerTier  # noqa: E402

MIB = 1 << 20
CHUNK = 4 * MIB
BATCH = 16
SHAPE = (32, 2, 64)  # layers, KV heads, head dim: a 256-token bf16 chunk of exactly 4 MiB
RAW_PEER = r"""
import socket, sys
size, count = int(sys.argv[1]), int(sys.argv[2])
bufs = [memoryview(bytearray(b"x" * size)) for _ in range(count)]
lsock = socket.create_server(("127.0.0.1", 0)); print(lsock.getsockname()[1], flush=True)
conn, _ = lsock.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF): conn.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
while True:
    cmd = conn.recv(1)
    if not cmd: break
    if cmd == b"P":
        for view in bufs:
            got = 0
            while got < size: got += conn.recv_into(view[got:])
        conn.sendall(b"k")
    else:
        for view in bufs: conn.sendall(view)
"""


class RawPeer:
    """The same bytes as the NenCache batch through one loopback connection to a child process that
    `recv_into`s / `sendall`s BATCH distinct preallocated, touched buffers: no framing, no index."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_PEER, str(CHUNK), str(BATCH)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.sock = socket.create_connection(("127.0.0.1", int(self.proc.stdout.readline())))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        self.into = [memoryview(bytearray(b"y" * CHUNK)) for _ in range(BATCH)]

    def send(self, batch: list[tuple[bytes, bytes]]) -> float:
        started = time.perf_counter()
        self.sock.sendall(b"P")
        for _, blob in batch:
            self.sock.sendall(blob)
        assert self.sock.recv(1) == b"k"
        return BATCH * CHUNK / (time.perf_counter() - started) / 1e9

    def receive(self) -> float:
        started = time.perf_counter()
        self.sock.sendall(b"G")
        for view in self.into:
            got = 0
            while got < CHUNK:
                got += self.sock.recv_into(view[got:])
        return BATCH * CHUNK / (time.perf_counter() - started) / 1e9

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


@contextmanager
def nencache_server(directory: str) -> Iterator[str]:
    config = Path(directory) / "server.yaml"
    config.write_text(f"cpu_size: 2GiB\nserver_max_chunk_bytes: {CHUNK + HEADER_SIZE}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
    proc = subprocess.Popen([sys.executable, "-m", "nencache.cli", "serve", "--port", "0", "--admin-port", "-1",
                             "--config", str(config)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = re.search(r"listening on (nencache://\S+:\d+)", line)
            if match:
                yield match.group(1)
                break
        else:
            raise SystemExit("nencache serve did not start")
    finally:
        proc.terminate()
        proc.wait(30)


def blobs(count: int, size: int = CHUNK) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(count):
        key, payload = os.urandom(16), os.urandom(size - HEADER_SIZE)
        out.append((key, ChunkHeader(0, 3, 1, 1, 1, 1, len(payload), checksum(payload), key).pack() + payload))
    return out


def throughput(tier: ServerTier, shared: ServerTier, raw: RawPeer, reps: int) -> dict[str, list[float]]:
    """GB/s of put and get through the server (`tier` reads over the socket, `shared` out of the server's
    shared pool) and through raw sockets, interleaved rep by rep."""
    out: dict[str, list[float]] = {"put": [], "get": [], "get_shared": [], "raw_put": [], "raw_get": []}
    for rep in range(reps + 1):  # the first is a warm-up
        batch = blobs(BATCH)
        keys = [k for k, _ in batch]
        raw_put = raw.send(batch)
        started = time.perf_counter()
        tier.put(batch)
        put_s = time.perf_counter() - started
        raw_get = raw.receive()
        started = time.perf_counter()
        got = tier.get(keys)
        get_s = time.perf_counter() - started
        assert all(g is not None and bytes(g) == b for g, (_, b) in zip(got, batch)), "server lost a chunk"
        del got  # the receive buffers go back to the tier's pool
        started = time.perf_counter()
        got = shared.get(keys)
        shared_s = time.perf_counter() - started
        assert all(g is not None and bytes(g) == b for g, (_, b) in zip(got, batch)), "server lost a chunk"
        del got
        if rep:
            out["put"].append(BATCH * CHUNK / put_s / 1e9)
            out["get"].append(BATCH * CHUNK / get_s / 1e9)
            out["get_shared"].append(BATCH * CHUNK / shared_s / 1e9)
            out["raw_put"].append(raw_put)
            out["raw_get"].append(raw_get)
    assert tier.stats().errors == 0 and shared.stats().errors == 0, (tier.stats(), shared.stats())
    assert shared.shared_reads == (reps + 1) * BATCH and tier.shared_reads == 0, "shared reads were (not) used"
    return out


def exists_latency(tier: ServerTier, calls: int = 5000) -> tuple[float, float]:
    key = blobs(1, 256)[0]
    tier.put([key])
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        assert tier.contains_prefix([key[0]]) == 1
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


class KVPath:
    """A `KVCache` with `remote_url` = the server and `local_cpu` off (every retrieve goes to the server), as
    LMCache is run. `shared`: retrieve copies out of the server's shared pool; else every chunk crosses the
    socket. Each `rep` stores fresh KV (timed until the server holds every chunk) and retrieves it into an
    engine KV tensor (timed, bytes checked): (store GB/s, retrieve GB/s)."""

    def __init__(self, url: str, shared: bool) -> None:
        layers, heads, dim = SHAPE
        layout = KVLayout(layers, heads, dim, torch.bfloat16)
        config = CacheConfig(chunk_size=256, local_cpu=False, cpu_size=4 * BATCH * layout.nbytes(256), remote_url=url,
                             remote_timeout=10.0, write_queue_chunks=4 * BATCH, remote_shared_memory=shared)
        self.shared = shared
        self.kv = torch.empty(layout.shape(256 * BATCH), dtype=torch.bfloat16)
        self.out = torch.empty_like(self.kv)
        self.gen = torch.Generator().manual_seed(1234 + shared)
        self.cache = KVCache(config, layout, "bench-model")
        self.cache._prefault.join()  # the pool is mapped at start-up, long before requests come; do not time that
        self.rep()  # warm-up: threads, buffers

    def rep(self) -> tuple[float, float]:
        cache, kv, out = self.cache, self.kv, self.out
        tokens = torch.randint(0, 50_000, (kv.shape[2],), generator=self.gen).tolist()
        kv.view(torch.int16).random_(-(2**15), 2**15, generator=self.gen)
        started = time.perf_counter()
        cache.store(tokens, kv)
        cache.flush()
        stored = time.perf_counter() - started
        out.zero_()
        assert len(cache.memory) == 0, "local_cpu=False must leave nothing in memory"
        started = time.perf_counter()
        cache.retrieve(tokens, out=out)
        retrieved = time.perf_counter() - started
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16)), "KV read back from the server differs"
        cache.memory.clear()
        nbytes = kv.numel() * kv.element_size()
        return nbytes / stored / 1e9, nbytes / retrieved / 1e9

    def close(self) -> None:
        assert self.cache.stats()["tier_errors"] == 0
        assert (self.cache.lower[0].tier.shared_reads > 0) == self.shared, "shared reads were (not) used"
        self.cache.close()


def lmcache_rows(url: str, reps: int) -> tuple[list[list[object]] | None, str]:
    """NenCache (socket reads, shared-pool reads) and LMCache on the same KV, one rep of each in turn (this
    machine's speed drifts: ratios are taken within a rep; LMCache runs one rep per fresh process)."""
    from _lmcache import VENV_PYTHON, run_lmcache

    if not VENV_PYTHON.exists():
        return None, "LMCache side skipped: no .venv-lmcache (run `bash benchmarks/setup_lmcache.sh`).\n"
    layers, heads, dim = SHAPE
    paths = {shared: KVPath(url, shared) for shared in (False, True)}
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    theirs: list[tuple[float, float]] = []
    try:
        for _ in range(reps):
            for shared, path in paths.items():
                runs[shared].append(path.rep())
            lm = run_lmcache("server", layers=layers, kv_heads=heads, head_dim=dim, dtype="bf16", chunk_size=256,
                             chunks=BATCH, reps=1)
            if "error" in lm:
                return None, f"\nLMCache: {lm['error']}\n"
            theirs.append((lm["store_gbps"], lm["retrieve_gbps"]))
    finally:
        for path in paths.values():
            path.close()
    rows: list[list[object]] = []
    for shared, ours in runs.items():
        cells: list[object] = ["4 MiB (32x2x64), " + ("shared pool" if shared else "socket")]
        for i in (0, 1):
            mine, lms = [a[i] for a in ours], [b[i] for b in theirs]
            cells += [f"{median(mine):.2f}", f"{median(lms):.2f}", paired_ratio(mine, lms)]
        rows.append(cells)
    return rows, ""


def p2p_part() -> tuple[list[object], str]:
    """The P2P row of the round-trip table, and a table of its steps."""
    from _p2p import measure
    from tiers_remote import redis_server

    with redis_server() as port:
        steps = measure(f"redis://127.0.0.1:{port}")
    total = steps["total"]
    row: list[object] = ["P2P fetch (peer to peer; 5.9 MB chunk)", f"{total.p50:.0f}", f"{total.p99:.0f}",
                         "p50 < 2000 µs"]
    names = {"lookup": "index lookup (`PeerIndex.lookup`: holders and placements, one Redis round trip)",
             "fetch": "fetch from the peer (a copy out of its mapped pool; header/length/key checked)",
             "check": "check (what the store adds: the header; CRC32 only for a tier that does not check)",
             "total": "P2P fetch: lookup + fetch + check",
             "raw": "reference: the same bytes through a raw loopback socket (no framing, no index)",
             "retrieve": "`KVCache.retrieve` from the peer into engine KV (B's pool emptied each time)"}
    detail = ("P2P: one 256-token chunk of SmolLM2-135M's KV shape (30 layers x 3 KV heads x 64, bf16: 5,898,240 bytes "
              "+ 64-byte header) held by a `KVCache` in a child process (peer A), fetched by a `KVCache` in this "
              "process (peer B) over loopback; the index is a throwaway redis-server. 400 fetches after 20 warm-up, each "
              "rep also timing the raw-socket reference.\n\n"
              + table(["P2P step", "p50 µs", "p99 µs"],
                      [[names[n], f"{steps[n].p50:.0f}", f"{steps[n].p99:.0f}"] for n in names]) + "\n")
    return row, detail


def run_p2p_only() -> str:
    row, detail = p2p_part()
    body = (table(["round trip", "p50 µs", "p99 µs", "target"], [row]) + "\n\n" + detail
            + f"\nLoad average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
            "(other work shares this machine).\n")
    print(body)
    write_section("server: P2P", body, command_line())
    return body


def run(reps: int, with_lmcache: bool) -> str:
    raw = RawPeer()
    with tempfile.TemporaryDirectory(prefix="nencache-bench-server-") as tmp, nencache_server(tmp) as url:
        tier = ServerTier(url, "bench", timeout=10.0, shared_memory=False)
        shared = ServerTier(url, "bench", timeout=10.0)
        time.sleep(1.0)  # the server maps its pool in the background at start-up
        got = throughput(tier, shared, raw, reps)
        p50, p99 = exists_latency(tier)
        lm, lm_note = lmcache_rows(url, reps) if with_lmcache else (None, "LMCache side skipped.\n")
        tier.close()
        shared.close()
    raw.close()
    p2p_row, p2p_detail = p2p_part()
    rows = []
    for op in ("put", "get"):
        ratio = median([a / b for a, b in zip(got[op], got[f"raw_{op}"])])
        rows.append([f"{op} (16 x 4 MiB, pipelined)", f"{median(got[op]):.2f}", f"{median(got[f'raw_{op}']):.2f}",
                     f"{ratio:.0%}"])
    ratio = median([a / b for a, b in zip(got["get_shared"], got["raw_get"])])
    rows.append(["get from the shared pool (16 x 4 MiB, one LOCATE)", f"{median(got['get_shared']):.2f}",
                 f"{median(got['raw_get']):.2f}", f"{ratio:.0%}"])
    body = (f"`nencache serve` in a child process, one `ServerTier` connection, loopback TCP; {reps} reps, fresh keys "
            "each; GB/s = 1e9 bytes/s, medians. Raw socket: the same 16 blobs through one loopback connection to a "
            "child process that `recv_into`s / `sendall`s 16 preallocated buffers, no framing, measured in the same "
            "rep; the ratio is the median of per-rep ratios. Target: >= 60%.\n\n"
            + table(["operation", "NenCache GB/s", "raw socket GB/s", "NenCache / raw"], rows) + "\n\n"
            + table(["round trip", "p50 µs", "p99 µs", "target"],
                    [["EXISTS of one key (`contains_prefix`)", f"{p50:.0f}", f"{p99:.0f}", "p50 < 200 µs"],
                     p2p_row])
            + "\n\n" + p2p_detail)
    if lm is not None:
        body += ("\nEngine KV -> server -> engine KV, 16 chunks of 256 tokens, bf16, CPU tier off on both sides. "
                 "NenCache: `KVCache(remote_url=nencache://...)`, store + flush, retrieve (CRC32 of every chunk "
                 "checked, raw codec), once reading over the socket (`remote_shared_memory: false`, as from another "
                 "machine) and once copying out of the server's shared pool (the default when the server runs on "
                 "the same machine); LMCache 0.5.6: `--backend server` (its `lm://` server, naive serde, no "
                 "checksum); one rep of each in turn (LMCache in a fresh process each rep), medians over reps, "
                 "ratios the median (and range) of per-rep ratios. Target: NenCache >= 1.5x.\n\n"
                 + table(["chunk, NenCache reads", "NenCache store GB/s", "LMCache store GB/s", "store ratio",
                          "NenCache retrieve GB/s", "LMCache retrieve GB/s", "retrieve ratio"], lm) + "\n")
    body += lm_note
    body += (f"\nLoad average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
             "(other work shares this machine).\n")
    print(body)
    write_section("server", body, command_line())
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-lmcache", action="store_true", help="skip the LMCache side")
    parser.add_argument("--p2p-only", action="store_true", help="only the P2P fetch rows (section 'server: P2P')")
    args = parser.parse_args()
    if args.p2p_only:
        run_p2p_only()
    else:
        run(args.reps, not args.no_lmcache)


if __name__ == "__main__":
    main()
