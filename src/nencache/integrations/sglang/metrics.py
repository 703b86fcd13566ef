"""`TransferLog`: the pages and bandwidth behind SGLang's storage metrics (`--enable-storage-metrics`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(slots=True)
class TransferLog:
    """Pages and bandwidth (GB/s) of each storage read (prefetch) and write (backup) until `drain`.

    SGLang's `--enable-storage-metrics` drains it through `get_stats` into its Prometheus histograms;
    calls from SGLang's prefetch and backup threads record concurrently.
    """

    prefetch_pages: list[int] = field(default_factory=list)
    backup_pages: list[int] = field(default_factory=list)
    prefetch_gbps: list[float] = field(default_factory=list)
    backup_gbps: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, backup: bool, pages: int, nbytes: int, seconds: float) -> None:
        rate = nbytes / max(seconds, 1e-9) / 1e9
        with self._lock:
            (self.backup_pages if backup else self.prefetch_pages).append(pages)
            (self.backup_gbps if backup else self.prefetch_gbps).append(rate)

    def drain(self) -> tuple[list[int], list[int], list[float], list[float]]:
        """(prefetch pages, backup pages, prefetch GB/s, backup GB/s) since the last drain."""
        with self._lock:
            out = (self.prefetch_pages, self.backup_pages, self.prefetch_gbps, self.backup_gbps)
            self.prefetch_pages, self.backup_pages, self.prefetch_gbps, self.backup_gbps = [], [], [], []
        return out
