"""DiskTier: the tier contract, damaged files, a full disk, restarts, kill -9, two processes on one directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nencache.errors import ClosedError, ConfigError
from nencache.tiers.disk import io as disk_io
from nencache.tiers.disk.tier import DiskTier
from tests.tiers.contract import TierContract

NS = "ab12"
SRC = str(Path(__file__).resolve().parents[2] / "src")

# Deterministic chunks from an integer, shared with the child processes below.
HELPERS = textwrap.dedent("""
    import hashlib, zlib
    from nencache.format import ChunkHeader

    SIZES = (300, 5_000, 70_000, 300_000, 1_000_013)

    def key(i):
        return i.to_bytes(16, "little")

    def blob(i, size=None):
        n = SIZES[i % len(SIZES)] if size is None else size
        payload = hashlib.shake_128(key(i) + n.to_bytes(8, "little")).digest(n)
        return ChunkHeader(0, 6, 1, 1, 1, n, n, zlib.crc32(payload), key(i)).pack() + payload
""")
_helpers: dict[str, object] = {}
exec(HELPERS, _helpers)
key: Callable[[int], bytes] = _helpers["key"]  # type: ignore[assignment]
blob: Callable[..., bytes] = _helpers["blob"]  # type: ignore[assignment]


def child(script: str, *args: str) -> subprocess.Popen[str]:
    """Run `script` (with HELPERS) in a fresh interpreter; argv[1:] = args."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = HELPERS + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at `path` (root only); yields whether it is mounted."""
    path.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(params=[None, False], ids=["probe-direct", "page-cache"])
def tier(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DiskTier]:
    t = DiskTier(tmp_path / "cache", NS, 64 << 20, use_direct_io=request.param)
    yield t
    t.close()


class TestDiskContract(TierContract):
    pass


def chunk_files(t: DiskTier) -> list[Path]:
    return sorted(t.path.glob("*.kv"))


def test_large_chunks_roundtrip_from_bytes_and_aligned_buffers(tier: DiskTier) -> None:
    items = [(key(i), blob(i, 1_000_013 + i)) for i in range(4)]
    aligned = disk_io.aligned_buffer(len(items[0][1]))
    aligned[: len(items[0][1])] = items[0][1]
    tier.put([(items[0][0], memoryview(aligned)[: len(items[0][1])])] + items[1:])
    tier.flush()
    assert [bytes(b) for b in tier.get([k for k, _ in items])] == [b for _, b in items]
    assert [f.stat().st_size for f in chunk_files(tier)] == sorted(len(b) for _, b in items)


