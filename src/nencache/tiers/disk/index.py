"""What the disk tier holds: an in-memory index (eviction order from a policy, LRU by default), rebuilt at
start from the directory.

The directory is the truth: a chunk is the file `<key hex>.kv`. At start the index is rebuilt from a
directory listing plus a checkpoint file (`index.ckpt`: keys and sizes in LRU order, written by
`close` and, at most every `checkpoint_seconds`, by `flush`), so only files missing from the
checkpoint need a `stat`; their modification times (refreshed on every hit) order them after the
checkpointed ones. A missing or damaged checkpoint means a full `stat` scan. The checkpoint is not
trusted blindly: a sample of its sizes is checked against the files at start (one wrong size means a
full `stat` scan), and the tier checks a chunk's size again on every read.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nencache.policy.index import PolicyIndex

log = logging.getLogger("nencache.disk")

SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
CHECKPOINT = "index.ckpt"
START_CHECKS = 64  # checkpointed sizes checked against their files at start (all of them if one is wrong)
STALE_TMP_SECONDS = 3600.0
_CKPT_MAGIC = b"NENCIDX1"
_CKPT_HEAD = struct.Struct("<8sQ")
_CKPT_REC = struct.Struct("<16sQ")
_CRC = struct.Struct("<I")


def chunk_name(key: bytes) -> str:
    return key.hex() + SUFFIX


def key_of(name: str) -> bytes | None:
    """The key a chunk file name stands for, or None if the name is not a chunk file."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    try:
        return bytes.fromhex(name[: -len(SUFFIX)])
    except ValueError:
        return None


@dataclass(slots=True)
class LruIndex:
    """Key -> file size in the policy's eviction order (`entries.items()`: next victim first), with the byte
    total. Not thread-safe: the tier holds its lock."""

    entries: PolicyIndex[int] = field(default_factory=PolicyIndex)
    bytes_used: int = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def add(self, key: bytes, size: int) -> None:
        """Insert or replace `key` as the most recently used."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes_used -= old
        self.entries[key] = size
        self.bytes_used += size

    def touch(self, key: bytes) -> bool:
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        return False

    def remove(self, key: bytes) -> int | None:
        size = self.entries.pop(key, None)
        if size is not None:
            self.bytes_used -= size
        return size

    def pop_oldest(self) -> tuple[bytes, int]:
        key, size = self.entries.popitem(last=False)
        self.bytes_used -= size
        return key, size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes_used = 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(directory: Path, name: str) -> None:
    """Remove a temporary file left by a dead process (`.<anything>.<pid>-<salt>.<n>.tmp`)."""
    path = directory / name
    parts = name.split(".")
    try:
        pid = int(parts[-3].split("-")[0]) if len(parts) >= 4 else -1
    except ValueError:
        pid = -1
    try:
        if pid > 0 and pid != os.getpid() and not _pid_alive(pid):
            path.unlink()
        elif time.time() - path.stat().st_mtime > STALE_TMP_SECONDS:
            path.unlink()
    except FileNotFoundError:
        pass


def load_checkpoint(directory: Path) -> list[tuple[bytes, int]]:
    """The (key, size) list of the checkpoint, oldest first; empty when absent or damaged."""
    try:
        data = (directory / CHECKPOINT).read_bytes()
    except FileNotFoundError:
        return []
    if len(data) < _CKPT_HEAD.size + _CRC.size or zlib.crc32(data[:-4]) != _CRC.unpack_from(data, len(data) - 4)[0]:
        log.warning("disk index checkpoint in %s is damaged; rebuilding it from a full directory scan", directory)
        return []
    magic, count = _CKPT_HEAD.unpack_from(data)
    if magic != _CKPT_MAGIC or _CKPT_HEAD.size + count * _CKPT_REC.size + _CRC.size != len(data):
        return []
    return list(_CKPT_REC.iter_unpack(memoryview(data)[_CKPT_HEAD.size : len(data) - _CRC.size]))


def save_checkpoint(directory: Path, entries: list[tuple[bytes, int]], tmp_name: str) -> None:
    """Write the checkpoint atomically (temporary file + rename). Keys that are not 16 bytes are left out."""
    records = [(k, s) for k, s in entries if len(k) == 16]
    body = bytearray(_CKPT_HEAD.pack(_CKPT_MAGIC, len(records)))
    body += b"".join(_CKPT_REC.pack(k, s) for k, s in records)
    body += _CRC.pack(zlib.crc32(body))
    tmp = directory / tmp_name
    try:
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, directory / CHECKPOINT)
    finally:
        tmp.unlink(missing_ok=True)


def _stat_all(job: tuple[int, list[str]]) -> list[os.stat_result | None]:
    dir_fd, names = job
    out: list[os.stat_result | None] = []
    for name in names:
        try:
            out.append(os.stat(name, dir_fd=dir_fd))
        except FileNotFoundError:
            out.append(None)
    return out


def _stat_names(directory: Path, names: list[str], map_fn: Callable[..., Iterable[list[os.stat_result | None]]],
                ) -> list[os.stat_result | None]:
    """`stat` of each name in `directory` (None where gone), in blocks through `map_fn`."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        blocks = [(dir_fd, names[i : i + 2048]) for i in range(0, len(names), 2048)]
        return list(itertools.chain.from_iterable(map_fn(_stat_all, blocks)))
    finally:
        os.close(dir_fd)


