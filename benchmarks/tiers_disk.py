"""Disk tier benchmark: DiskTier against `dd` on the same disk, and DiskTier start-up time.

Chunks are 256 tokens of SmolLM2-135M KV (30 layers, 3 KV heads, head dim 64, bf16: 5.9 MB each).
- write: `put` in batches of 16, then `flush`: every chunk synced and renamed, the directory synced.
  dd: `dd if=/dev/zero bs=<chunk rounded to 4 KiB> conv=fsync oflag=direct` (dd's own timing).
- cold read: page cache dropped first (`/proc/sys/vm/drop_caches`); `get` checks every chunk's
  checksums. "batches of 8": the caller drops each batch before the next, as KVCache does once it
  has copied the chunks into its pool; "one get": all chunks held at once. dd: `iflag=direct`.
Each timed operation follows a 1 s pause, and ours and dd's swap order every rep (virtual disks often
serve bursts faster than steady streams). Ratios are medians (and ranges) of the per-rep ratios.
Beside LMCache (`benchmarks/lmcache_side.py --backend disk`, run in `.venv-lmcache` where that
environment exists), both sides are measured from engine KV to engine KV, copies included: NenCache
through `KVCache`, one rep of each in turn.

    python benchmarks/tiers_disk.py --chunks 64 --reps 5 [--startup 100000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import median, paired_ratio, table, write_section  # noqa: E402

from nencache.codecs.raw import header_for, tensor_bytes  # noqa: E402
from nencache.format import ChunkHeader  # noqa: E402
from nencache.tiers.disk.tier import DiskTier  # noqa: E402
from nencache.tiers.disk.io import round_up  # noqa: E402

SHAPE = (30, 2, 256, 3, 64)  # SmolLM2-135M: layers, K/V, tokens, kv heads, head dim
ROOT = Path(__file__).resolve().parent.parent
LMCACHE_PY = ROOT / ".venv-lmcache" / "bin" / "python"
LMCACHE_SIDE = ROOT / "benchmarks" / "lmcache_side.py"
BATCH_WRITE, BATCH_READ = 16, 8
PAUSE = 1.0  # seconds of idle disk before each timed operation


def fs_type(path: Path) -> str:
    """The filesystem type holding `path` (from /proc/mounts)."""
    best, kind = "", "?"
    target = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ, *_ = line.split()
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, typ
    return kind


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_blobs(n: int) -> list[tuple[bytes, bytes]]:
    """`n` chunk blobs sharing one random payload, each stamped with its own key."""
    chunk = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    payload = tensor_bytes(chunk)
    header: ChunkHeader = header_for(chunk, 0, payload, bytes(16))
    body = bytes(payload)
    keys = [os.urandom(16) for _ in range(n)]
    return [(k, header.with_key(k).pack() + body) for k in keys]


def dd(args: list[str]) -> float:
    """Run dd; its own elapsed seconds."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    match = re.search(r"copied, ([0-9.e+-]+) s", out.stderr)
    if not match:
        raise RuntimeError(f"cannot read dd's timing from: {out.stderr!r}")
    return float(match.group(1))


def timed(fn: Callable[[], object], cold: bool = False) -> float:
    """Seconds `fn` takes, after a pause (the disk's burst budget refills alike for every contender)."""
    if cold:
        drop_page_cache()
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    result = fn()
    return result if isinstance(result, float) else time.perf_counter() - t0


def one_rep(work: Path, blobs: list[tuple[bytes, bytes]], ns: str, dd_first: bool) -> dict[str, float]:
    """One rep: seconds for each operation, ours and dd's, in alternating order."""
    n, size = len(blobs), len(blobs[0][1])
    bs = round_up(size)
    ddfile = work / "dd.bin"
    ddfile.unlink(missing_ok=True)
    keys = [k for k, _ in blobs]
    tier = DiskTier(work, ns, 4 * n * size)

    def write() -> None:
        for i in range(0, n, BATCH_WRITE):
            tier.put(blobs[i : i + BATCH_WRITE])
        tier.flush()

    def read(batch: int) -> None:
        for i in range(0, n, batch):
            got = tier.get(keys[i : i + batch])
            if any(g is None or len(g) != size for g in got):
                raise RuntimeError("a chunk came back missing or short")
            del got

    def pair(ours: Callable[[], object], theirs: Callable[[], float], cold: bool) -> tuple[float, float]:
        if dd_first:
            t_dd = timed(theirs, cold)
            return timed(ours, cold), t_dd
        t_ours = timed(ours, cold)
        return t_ours, timed(theirs, cold)

    out: dict[str, float] = {}
    try:
        out["write"], out["dd_write"] = pair(write, lambda: dd(["if=/dev/zero", f"of={ddfile}", f"bs={bs}",
                                                                f"count={n}", "conv=fsync", "oflag=direct"]), False)
        out["read_batched"], out["dd_read"] = pair(lambda: read(BATCH_READ), lambda: dd(
            [f"if={ddfile}", "of=/dev/null", f"bs={bs}", "iflag=direct"]), True)
        out["read_all"] = timed(lambda: read(n), True)
        if bytes(tier.get(keys[-1:])[0] or b"") != blobs[-1][1]:
            raise RuntimeError("a chunk came back different")
        tier.clear()
    finally:
        tier.close()
        ddfile.unlink(missing_ok=True)
    return out