def test_direct_io_is_used_where_the_filesystem_allows(tmp_path: Path) -> None:
    if not disk_io.probe_direct_io(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    with DiskTier(tmp_path, NS, 1 << 20) as t:
        assert t.direct_io


@pytest.mark.parametrize("damage", ["flip", "cut", "junk", "other-key"])
def test_damaged_file_is_a_counted_miss_and_removed(tier: DiskTier, damage: str) -> None:
    tier.put([(key(i), blob(i)) for i in range(5)])
    victim = tier.path / f"{key(3).hex()}.kv"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "cut":
        data = data[: len(data) - 7]
    elif damage == "junk":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray(blob(4, len(data) - 64))  # a valid chunk, but stamped with another key
    victim.write_bytes(data)
    got = tier.get([key(i) for i in range(5)])
    assert got[3] is None and all(bytes(got[i]) == blob(i) for i in (0, 1, 2, 4))
    assert tier.stats().corrupt == 1 and not victim.exists()
    assert tier.contains_prefix([key(i) for i in range(5)]) == 3


def test_lru_eviction_by_bytes_and_hits_refresh(tmp_path: Path) -> None:
    size = len(blob(2))  # 70 KB chunks (i % 5 == 2)
    with DiskTier(tmp_path, NS, 3 * size + 100) as t:
        ids = [2, 7, 12, 17]
        t.put([(key(i), blob(i)) for i in ids[:3]])
        assert t.get([key(2)])[0] is not None  # 2 is now the most recent; 7 the oldest
        t.put([(key(17), blob(17))])
        assert [g is not None for g in t.get([key(i) for i in ids])] == [True, False, True, True]
        s = t.stats()
        assert s.evicted_chunks == 1 and s.bytes_used <= 3 * size + 100 and s.chunks == 3
        t.put([(key(1_000), blob(1_000, 4 * size))])  # larger than the whole tier: not stored
        assert t.stats().dropped == 1 and t.contains_prefix([key(1_000)]) == 0


def test_threads_sharing_a_tier_keep_index_and_disk_in_step(tmp_path: Path) -> None:
    t = DiskTier(tmp_path, NS, 1_500_000)
    blobs = {i: blob(i) for i in range(60)}
    bad: list[int] = []

    def work(seed: int) -> None:
        rng, end = random.Random(seed), time.monotonic() + 1.5
        while time.monotonic() < end:
            ids = [rng.randrange(60) for _ in range(4)]
            op = rng.random()
            if op < 0.4:
                t.put([(key(i), blobs[i]) for i in ids])
            elif op < 0.93:
                got = t.get([key(i) for i in ids])
                bad.extend(i for i, g in zip(ids, got) if g is not None and bytes(g) != blobs[i])
            else:
                t.delete([key(ids[0])])
    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = t.stats()
    files = {f.name: f.stat().st_size for f in chunk_files(t)}
    t.close()
    assert bad == [] and s.corrupt == 0 and s.errors == 0 and s.evicted_chunks > 0
    assert s.bytes_used <= 1_500_000 and sum(files.values()) == s.bytes_used and len(files) == s.chunks


def test_restart_keeps_chunks_and_lru_order(tmp_path: Path) -> None:
    size = len(blob(2))
    with DiskTier(tmp_path, NS, 3 * size + 100) as t:
        t.put([(key(i), blob(i)) for i in (2, 7, 12)])
        t.get([key(2)])
    with DiskTier(tmp_path, NS, 3 * size + 100) as t:
        assert t.stats().chunks == 3
        t.put([(key(17), blob(17))])
        assert t.contains_prefix([key(7)]) == 0 and t.contains_prefix([key(2), key(12), key(17)]) == 3


def test_namespaces_are_separate_and_clear_touches_only_its_own(tmp_path: Path) -> None:
    with DiskTier(tmp_path, "aa", 1 << 20) as a, DiskTier(f"file://{tmp_path}", "bb", 1 << 20) as b:
        a.put([(key(1), blob(1))])
        b.put([(key(1), blob(1)), (key(2), blob(2))])
        b.clear()
        assert b.get([key(1), key(2)]) == [None, None]
        assert bytes(a.get([key(1)])[0]) == blob(1)


def test_stale_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    ns_dir = tmp_path / NS
    ns_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = ns_dir / f".{key(1).hex()}.{int(dead.stdout)}-abcd.0.tmp"
    live = ns_dir / f".{key(2).hex()}.1-abcd.0.tmp"  # pid 1 is alive: its writer may still rename it
    stale.write_bytes(b"half a chunk")
    live.write_bytes(b"in flight")
    with DiskTier(tmp_path, NS, 1 << 20) as t:
        assert not stale.exists() and live.exists() and t.stats().chunks == 0


def test_bad_paths_and_arguments_raise_config_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match=str(not_a_dir)):
        DiskTier(not_a_dir, NS, 1 << 20)
    with pytest.raises(ConfigError, match="hex"):
        DiskTier(tmp_path, "../escape", 1 << 20)
    with pytest.raises(ConfigError, match="capacity"):
        DiskTier(tmp_path, NS, 0)
    read_only = tmp_path / "ro"
    with tmpfs(read_only, "ro,size=64k") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("cannot make a read-only directory as root without mount")
            read_only.chmod(0o500)
        with pytest.raises(ConfigError, match=str(read_only)):
            DiskTier(read_only, NS, 1 << 20)


