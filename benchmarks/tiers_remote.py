"""Remote tier benchmark: three Redis clients on the same redis-server, and LMCache beside NenCache.

- Clients, one rep of each in turn (section "tiers: remote (Redis clients)"): `RedisTier` on its
  hand-written RESP client (`put` of a batch of 16 chunk blobs in one pipeline, `get` of the batch as
  pipelined GETs, every blob's header, key and CRC checked); redis-py with hiredis doing the same batch
  (one `pipeline(transaction=False)` of SETs / GETs, the same checks); and `redis-benchmark -t set,get
  -d <same size>` on one connection and on four (`-c 1`, `-c 4`, no pipelining; per operation, the
  configuration with the better median is shown; its requests/s times the value size is its GB/s).
  Blob sizes 1, 4, 8 MiB (header included). The hand-written bulk path is kept only where its get is at
  least 1.2x redis-py's (median of per-rep ratios).
- LMCache 0.5.6 (`benchmarks/lmcache_side.py --backend redis`, in `.venv-lmcache`, against the same
  server, `local_cpu=False`) where that environment exists: engine KV -> Redis -> engine KV, its copies
  included. NenCache is measured the same way: `KVCache` with `local_cpu=False` and `remote_url` on the
  same server, `store` + `flush`, then `retrieve` into an engine KV tensor. GB/s = 1e9 bytes/s of KV.

    python benchmarks/tiers_remote.py --reps 5 [--sizes 1,4,8] [--no-lmcache]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, median, paired_ratio, table, write_section  # noqa: E402

from nencache.format import HEADER_SIZE, ChunkHeader, checksum, split_blob  # noqa: E402
from nencache.tiers.redis.tier import RedisTier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LMCACHE_PY = ROOT / ".venv-lmcache" / "bin" / "python"
LMCACHE_SIDE = ROOT / "benchmarks" / "lmcache_side.py"
BATCH = 16
LOOKUPS = 2000  # contains_prefix calls per timing
MIB = 1 << 20
# KV shapes (layers, kv heads, head dim; bf16, 256-token chunks) whose chunk is exactly 1, 4, 8 MiB.
SHAPES = {1: (8, 2, 64), 2: (16, 2, 64), 4: (32, 2, 64), 8: (32, 4, 64), 16: (32, 8, 64)}


@contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway redis-server on a free loopback port (no persistence); yields the port."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: install it (apt-get install redis-server) to run this benchmark")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="nencache-bench-redis-") as tmp:
        proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                 "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def make_blobs(size: int, count: int) -> list[tuple[bytes, bytes]]:
    """`count` valid chunk blobs of exactly `size` bytes (header + random payload), each under its own key."""
    out = []
    for _ in range(count):
        key, payload = os.urandom(16), os.urandom(size - HEADER_SIZE)
        out.append((key, ChunkHeader(0, 3, 1, 1, 1, 1, len(payload), checksum(payload), key).pack() + payload))
    return out


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def per_call(fn: Callable[[list], object], arg: list, times: int) -> float:
    """Seconds per call of `fn(arg)`, timed over `times` calls."""
    started = time.perf_counter()
    for _ in range(times):
        fn(arg)
    return (time.perf_counter() - started) / times


def redis_benchmark(port: int, size: int) -> dict[str, float]:
    """redis-benchmark GB/s for `size`-byte values, keyed "SET c1", "GET c1", "SET c4", "GET c4"."""
    out: dict[str, float] = {}
    requests = max(64, (1024 * MIB) // size)  # long enough runs: its requests/s is counted in whole ms
    for clients in ("1", "4"):
        text = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-d", str(size), "-t", "set,get",
                               "-n", str(requests), "-c", clients, "--csv"],
                              capture_output=True, text=True, check=True, timeout=600).stdout
        for op, rps in re.findall(r'^"(SET|GET)","([\d.]+)"', text, re.MULTILINE):
            out[f"{op} c{clients}"] = float(rps) * size / 1e9
    return out


def against_best(ours: list[float], runs: list[dict[str, float]], op: str) -> tuple[float, float, str]:
    """(redis-benchmark GB/s, median ratio, config) against its better configuration (by median) for `op`."""
    best = max(("c1", "c4"), key=lambda c: median([r[f"{op} {c}"] for r in runs]))
    theirs = [r[f"{op} {best}"] for r in runs]
    return median(theirs), median([a / b for a, b in zip(ours, theirs)]), best


class RedisPySide:
    """The same batch calls as `RedisTier` put / get, made with redis-py (hiredis parser): one pipeline of SETs,
    one pipeline of GETs, then every blob's header, key and CRC checked as `RedisTier.get` checks them."""

    def __init__(self, port: int) -> None:
        import redis
        from redis.utils import HIREDIS_AVAILABLE

        if not HIREDIS_AVAILABLE:
            raise SystemExit("hiredis is not installed: pip install 'redis[hiredis]' to measure redis-py with it")
        self.version = redis.__version__
        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10.0)
        self.prefix = b"nencache:bench-redis-py:"

    def put(self, blobs: list[tuple[bytes, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, blob in blobs:
            pipe.set(self.prefix + key, blob)
        pipe.execute()

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self.prefix + key)
        values = pipe.execute()
        for key, value in zip(keys, values):
            if value is not None:
                split_blob(value, expected_key=key)
        return values

    def contains_prefix(self, keys: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.prefix + key)
        found = pipe.execute()
        return found.index(0) if 0 in found else len(found)

    def delete(self, keys: list[bytes]) -> None:
        self.client.unlink(*(self.prefix + k for k in keys))

    def close(self) -> None:
        self.client.close()


def clients_side_by_side(port: int, sizes_mib: Sequence[int],
                         reps: int) -> tuple[list[list[object]], list[object], str, str]:
    """RedisTier (hand-written RESP), redis-py + hiredis and redis-benchmark, one rep of each in turn."""
    tier = RedisTier(f"redis://127.0.0.1:{port}", "bench", timeout=10.0)
    py = RedisPySide(port)
    rows: list[list[object]] = []
    hand_lookup: list[float] = []
    py_lookup: list[float] = []
    get_ratios: list[float] = []  # per size: median of per-rep get ratios, hand / redis-py
    try:
        for mib in sizes_mib:
            size = mib * MIB
            blobs = make_blobs(size, BATCH)
            keys = [k for k, _ in blobs]
            tier.put(blobs)
            py.put(blobs)
            got = tier.get(keys)
            assert all(g is not None and bytes(g) == b for g, (_, b) in zip(got, blobs)), "RedisTier lost a chunk"
            assert py.get(keys) == [b for _, b in blobs], "redis-py lost a chunk"
            del got
            inner = max(2, (256 * MIB) // (BATCH * size))  # batches per timing: >= 256 MiB moved
            hand_put, hand_get, py_put, py_get, runs = [], [], [], [], []
            for _ in range(reps):
                hand_put.append(per_call(tier.put, blobs, inner))
                py_put.append(per_call(py.put, blobs, inner))
                hand_get.append(per_call(tier.get, keys, inner))
                py_get.append(per_call(py.get, keys, inner))
                runs.append(redis_benchmark(port, size))
                hand_lookup.append(per_call(tier.contains_prefix, keys, LOOKUPS) * 1e6)
                py_lookup.append(per_call(py.contains_prefix, keys, LOOKUPS) * 1e6)
            assert tier.stats().errors == 0 and tier.stats().corrupt == 0, tier.stats()
            tier.delete(keys)
            py.delete(keys)
            gbps = {name: [BATCH * size / s / 1e9 for s in secs] for name, secs in
                    (("hand put", hand_put), ("py put", py_put), ("hand get", hand_get), ("py get", py_get))}
            set_ref, _, set_cfg = against_best(gbps["hand put"], runs, "SET")
            get_ref, _, get_cfg = against_best(gbps["hand get"], runs, "GET")
            set_runs = [r[f"SET {set_cfg}"] for r in runs]
            get_runs = [r[f"GET {get_cfg}"] for r in runs]
            get_ratios.append(median([a / b for a, b in zip(gbps["hand get"], gbps["py get"])]))
            rows.append([f"{mib} MiB",
                         _spread(gbps["hand put"]), _spread(gbps["py put"]), f"{_spread(set_runs)} ({set_cfg})",
                         paired_ratio(gbps["hand put"], gbps["py put"]),
                         _spread(gbps["hand get"]), _spread(gbps["py get"]), f"{_spread(get_runs)} ({get_cfg})",
                         paired_ratio(gbps["hand get"], gbps["py get"])])
    finally:
        tier.clear()
        tier.close()
        py.close()
    lookup = [f"EXISTS x {BATCH} (`contains_prefix`)", _spread(hand_lookup, "{:.0f}"), _spread(py_lookup, "{:.0f}"),
              paired_ratio(py_lookup, hand_lookup)]
    worst = min(get_ratios)
    verdict = (f"Verdict: the hand-written bulk read path stays (get hand / redis-py is {worst:.2f}x at its lowest, "
               "at least 1.20x at every size)." if worst >= 1.2 else
               f"Verdict: the hand-written bulk read path does not earn its keep (get hand / redis-py is {worst:.2f}x "
               "at its lowest, under 1.20x): use redis-py there too.")
    return rows, lookup, py.version, verdict


def _spread(values: Sequence[float], form: str = "{:.2f}") -> str:
    """Median and range, e.g. `4.21 (3.90-4.40)`."""
    return f"{form.format(median(values))} ({form.format(min(values))}-{form.format(max(values))})"


def nencache_kv_path(port: int, mib: int, reps: int) -> tuple[float, float]:
    """KVCache with only Redis below it (`local_cpu=False`, as LMCache's side): (store GB/s, retrieve GB/s).

    store = `store` + `flush` (every chunk written to Redis); retrieve = `retrieve` into an engine KV tensor
    (every chunk fetched from Redis, checked and decoded). Fresh tokens each rep, so nothing is skipped.
    """
    from nencache import CacheConfig, KVCache, KVLayout

    layers, heads, dim = SHAPES[mib]
    layout = KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=torch.bfloat16)
    tokens = 256 * BATCH
    kv = torch.randn(layout.shape(tokens)).to(layout.dtype)
    out = torch.empty_like(kv)
    nbytes = layout.nbytes(tokens)
    config = CacheConfig(chunk_size=256, local_cpu=False, remote_url=f"redis://127.0.0.1:{port}",
                         remote_timeout=10.0, cpu_size=int(nbytes * 1.5))
    store_s, retrieve_s = [], []
    with KVCache(config, layout, model_id=f"bench-remote-{mib}") as cache:
        cache._prefault.join()  # the pool is mapped at start-up, long before requests come; do not time that
        for rep in range(reps + 1):
            ids = torch.randint(0, 50000, (tokens,)).tolist()
            started = time.perf_counter()
            cache.store(ids, kv)
            cache.flush()
            stored = time.perf_counter() - started
            out.zero_()
            started = time.perf_counter()
            cache.retrieve(ids, out=out)
            retrieved = time.perf_counter() - started
            assert torch.equal(out, kv), "KV read back from Redis differs"
            cache.invalidate(ids)
            if rep:  # the first rep warms up
                store_s.append(stored)
                retrieve_s.append(retrieved)
    return nbytes / median(store_s) / 1e9, nbytes / median(retrieve_s) / 1e9


def redis_ceiling(port: int, mib: int, reps: int) -> tuple[float, float]:
    """(put GB/s, get GB/s) of bare `RedisTier` calls on 16 fresh keys per rep, as the KV paths write them:
    what this redis-server takes and gives at most, with no KV copies or cache logic around it."""
    tier = RedisTier(f"redis://127.0.0.1:{port}", "bench-ceiling", timeout=10.0)
    put_s, get_s = [], []
    try:
        payload = make_blobs(mib * MIB, 1)[0][1][HEADER_SIZE:]
        for rep in range(reps + 1):
            keys = [os.urandom(16) for _ in range(BATCH)]
            batch = [(k, ChunkHeader(0, 3, 1, 1, 1, 1, len(payload), checksum(payload), k).pack() + payload)
                     for k in keys]
            put = timed(lambda: tier.put(batch))
            get = timed(lambda: tier.get(keys))
            tier.delete(keys)
            if rep:
                put_s.append(put)
                get_s.append(get)
        assert tier.stats().errors == 0 and tier.stats().corrupt == 0, tier.stats()
    finally:
        tier.close()
    nbytes = BATCH * mib * MIB
    return nbytes / median(put_s) / 1e9, nbytes / median(get_s) / 1e9


def lmcache_rows(port: int, sizes_mib: Sequence[int], reps: int) -> tuple[list[list[object]], str]:
    """NenCache, LMCache and the bare-tier ceiling on the same server and KV shapes, one rep of each in turn
    (this machine's speed drifts: ratios are taken within a rep). Empty when LMCache is not set up."""
    if not (LMCACHE_PY.exists() and LMCACHE_SIDE.exists()):
        return [], "LMCache side skipped: no .venv-lmcache (run `bash benchmarks/setup_lmcache.sh` to add it).\n"
    from _lmcache import run_lmcache

    rows: list[list[object]] = []
    notes = []
    for mib in sizes_mib:
        if mib not in SHAPES:
            continue
        layers, heads, dim = SHAPES[mib]
        runs: list[tuple[float, float, float, float, float, float]] = []
        for _ in range(reps):
            ours = nencache_kv_path(port, mib, 1)
            lm = run_lmcache("redis", layers=layers, kv_heads=heads, head_dim=dim, dtype="bf16", chunk_size=256,
                             chunks=BATCH, reps=1, extra=["--remote-url", f"redis://127.0.0.1:{port}"])
            if "error" in lm:
                notes.append(f"{mib} MiB: {lm['error']}")
                break
            runs.append((*ours, lm["store_gbps"], lm["retrieve_gbps"], *redis_ceiling(port, mib, 1)))
        if not runs:
            continue
        col = list(zip(*runs))
        rows.append([f"{mib} MiB ({layers}x{heads}x{dim})", f"{median(col[0]):.2f}", f"{median(col[2]):.2f}",
                     paired_ratio(col[0], col[2]), f"{median(col[4]):.2f}", paired_ratio(col[4], col[2]),
                     f"{median(col[1]):.2f}",
                     f"{median(col[3]):.2f}", paired_ratio(col[1], col[3]), f"{median(col[5]):.2f}"])
    return rows, "".join(f"\nLMCache: {n}\n" for n in notes)


def run_remote_part(sizes_mib: Sequence[int] = (1, 4, 8), reps: int = 5, with_lmcache: bool = True) -> str:
    """Measure, print and return the Markdown section (also written to benchmarks/RESULTS.md)."""
    torch.set_num_threads(1)  # as lmcache_side.py does; intra-op threads only add contention to chunk copies
    if shutil.which("redis-benchmark") is None:
        raise SystemExit("redis-benchmark not found: install redis-server (apt-get install redis-server)")
    with redis_server() as port:
        rows, lookup, py_version, verdict = clients_side_by_side(port, sizes_mib, reps)
        lm_rows, lm_note = lmcache_rows(port, sizes_mib, reps) if with_lmcache else ([], "LMCache side skipped.\n")
    clients = (f"Batches of {BATCH} chunk blobs on a local redis-server 7 (no persistence), loopback TCP; {reps} reps, "
               "one rep of each side in turn; GB/s = 1e9 bytes/s, median (range). Hand-written: `RedisTier` on its "
               "own RESP client (pipelined, replies read straight into pooled buffers, a few MiB in flight). "
               f"redis-py {py_version} with hiredis: one `pipeline(transaction=False)` of SETs / GETs. Both sides check "
               "each blob's header, key and CRC32 on get. redis-benchmark: the better (by median) of `-c 1` and `-c 4`, "
               "no pipelining. hand / redis-py: median (range) of per-rep ratios; the hand-written bulk read path is "
               "kept only where get hand / redis-py is at least 1.20x.\n\n"
               + table(["chunk", "hand put GB/s", "redis-py put GB/s", "redis-benchmark SET GB/s", "put hand / redis-py",
                        "hand get GB/s", "redis-py get GB/s", "redis-benchmark GET GB/s", "get hand / redis-py"], rows)
               + f"\nLookups: {LOOKUPS} calls per timing, one timing per rep after each size's redis-benchmark run; "
               "microseconds per call, median (range); speedup = redis-py time / hand time, median (range) of per-rep "
               "ratios.\n\n"
               + table(["lookup", "hand us", "redis-py us", "hand speedup"], [lookup]) + "\n\n" + verdict + "\n")
    print(clients)
    write_section("tiers: remote (Redis clients)", clients, command_line())
    body = ""
    if lm_rows:
        body += ("\nEngine KV -> Redis -> engine KV, 16 chunks of 256 tokens (bf16, shape layers x KV heads x head "
                 "dim), same server, CPU tier off on both sides (`local_cpu=False`). NenCache: `KVCache` store + "
                 "flush, then retrieve, raw codec; LMCache 0.5.6: `--backend redis`, naive serde; one rep of "
                 "NenCache, LMCache (a fresh process) and the ceiling in turn, medians over reps, ratios the median "
                 "(and range) of per-rep ratios. Target: 1.5x. "
                 "Redis ceiling: bare `RedisTier` put / get of 16 fresh keys of the same size per rep (fresh keys, "
                 "as both KV paths write), with no KV copies or cache logic around it: the most the KV path can "
                 "reach on this server; ceiling / LMCache store is the highest store ratio any KV path could show here "
                 "(a KV store also copies the engine KV once, which the ceiling does not).\n\n"
                 + table(["chunk", "NenCache store GB/s", "LMCache store GB/s", "store ratio", "Redis ceiling put GB/s",
                          "ceiling / LMCache store", "NenCache retrieve GB/s", "LMCache retrieve GB/s", "retrieve ratio",
                          "Redis ceiling get GB/s"], lm_rows) + "\n")
        body += lm_note
        print(body)
        write_section("tiers: remote (Redis)", body, command_line())
    else:
        print(lm_note)
    return clients + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default="1,4,8", help="chunk sizes in MiB, comma-separated")
    parser.add_argument("--no-lmcache", action="store_true", help="skip the LMCache side")
    args = parser.parse_args()
    run_remote_part(tuple(int(s) for s in args.sizes.split(",")), args.reps, not args.no_lmcache)


if __name__ == "__main__":
    main()