def kv_disk_rep(cache, chunks: int, gen: torch.Generator) -> tuple[float, float]:
    """Engine KV -> disk -> engine KV through a `KVCache` (CPU tier off, as LMCache's side runs):
    seconds of `store` + `flush` (durable), and of a cold `retrieve` (page cache dropped) into engine KV."""
    tokens = torch.randint(0, 50_000, (SHAPE[2] * chunks,), generator=gen).tolist()
    kv = torch.empty((SHAPE[0], 2, len(tokens), SHAPE[3], SHAPE[4]), dtype=torch.bfloat16)
    kv.view(torch.int16).random_(-(2**15), 2**15, generator=gen)
    out = torch.zeros_like(kv)
    time.sleep(PAUSE)
    started = time.perf_counter()
    cache.store(tokens, kv)
    cache.flush()
    store_s = time.perf_counter() - started
    assert len(cache.memory) == 0, "local_cpu=False must leave nothing in memory"
    drop_page_cache()
    time.sleep(PAUSE)
    started = time.perf_counter()
    cache.retrieve(tokens, out=out)
    retrieve_s = time.perf_counter() - started
    if not torch.equal(out.view(torch.int16), kv.view(torch.int16)):
        raise RuntimeError("KV read back from disk differs")
    cache.invalidate(tokens)
    return store_s, retrieve_s


def kv_rows(chunks: int, reps: int, work: Path) -> tuple[list[list[object]], str]:
    """NenCache `KVCache` and LMCache's disk backend, one rep each in turn, on the same KV."""
    from nencache import CacheConfig, KVCache, KVLayout

    layout = KVLayout(SHAPE[0], SHAPE[3], SHAPE[4], torch.bfloat16)
    nbytes = layout.nbytes(SHAPE[2] * chunks)
    config = CacheConfig(chunk_size=SHAPE[2], local_cpu=False, cpu_size=int(2.2 * nbytes), disk_path=str(work / "kv"),
                         disk_size=4 * nbytes, write_queue_chunks=2 * chunks)
    gen = torch.Generator().manual_seed(7)
    ours: list[tuple[float, float]] = []
    theirs: list[dict] = []
    with KVCache(config, layout, "bench-disk") as cache:
        cache._prefault.join()  # the pool is mapped at start-up, long before requests come; do not time that
        kv_disk_rep(cache, chunks, gen)  # warm-up: read buffers, I/O and decode threads at full size
        for _ in range(reps):
            ours.append(kv_disk_rep(cache, chunks, gen))
            lm = lmcache_disk(chunks, 1, work)
            if lm is None or "error" in lm:
                return [], f" LMCache side: {'not set up' if lm is None else lm['error']}."
            theirs.append(lm)
    rows = []
    for i, what in enumerate(("store (durable)", "cold retrieve")):
        mine = [nbytes / o[i] / 1e9 for o in ours]
        lms = [lm["store_gbps" if i == 0 else "retrieve_gbps"] for lm in theirs]
        rows.append([what, f"{median(mine):.2f}", f"{median(lms):.2f}", paired_ratio(mine, lms)])
    return rows, ""


