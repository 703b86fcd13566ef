"""File I/O of the disk tier: aligned buffers, O_DIRECT probing, atomic chunk writes, checked reads.

A chunk file holds exactly one blob in the shared byte format. It is written under a unique
temporary name, synced and renamed into place, so a reader in any process sees either the whole
chunk or no file. Large blobs move with O_DIRECT from page-aligned buffers where the filesystem
allows it; small blobs and filesystems without O_DIRECT (tmpfs) use the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nencache.errors import ConfigError, CorruptChunkError
from nencache.format import HEADER_SIZE, split_blob

ALIGN = 4096  # O_DIRECT buffer, offset and length alignment (covers 512-byte and 4 KiB devices)
DIRECT_MIN = 256 * 1024  # smaller blobs go through the page cache: O_DIRECT gains nothing there
MAX_CHUNK_FILE = 1 << 36  # a larger file is not a chunk this tier wrote
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def address_of(buf: bytes | bytearray | memoryview | mmap.mmap) -> int:
    """The memory address of a buffer's first byte (read-only buffers included)."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if len(buf) else 0


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zeroed, page-aligned anonymous buffer; a blob built in one is written without a copy."""
    return mmap.mmap(-1, max(round_up(nbytes), ALIGN))


def disk_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path; LMCache's `file:///abs/dir` (and `file://rel/dir`) forms are accepted."""
    text = os.fspath(path).removeprefix("file://")
    if not text:
        raise ConfigError("disk path is empty; give a directory such as /var/cache/nencache")
    return Path(text).expanduser()


def prepare_directory(root: Path, directory: Path) -> None:
    """Create `directory` (under `root`) and check a file can be written there; ConfigError if not."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"disk path {root} exists and is not a directory; point disk_path at a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}-w.{os.urandom(4).hex()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"disk path {root} is not a writable directory ({exc.strerror or exc}); "
            "create it and give this user write access, or choose another disk_path"
        ) from None


def probe_direct_io(directory: Path) -> bool:
    """Whether files in `directory` accept O_DIRECT writes and reads of aligned buffers (False if unsure)."""
    if not _O_DIRECT:
        return False
    probe = directory / f".probe.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    buf = aligned_buffer(ALIGN)
    buf[:4] = b"NENC"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        if os.pwrite(fd, buf, 0) != ALIGN:
            return False
        buf[:4] = bytes(4)
        return os.preadv(fd, [buf], 0) == ALIGN and buf[:4] == b"NENC"
    except OSError:  # EINVAL: no O_DIRECT here; ENOSPC and others: unsure, so use the page cache
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview, offset: int = 0) -> None:
    while len(view):
        done = os.pwrite(fd, view, offset)
        if done <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view, offset = view[done:], offset + done


@dataclass(slots=True)
class ChunkWriter:
    """Writes blobs to chunk files; keeps one aligned staging buffer per I/O thread."""

    direct: bool
    _local: threading.local = field(default_factory=threading.local)

    def _staging(self, nbytes: int) -> memoryview:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = aligned_buffer(nbytes)
        return memoryview(buf)[:nbytes]

    def write(self, tmp: Path, final: Path, blob: bytes | bytearray | memoryview) -> int:
        """Write `blob` to `tmp`, sync it, rename it to `final`; return its size. `tmp` is gone on failure."""
        view = memoryview(blob).cast("B")
        size = len(view)
        use_direct = self.direct and size >= DIRECT_MIN
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (_O_DIRECT if use_direct else 0), 0o644)
        try:
            if use_direct:
                self._write_direct(fd, view)
                os.ftruncate(fd, size)
            else:
                _write_all(fd, view)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def _write_direct(self, fd: int, view: memoryview) -> None:
        """Whole aligned blocks with O_DIRECT; the caller truncates the zero padding of the last one."""
        size = len(view)
        body = size - size % ALIGN if address_of(view) % ALIGN == 0 else 0
        if body:  # the caller's buffer is page-aligned: write it in place, stage only the tail
            _write_all(fd, view[:body])
        tail = size - body
        if tail:
            staging = self._staging(round_up(tail))
            np.copyto(np.frombuffer(staging, np.uint8)[:tail], np.frombuffer(view[body:], np.uint8))
            staging[tail:] = bytes(len(staging) - tail)
            _write_all(fd, staging, body)


def aligned_array(nbytes: int) -> np.ndarray:
    """An uninitialised, ALIGN-aligned byte array from the allocator (whose freed memory is reused cheaply)."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset : offset + nbytes]


class ReadBuffers:
    """Aligned read buffers handed out as arrays and taken back when the caller drops every view of them.

    Reusing buffers spares the kernel faulting in fresh pages on every read. At most `max_bytes` of
    idle buffers are kept; beyond that a buffer goes back to the allocator when its views are dropped.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._idle: list[np.ndarray] = []
        self._idle_bytes = 0
        self._lock = threading.RLock()  # a finalizer may run inside `take` on the same thread

    def take(self, nbytes: int) -> np.ndarray:
        """An aligned array of `nbytes` rounded up to ALIGN; its memory returns here once it is dropped."""
        want = max(round_up(nbytes), ALIGN)
        base = None
        with self._lock:
            for i, idle in enumerate(self._idle):
                if want <= len(idle) <= 2 * want:
                    base = self._idle.pop(i)
                    self._idle_bytes -= len(base)
                    break
        if base is None:
            base = aligned_array(want)
        handle = base[:want]
        if self._max_bytes > 0:
            weakref.finalize(handle, self._give_back, base).atexit = False
        return handle

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self._idle_bytes + len(base) <= self._max_bytes:
                self._idle.append(base)
                self._idle_bytes += len(base)


class BadChunkFile(CorruptChunkError):
    """A chunk file failed its checks; `inode` names the file that failed, so only that one is removed."""

    def __init__(self, message: str, inode: int) -> None:
        super().__init__(message)
        self.inode = inode


def read_chunk(path: Path, key: bytes, direct: bool, buffers: ReadBuffers) -> memoryview:
    """The checked blob stored at `path`: FileNotFoundError when absent, `BadChunkFile` when damaged."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size < HEADER_SIZE or size > MAX_CHUNK_FILE:
            raise BadChunkFile(f"chunk file {path} has an impossible size of {size} bytes", st.st_ino)
        want = size
        if direct and size >= DIRECT_MIN:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
            want = round_up(size)
        view = buffers.take(want).data
        got = 0
        while got < size:
            done = os.preadv(fd, [view[got:want]], got)
            if done <= 0:
                break
            got += done
    finally:
        os.close(fd)
    blob = view[:size]
    try:
        if got != size:
            raise CorruptChunkError(f"chunk file {path} ended after {got} of {size} bytes")
        split_blob(blob, expected_key=key)
    except CorruptChunkError as exc:
        raise BadChunkFile(f"{path}: {exc}", st.st_ino) from None
    return blob
