"""`MemoryPool`: one preallocated buffer carved into fixed pages with reference counts.

The pool is the only large allocation NenCache makes. It is allocated once, at start-up, and never
grows. Every page has the same size (one full chunk as the CPU codec stores it), so any free page
fits any chunk: there is no fragmentation. Who may evict what is the memory tier's business; the
pool only hands out pages and counts readers.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

from nencache.errors import ConfigError

_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def cuda_pinning_available() -> bool:
    """Pinned (page-locked) host memory needs a CUDA runtime."""
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver install must not stop a CPU-only cache
        return False


class MemoryPool:
    """`num_pages` pages of `page_bytes` each, in one `torch.uint8` buffer."""

    def __init__(self, capacity_bytes: int, page_bytes: int, *, pin_memory: bool | None = None,
                 buffer: torch.Tensor | None = None, generations: np.ndarray | None = None) -> None:
        if page_bytes <= 0:
            raise ConfigError(f"page size must be positive, got {page_bytes}")
        num_pages = capacity_bytes // page_bytes
        if num_pages < 1:
            raise ConfigError(
                f"cpu_size of {capacity_bytes} bytes is smaller than one chunk ({page_bytes} bytes); "
                "raise cpu_size or lower chunk_size"
            )
        pin = cuda_pinning_available() if pin_memory is None else pin_memory
        if pin and not cuda_pinning_available():
            raise ConfigError("pin_memory=true needs CUDA, which is not available here; leave pin_memory unset")
        self.page_bytes = page_bytes
        self.num_pages = num_pages
        self.pinned = pin
        if buffer is not None and (buffer.dtype != torch.uint8 or buffer.numel() < num_pages * page_bytes):
            raise ConfigError(f"the pool's buffer must be {num_pages * page_bytes} bytes of uint8")
        if generations is not None and len(generations) < num_pages:
            raise ConfigError(f"the pool needs {num_pages} page generation counters")
        self.buffer = torch.empty(num_pages * page_bytes, dtype=torch.uint8, pin_memory=pin) if buffer is None else buffer
        # Bumped each time a page is freed: a reader outside the process (a shared-memory client) that
        # copied a page knows its bytes were intact when the generation is unchanged after the copy.
        self.generations = generations
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low pages first
        self._lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def page(self, index: int) -> torch.Tensor:
        """The page's bytes, as a view into the pool (no allocation of data)."""
        start = index * self.page_bytes
        return self.buffer[start : start + self.page_bytes]

    def allocate(self) -> int | None:
        """Take a free page (its reference count becomes 1), or `None` when the pool is full."""
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
            self._refs[index] = 1
            return index

    def acquire(self, index: int) -> None:
        """Add a reference: a page with references is never freed under a reader."""
        with self._lock:
            assert self._refs[index] > 0, "acquire of a free page"
            self._refs[index] += 1

    def release(self, index: int) -> None:
        """Drop a reference; the page returns to the free list when none are left."""
        with self._lock:
            assert self._refs[index] > 0, "release of a free page"
            self._refs[index] -= 1
            if self._refs[index] == 0:
                if self.generations is not None:
                    self.generations[index] += 1
                self._free.append(index)

    def refcount(self, index: int) -> int:
        return self._refs[index]

    def prefault(self, step: int = 64 << 20) -> bool:
        """Map every page of the buffer now (Linux `MADV_POPULATE_WRITE`; contents untouched, safe in use).

        A first write into fresh memory runs several times slower than into mapped memory (page
        faults); populating ahead keeps them off the store path. False where unsupported.
        """
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return False
        address, size = self.buffer.data_ptr(), self.buffer.numel()
        start, end = (address + 4095) & ~4095, (address + size) & ~4095
        for offset in range(start, end, step):
            if libc.madvise(ctypes.c_void_p(offset), ctypes.c_size_t(min(step, end - offset)), _MADV_POPULATE_WRITE):
                return False
        return True
