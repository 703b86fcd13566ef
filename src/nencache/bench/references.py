"""What this machine can do at most, measured in the same run as NenCache: the references of every ratio.

- memory: `copy_` of the same bytes between two preallocated tensors (a memcpy);
- disk: `dd` with direct I/O (`oflag=direct conv=fsync` to write, `iflag=direct` to read);
- Redis: `redis-benchmark` SET / GET of values of the chunk's size (better of 1 and 4 connections);
- network: a raw TCP socket moving the same bytes to or from a child process (no framing, no checks).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

_RAW_PEER = r"""
import socket, sys
size = int(sys.argv[1])
data = memoryview(bytearray(b"x" * size))
into = memoryview(bytearray(size))
listener = socket.create_server(("127.0.0.1", 0)); print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for option in (socket.SO_SNDBUF, socket.SO_RCVBUF): conn.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
while True:
    op = conn.recv(1)
    if not op:
        break
    if op == b"G":
        conn.sendall(data)
    else:
        got = 0
        while got < size:
            got += conn.recv_into(into[got:])
        conn.sendall(b"k")
"""


class RawSocket:
    """`size` bytes to or from a child process over one loopback TCP connection, into touched buffers.

    The child is a separate process, as a peer or server is: the bytes cross the kernel once each way.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.proc = subprocess.Popen([sys.executable, "-c", _RAW_PEER, str(size)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.sock = socket.create_connection(("127.0.0.1", int(self.proc.stdout.readline())))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        self.into = memoryview(bytearray(b"y" * size))
        self.data = memoryview(bytearray(b"z" * size))

    def fetch(self) -> float:
        """Seconds to receive `size` bytes (one request byte, then the bytes)."""
        started = time.perf_counter()
        self.sock.sendall(b"G")
        got = 0
        while got < self.size:
            got += self.sock.recv_into(self.into[got:])
        return time.perf_counter() - started

    def send(self) -> float:
        """Seconds to send `size` bytes and have them acknowledged."""
        started = time.perf_counter()
        self.sock.sendall(b"P")
        self.sock.sendall(self.data)
        self.sock.recv(1)
        return time.perf_counter() - started

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)

    def __enter__(self) -> RawSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memcpy_seconds(source: torch.Tensor, target: torch.Tensor) -> float:
    """Seconds of one `copy_` of `source` into the preallocated `target`."""
    started = time.perf_counter()
    target.copy_(source)
    return time.perf_counter() - started


def dd_available() -> bool:
    return shutil.which("dd") is not None


def dd_seconds(args: list[str]) -> float:
    """Run `dd`; its own elapsed seconds."""
    done = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    match = re.search(r"copied, ([0-9.e+-]+) s", done.stderr)
    if not match:
        raise RuntimeError(f"cannot read dd's timing from: {done.stderr!r}")
    return float(match.group(1))


def dd_write(path: Path, block: int, count: int) -> float:
    """Seconds for `dd` to write `count` blocks of `block` bytes to `path`, direct I/O, synced."""
    return dd_seconds(["if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "conv=fsync", "oflag=direct"])


def dd_read(path: Path, block: int) -> float:
    """Seconds for `dd` to read `path` with direct I/O."""
    return dd_seconds([f"if={path}", "of=/dev/null", f"bs={block}", "iflag=direct"])


def redis_benchmark(host: str, port: int, size: int, total_bytes: int = 256 << 20) -> dict[str, float] | None:
    """`redis-benchmark` GB/s for `size`-byte values: {"SET": ..., "GET": ...}, the better of `-c 1` and
    `-c 4` each; None where redis-benchmark is not installed."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    requests = max(32, total_bytes // size)
    best: dict[str, float] = {}
    for clients in ("1", "4"):
        text = subprocess.run([exe, "-h", host, "-p", str(port), "-d", str(size), "-t", "set,get", "-n", str(requests),
                               "-c", clients, "--csv"], capture_output=True, text=True, check=True, timeout=600).stdout
        for op, rps in re.findall(r'^"(SET|GET)","([\d.]+)"', text, re.MULTILINE):
            best[op] = max(best.get(op, 0.0), float(rps) * size / 1e9)
    return best