def test_closed_tier_raises(tmp_path: Path) -> None:
    t = DiskTier(tmp_path, NS, 1 << 20)
    t.close()
    t.close()
    with pytest.raises(ClosedError):
        t.get([key(1)])


def test_disk_full_stops_writes_once_keeps_reads_and_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="nencache.disk")
    small = tmp_path / "small"
    with tmpfs(small, "size=1m") as mounted:
        t = DiskTier(small, NS, 8 << 20, full_retry_seconds=60)
        space = {"left": 2}  # without a mount: the third chunk write fails with ENOSPC

        def pwrite(fd: int, data: object, offset: int, real=os.pwrite) -> int:  # type: ignore[no-untyped-def]
            if space["left"] <= 0:
                raise OSError(28, "No space left on device")
            space["left"] -= 1
            return real(fd, data, offset)
        if not mounted:
            monkeypatch.setattr(disk_io.os, "pwrite", pwrite)
        try:
            for i in range(6):  # three fit in 1 MiB; the fourth fails, the rest wait for space
                t.put([(key(i), blob(i, 300_000))])
            stored = [i for i in range(6) if t.contains_prefix([key(i)])]
            assert stored == ([0, 1, 2] if mounted else [0, 1])
            t.put([(key(10), blob(10, 1000))])  # paused: not even tried
            assert t.contains_prefix([key(10)]) == 0 and t.stats().dropped >= 2
            assert all(bytes(b) == blob(i, 300_000) for i, b in zip(stored, t.get([key(i) for i in stored])))
            full = [r for r in caplog.records if r.name == "nencache.disk" and "full" in r.getMessage()]
            assert len(full) == 1 and full[0].levelno == logging.WARNING
            assert list(small.glob(f"{NS}/.*.tmp")) == []
            t.delete([key(stored[0])])  # space freed: writes resume
            space["left"] = 10
            t.put([(key(10), blob(10, 1000))])
            assert t.contains_prefix([key(10)]) == 1 and t.stats().errors == 0
        finally:
            t.close()