def _checked(directory: Path, listed: list[tuple[bytes, int]], names: dict[bytes, str],
             map_fn: Callable[..., Iterable[list[os.stat_result | None]]]) -> tuple[list[tuple[bytes, int]], int]:
    """The checkpoint's (key, size) list, checked against the files: a sample of `START_CHECKS` entries is
    `stat`ed; if one disagrees, every entry is, and the files' sizes replace the checkpoint's. Also the count
    of entries corrected (a checkpoint with any is rewritten)."""
    sample = random.sample(listed, min(START_CHECKS, len(listed)))
    found = _stat_names(directory, [names[key] for key, _ in sample], map_fn)
    if all(st is None or st.st_size == size for (_, size), st in zip(sample, found)):
        return listed, 0
    log.warning("disk index checkpoint in %s gives sizes that disagree with the chunk files; checking every file",
                directory)
    found = _stat_names(directory, [names[key] for key, _ in listed], map_fn)
    checked = [(key, st.st_size) for (key, _), st in zip(listed, found) if st is not None]
    return checked, sum(st is None or st.st_size != size for (_, size), st in zip(listed, found))


def scan(directory: Path, map_fn: Callable[..., Iterable[list[os.stat_result | None]]] = map,
         ) -> tuple[list[tuple[bytes, int]], int]:
    """The chunks in `directory` as (key, size), least recently used first, and how many were missing from
    the checkpoint or listed with a wrong size (files are `stat`ed through `map_fn`, e.g. a thread pool's).
    The checkpoint's sizes are checked against a sample of the files (see `_checked`); the tier checks each
    chunk's size again whenever it reads it. Removes temporary files left by dead processes."""
    names: dict[bytes, str] = {}
    with os.scandir(directory) as it:
        for entry in it:
            name = entry.name
            if name.endswith(TMP_SUFFIX) and name.startswith("."):
                _remove_stale_tmp(directory, name)
            elif (key := key_of(name)) is not None:
                names[key] = name
    listed = [(key, size) for key, size in load_checkpoint(directory) if key in names]
    ordered, corrected = _checked(directory, listed, names, map_fn)
    for key, _ in listed:
        del names[key]
    keys, rest = list(names), list(names.values())
    stats = _stat_names(directory, rest, map_fn)
    tail = sorted((st.st_mtime_ns, key, st.st_size) for key, st in zip(keys, stats) if st is not None)
    ordered.extend((key, size) for _, key, size in tail)
    return ordered, len(tail) + corrected
