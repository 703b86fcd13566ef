"""What every suite gets: the user's config, the run's size, a scratch directory, services and progress."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nencache.bench.progress import Progress
from nencache.bench.services import Services
from nencache.config import CacheConfig
from nencache.layout import KVLayout

# SmolLM2-135M's KV: 30 layers x 3 KV heads x head dim 64, bf16; a 256-token chunk is 5.9 MB.
SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
DEFAULT_DISK_DIR = Path("/var/tmp")  # usually a real disk; /tmp is often a tmpfs


@dataclass(slots=True)
class Scale:
    """How much each suite does: `quick` is for `make bench` (indicative figures), the default for real ones."""

    quick: bool
    reps: int = 7
    chunks: int = 64  # 256-token SmolLM2 chunks per tier pass (5.9 MB each)
    samples: int = 400  # single-access latency samples per tier
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096)  # TTFT context lengths
    memory_tokens: int = 16384  # tokens held by each side of the memory suite
    trace_requests: int = 0  # requests of a trace replayed (0: all)
    capacities: tuple[str, ...] = ("1%", "5%", "10%")  # CPU tier sizes of the trace replay

    @classmethod
    def of(cls, quick: bool) -> Scale:
        if not quick:
            return cls(False)
        return cls(True, reps=3, chunks=8, samples=60, contexts=(1024,), memory_tokens=4096, trace_requests=3000,
                   capacities=("5%",))


@dataclass(slots=True)
class BenchContext:
    """Shared by the suites of one run (see the module docstring)."""

    config: CacheConfig
    scale: Scale
    workdir: Path
    progress: Progress
    services: Services
    compare_lmcache: bool = False
    lmcache_python: Path | None = None
    trace: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return self.scale.quick

    def disk_dir(self) -> tuple[Path, str]:
        """A scratch directory on the disk of the user's disk tier (its `disk_path`), else /var/tmp; and a
        line saying which."""
        if self.config.tiers.disk.path:
            base, origin = Path(self.config.tiers.disk.path).expanduser(), "the config's disk_path"
        else:
            base = DEFAULT_DISK_DIR if DEFAULT_DISK_DIR.is_dir() else Path(tempfile.gettempdir())
            origin = "no disk_path in the config"
        base.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="nencache-bench-", dir=base))
        return scratch, f"{base} ({origin})"


def find_lmcache(explicit: str | Path | None = None) -> Path | None:
    """An interpreter that imports LMCache: `explicit`, this one, or ./.venv-lmcache (benchmarks/setup_lmcache.sh)."""
    if explicit:
        path = Path(explicit)
        return path if path.exists() else None
    if importlib.util.find_spec("lmcache") is not None:
        return Path(sys.executable)
    local = Path.cwd() / ".venv-lmcache" / "bin" / "python"
    return local if local.exists() else None


def scratch_cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def drop_page_cache(directory: Path | None = None) -> bool:
    """Empty the page cache so the next read comes from the disk: all of it (needs root), else the pages of
    the files under `directory` (posix_fadvise). False when neither was possible."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        pass
    if directory is None:
        return False
    for path in directory.rglob("*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    return True