def test_restart_in_a_new_process_is_bit_exact(tmp_path: Path) -> None:
    with DiskTier(tmp_path, NS, 1 << 30) as t:
        t.put([(key(i), blob(i)) for i in range(10)])
    proc = child("""
        import sys
        from nencache.tiers.disk.tier import DiskTier
        with DiskTier(sys.argv[1], "ab12", 1 << 30) as t:
            got = t.get([key(i) for i in range(11)])
            ok = all(bytes(g) == blob(i) for i, g in enumerate(got[:10])) and got[10] is None
            print("ok" if ok and t.stats().corrupt == 0 else "bad")
    """, str(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "ok", err


def test_kill_9_while_writing_serves_no_torn_chunk_and_keeps_flushed_ones(tmp_path: Path) -> None:
    report = tmp_path / "flushed.txt"
    proc = child("""
        import sys
        from nencache.tiers.disk.tier import DiskTier
        t = DiskTier(sys.argv[1], "ab12", 1 << 40)
        with open(sys.argv[2], "a") as report:
            done = 0
            for start in range(0, 100_000, 4):
                t.put([(key(i), blob(i)) for i in range(start, start + 4)])
                if (start + 4) % 12 == 0:
                    t.flush()
                    report.write(" ".join(map(str, range(done, start + 4))) + "\\n")
                    report.flush()
                    done = start + 4
    """, str(tmp_path), str(report))
    deadline = time.monotonic() + 60
    while (not report.exists() or report.read_text().count("\n") < 3) and proc.poll() is None:
        assert time.monotonic() < deadline, "the writer never flushed"
        time.sleep(0.02)
    time.sleep(0.1 + (os.getpid() % 7) / 20)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    flushed = [int(i) for line in report.read_text().splitlines(keepends=True) if line.endswith("\n")
               for i in line.split()]
    assert len(flushed) >= 36
    with DiskTier(tmp_path, NS, 1 << 40) as t:
        assert list(t.path.glob(".*.tmp")) == []
        on_disk = sorted(int.from_bytes(bytes.fromhex(f.stem), "little") for f in chunk_files(t))
        assert set(flushed) <= set(on_disk)
        got = t.get([key(i) for i in on_disk])
        assert all(g is not None and bytes(g) == blob(i) for i, g in zip(on_disk, got))
        assert t.stats().corrupt == 0 and t.stats().errors == 0


def test_two_processes_share_a_directory_without_serving_a_bad_chunk(tmp_path: Path) -> None:
    script = """
        import json, os, random, sys, time
        from nencache.tiers.disk.tier import DiskTier
        root, me = sys.argv[1], sys.argv[2]
        rng = random.Random(me)
        t = DiskTier(root, "ab12", 1_500_000)
        open(os.path.join(root, "ready-" + me), "w").close()
        while not os.path.exists(os.path.join(root, "go")):
            time.sleep(0.005)
        served = bad = 0
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            ids = [rng.randrange(40) for _ in range(4)]
            op = rng.random()
            if op < 0.45:
                t.put([(key(i), blob(i)) for i in ids])
            elif op < 0.95:
                for i, g in zip(ids, t.get([key(i) for i in ids])):
                    if g is not None:
                        served += 1
                        bad += bytes(g) != blob(i)
            else:
                t.delete([key(ids[0])])
        s = t.stats()
        t.close()
        print(json.dumps({"served": served, "bad": bad, "corrupt": s.corrupt, "errors": s.errors,
                          "evicted": s.evicted_chunks}))
    """
    procs = [child(script, str(tmp_path), name) for name in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{n}").exists() for n in ("a", "b")):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read() + procs[1].stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (tmp_path / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    for r in results:
        assert r["bad"] == 0 and r["corrupt"] == 0 and r["errors"] == 0 and r["served"] > 0, results
    assert sum(r["evicted"] for r in results) > 0
    with DiskTier(tmp_path, NS, 1 << 30) as t:
        on_disk = [int.from_bytes(bytes.fromhex(f.stem), "little") for f in chunk_files(t)]
        got = t.get([key(i) for i in on_disk])
        assert all(g is not None and bytes(g) == blob(i) for i, g in zip(on_disk, got))


def _index_matches_files(t: DiskTier) -> None:
    """Every indexed chunk has its file, the index's byte count is the files' and within capacity."""
    files = {int.from_bytes(bytes.fromhex(f.stem), "little"): f.stat().st_size for f in chunk_files(t)}
    s = t.stats()
    indexed = t._index.entries  # noqa: SLF001 - the index is what lookup() answers from
    missing = [k for k in indexed if not (t.path / f"{k.hex()}.kv").exists()]
    assert missing == [], f"{len(missing)} indexed chunks have no file"
    assert s.bytes_used == sum(files.values()) and s.chunks == len(files)
    assert s.bytes_used <= t.capacity_bytes


def test_a_get_racing_an_eviction_never_brings_back_a_deleted_chunk(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from nencache.tiers.disk import tier as disk_module

    size = len(blob(2))
    t = DiskTier(tmp_path, NS, 3 * size + 100)
    t.put([(key(2), blob(2))])
    reading, evicted = threading.Event(), threading.Event()
    real_read = disk_module.read_chunk

    def read_then_stall(path, k, direct, buffers):  # type: ignore[no-untyped-def]
        data = real_read(path, k, direct, buffers)
        if k == key(2):
            reading.set()
            evicted.wait(10)  # the file is evicted and deleted while this read is between its bytes and the index
        return data

    monkeypatch.setattr(disk_module, "read_chunk", read_then_stall)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(t.get([key(2)])[0]))
    reader.start()
    assert reading.wait(10)
    t.put([(key(i), blob(i)) for i in (7, 12, 17)])  # key 2 is the oldest: evicted, its file deleted
    assert not (t.path / f"{key(2).hex()}.kv").exists()
    evicted.set()
    reader.join(10)
    assert got and got[0] is not None and bytes(got[0]) == blob(2)  # its bytes were whole when read
    assert t.contains_prefix([key(2)]) == 0  # but lookup must not report a chunk retrieve would miss
    assert t.get([key(2)]) == [None]
    _index_matches_files(t)
    t.close()


def test_threads_racing_gets_against_evictions_keep_index_and_files_in_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eviction race, scaled: every read pauses between its bytes and the index while puts evict."""
    from nencache.tiers.disk import tier as disk_module

    real_read = disk_module.read_chunk
    monkeypatch.setattr(disk_module, "read_chunk",
                        lambda *args: (real_read(*args), time.sleep(0.002))[0])
    t = DiskTier(tmp_path, NS, 400_000)
    blobs = {i: blob(i, 20_000 + 1000 * (i % 7)) for i in range(200)}
    stop = time.monotonic() + 2.0

    def putter(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            t.put([(key(i), blobs[i]) for i in rng.sample(range(200), 3)])

    def getter(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            ids = rng.sample(range(200), 6)
            for i, g in zip(ids, t.get([key(i) for i in ids])):
                assert g is None or bytes(g) == blobs[i]

    stale: list[int] = []

    def checker() -> None:  # at every instant, an indexed chunk has its file
        while time.monotonic() < stop:
            with t._lock:  # noqa: SLF001 - a consistent view of the index
                stale.append(sum(not (t.path / f"{k.hex()}.kv").exists() for k in t._index.entries))  # noqa: SLF001
            time.sleep(0.005)

    threads = [threading.Thread(target=putter, args=(s,)) for s in range(2)]
    threads += [threading.Thread(target=getter, args=(10 + s,)) for s in range(3)]
    threads.append(threading.Thread(target=checker))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.stats().evicted_chunks > 50
    assert sum(stale) == 0, f"indexed chunks without a file seen {sum(stale)} times in {len(stale)} checks"
    _index_matches_files(t)
    known = [i for i in range(200) if key(i) in t._index]  # noqa: SLF001
    assert all(g is not None for g in t.get([key(i) for i in known]))
    t.close()


def _tamper_checkpoint(directory: Path, change: Callable[[bytes, int], int]) -> None:
    from nencache.tiers.disk.index import load_checkpoint, save_checkpoint

    entries = load_checkpoint(directory)
    assert entries, "no checkpoint to tamper with"
    save_checkpoint(directory, [(k, change(k, s)) for k, s in entries], ".tamper.tmp")


def test_a_checkpoint_with_wrong_sizes_is_caught_at_start_and_disk_size_holds(tmp_path: Path) -> None:
    blobs = {i: blob(i, 50_000) for i in range(20)}
    with DiskTier(tmp_path, NS, 1 << 30) as t:
        t.put(list((key(i), b) for i, b in blobs.items()))
    real = 20 * len(blobs[0])
    _tamper_checkpoint(tmp_path / NS, lambda k, s: s // 20)  # well formed, checksummed, and wrong
    with DiskTier(tmp_path, NS, 1 << 30) as t:
        assert t.stats().bytes_used == real
    _tamper_checkpoint(tmp_path / NS, lambda k, s: s // 20)
    with DiskTier(tmp_path, NS, real // 2 - 1) as t:  # the real sizes do not fit: disk_size is kept
        _index_matches_files(t)
        assert t.stats().chunks == 9


def test_a_checkpoint_size_missed_at_start_is_corrected_by_the_first_read(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from nencache.tiers.disk import index as disk_index

    monkeypatch.setattr(disk_index, "START_CHECKS", 0, raising=False)  # the start-up sample sees nothing
    blobs = {i: blob(i, 50_000) for i in range(10)}
    with DiskTier(tmp_path, NS, 1 << 30) as t:
        t.put(list((key(i), b) for i, b in blobs.items()))
    _tamper_checkpoint(tmp_path / NS, lambda k, s: 100 if k == key(3) else s)
    with DiskTier(tmp_path, NS, 10 * len(blobs[0]) - 1000) as t:  # one chunk too many, if sizes are right
        assert bytes(t.get([key(3)])[0]) == blobs[3]
        _index_matches_files(t)
        assert t.stats().chunks == 9