def lmcache_disk(chunks: int, reps: int, work: Path) -> dict | None:
    """LMCache's disk backend figures, or None where its environment is not set up."""
    if not (LMCACHE_PY.exists() and LMCACHE_SIDE.exists()):
        return None  # hook: run benchmarks/setup_lmcache.sh to add LMCache's figures
    cmd = [str(LMCACHE_PY), str(LMCACHE_SIDE), "--backend", "disk", "--layers", str(SHAPE[0]), "--kv-heads",
           str(SHAPE[3]), "--head-dim", str(SHAPE[4]), "--dtype", "bf16", "--chunk-size", str(SHAPE[2]),
           "--chunks", str(chunks), "--reps", str(reps), "--disk-path", str(work), "--pause", str(PAUSE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def run_disk_part(chunks: int, reps: int, directory: str | Path | None = None) -> str:
    """DiskTier write and cold read vs dd (and LMCache where available) as a Markdown table; also printed."""
    base = Path(directory or os.environ.get("NENCACHE_BENCH_DIR", "/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="nencache-disk-bench-", dir=base))
    blobs = make_blobs(chunks)
    size = len(blobs[0][1])
    try:
        cold = drop_page_cache()
        one_rep(work, blobs[: min(chunks, 8)], "ff", False)  # warm-up: threads, buffers, dd binary
        runs = [one_rep(work, blobs, f"{rep:02x}", dd_first=rep % 2 == 1) for rep in range(reps)]
        lm_rows, lm_note = kv_rows(chunks, reps, work) if LMCACHE_PY.exists() else ([], " LMCache side: not set up.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total, dd_total = chunks * size, chunks * round_up(size)
    gbps = {k: median([total / r[k] / 1e9 for r in runs]) for k in ("write", "read_batched", "read_all")}
    dd_gbps = {k: median([dd_total / r[k] / 1e9 for r in runs]) for k in ("dd_write", "dd_read")}

    def ratio(ours: str, theirs: str) -> str:
        return paired_ratio([total / r[ours] for r in runs], [dd_total / r[theirs] for r in runs], unit="")

    rows = [
        ["write (put + flush, durable)", gbps["write"], dd_gbps["dd_write"], ratio("write", "dd_write")],
        [f"cold read (get, batches of {BATCH_READ})", gbps["read_batched"], dd_gbps["dd_read"],
         ratio("read_batched", "dd_read")],
        [f"cold read (one get of {chunks})", gbps["read_all"], dd_gbps["dd_read"], ratio("read_all", "dd_read")],
    ]
    probe = DiskTier(base, "00", 1 << 20)
    direct = probe.direct_io
    probe.close()
    shutil.rmtree(base / "00", ignore_errors=True)
    head = ["operation", "DiskTier GB/s", "dd GB/s", "DiskTier / dd (range)"]
    notes = (f"\n\n{chunks} chunks of {size / 1e6:.2f} MB ({SHAPE}, bf16), {reps} reps; GB/s are medians, "
             "DiskTier / dd is the median (and range) of the ratios within each rep; "
             f"directory on {fs_type(base)} ({base}), O_DIRECT {'on' if direct else 'off'}, "
             f"page cache dropped before reads: {'yes' if cold else 'no (reads rely on O_DIRECT)'}.")
    text = table(head, rows) + notes
    if lm_rows:
        text += (f"\n\nEngine KV -> disk -> engine KV, the same {chunks} chunks: NenCache `KVCache` (CPU tier off, "
                 "`disk_path`; store + flush, then retrieve after dropping the page cache, bytes checked) and "
                 "LMCache 0.5.6's local disk backend (CPU tier off; store timed until every file is written and "
                 "fsynced, retrieve after dropping the page cache), one rep of each in turn, each LMCache rep in a "
                 "fresh process after one untimed rep of its own; both sides idle the disk for 1 s before each timed "
                 "store and retrieve; GB/s are medians, ratios the median (and range) of per-rep ratios. Targets: "
                 "store >= 1x, cold retrieve >= 1.5x.\n\n"
                 + table(["operation", "NenCache GB/s", "LMCache GB/s", "NenCache / LMCache"], lm_rows))
    text += lm_note
    print(text)
    return text


def run_startup_part(chunks: int, directory: str | Path | None = None) -> str:
    """Time to open a DiskTier over `chunks` small stored chunks, as a Markdown table; also printed."""
    base = Path(directory or os.environ.get("NENCACHE_BENCH_DIR", "/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="nencache-disk-startup-", dir=base))
    try:
        blob = make_small_blob()
        t0 = time.perf_counter()
        with DiskTier(work, "aa", 1 << 40) as tier:
            for i in range(0, chunks, 512):
                tier.put([(k.to_bytes(16, "little"), blob) for k in range(i, min(i + 512, chunks))])
        fill = time.perf_counter() - t0
        rows = []
        for label, checkpoint, cold in [("checkpoint, warm cache", True, False), ("checkpoint, cold cache", True, True),
                                        ("no checkpoint (after kill -9), cold cache", False, True)]:
            if not checkpoint:
                (work / "aa" / "index.ckpt").unlink(missing_ok=True)
            if cold:
                drop_page_cache()
            t0 = time.perf_counter()
            tier = DiskTier(work, "aa", 1 << 40)
            seconds = time.perf_counter() - t0
            found = tier.stats().chunks
            tier.close()
            rows.append([label, found, seconds])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(["start-up", "chunks found", "seconds"], rows) + (
        f"\n\n{chunks} chunks of {len(blob)} bytes, written in {fill:.1f} s "
        f"({chunks / fill:.0f} chunks/s, each synced).")
    print(text)
    return text


def make_small_blob() -> bytes:
    chunk = torch.zeros((1, 2, 4, 1, 8), dtype=torch.bfloat16)
    payload = tensor_bytes(chunk)
    return header_for(chunk, 0, payload, bytes(16)).pack() + bytes(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--startup", type=int, default=100_000, help="chunks for the start-up test (0: skip)")
    parser.add_argument("--dir", default=None, help="a directory on the disk to test (default /var/tmp)")
    args = parser.parse_args()
    body = run_disk_part(args.chunks, args.reps, args.dir)
    if args.startup:
        body += "\n\n" + run_startup_part(args.startup, args.dir)
    write_section("tiers: disk", body)


if __name__ == "__main__":
    main()
