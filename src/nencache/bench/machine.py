"""The machine a benchmark ran on: CPU, memory, disk under the disk tier, load, software versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from nencache.cpu_dtype import NATIVE_BF16_FLAGS, cpu_flags


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(device, mount point, filesystem type) holding `path`, from /proc/mounts."""
    best = ("?", "", "?")
    try:
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind, *_ = line.split()
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                best = (device, mount, kind)
    except OSError:
        pass
    return best


def disk_kind(path: Path) -> str:
    """`nvme`, `ssd`, `hdd`, `memory` (tmpfs) or `disk` (a block device whose kind is not known)."""
    device, _, fs = _mount_of(path)
    if fs in ("tmpfs", "ramfs"):
        return "memory"
    name = Path(device).name
    if name.startswith("nvme"):
        return "nvme"
    base = name.rstrip("0123456789")
    for candidate in (name, base, base.removesuffix("p") if base.endswith("p") else base):
        rotational = Path(f"/sys/block/{candidate}/queue/rotational")
        if rotational.exists():
            try:
                spinning = rotational.read_text().strip() == "1"
            except OSError:
                break
            # virtio and other virtual disks report 0 without saying what is behind them
            if candidate.startswith(("vd", "xvd")):
                return "disk"
            return "hdd" if spinning else "ssd"
    return "disk"


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def describe(disk_dir: Path | None = None) -> dict[str, Any]:
    """This machine, as the JSON report records it."""
    import torch

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "cpu_bf16_flags": sorted(flags & set(NATIVE_BF16_FLAGS)),
        "avx512": any(f.startswith("avx512") for f in flags),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "nencache": _package_version("nencache"),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1m": load_average(),
    }
    if disk_dir is not None:
        device, mount, fs = _mount_of(disk_dir)
        info["disk"] = {"path": str(disk_dir), "device": device, "mount": mount, "filesystem": fs,
                        "kind": disk_kind(disk_dir)}
    return info


def one_line(info: dict[str, Any]) -> str:
    """The description as one line (for tables and the report's head)."""
    memory = f", {info['memory_bytes'] / 2**30:.0f} GiB RAM" if info.get("memory_bytes") else ""
    disk = info.get("disk")
    where = f", disk tier on {disk['filesystem']} ({disk['kind']}, {disk['device']})" if disk else ""
    gpu = f", {info['cuda']}" if info.get("cuda") else ""
    return (f"{info['cpu']}, {info['cores']} cores{memory}{gpu}{where}; Python {info['python']}, "
            f"torch {info['torch']}, {info['os']}")
