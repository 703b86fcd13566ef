"""How the disk tier meets a full disk and I/O errors: pause writes, log once, keep serving reads."""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("nencache.disk")

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(slots=True)
class DiskFaults:
    """Write pause after ENOSPC, and warn-once logging per kind of failure (later ones at debug level)."""

    path: Path
    retry_seconds: float
    full_until: float = 0.0
    full_logged: bool = False
    warned: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def writes_paused(self) -> bool:
        return time.monotonic() < self.full_until

    def disk_full(self) -> None:
        """A write met ENOSPC: pause writes for `retry_seconds` (or until space is freed); log it once."""
        with self.lock:
            self.full_until = time.monotonic() + self.retry_seconds
            first, self.full_logged = not self.full_logged, True
        if first:
            log.warning("disk tier %s: the disk is full (ENOSPC); new chunks are not written for %.0f s or until "
                        "chunks are deleted, reads continue. Free space on the disk or lower disk_size.",
                        self.path, self.retry_seconds)

    def space_freed(self) -> None:
        """Chunks were deleted: let the next write try again."""
        self.full_until = 0.0

    def wrote(self) -> None:
        """A write succeeded: a later full disk is logged again."""
        if self.full_logged:
            with self.lock:
                was, self.full_logged = self.full_logged, False
            if was:
                log.info("disk tier %s: writes resumed", self.path)

    def warn(self, kind: str, message: str, *args: object) -> None:
        """Log `message` at WARNING the first time for `kind`, at DEBUG after that."""
        with self.lock:
            first = kind not in self.warned
            self.warned.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def io_error(self, what: str, exc: OSError) -> None:
        self.warn(what, "disk tier %s: %s failed: %s. The chunk is treated as a miss; check the disk. "
                  "Further %s errors are logged at debug level.", self.path, what, exc, what)
