"""Helpers of the server tests: a server in a child process, raw frames, test chunks."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nencache.format import ChunkHeader
from nencache.net.protocol import HEADER_SIZE, Frame, Op, pack_keyed_meta, unpack_header

_LISTENING = re.compile(r"listening on nencaches?://(\S+):(\d+)(?:, admin http://\S+:(\d+))?")


@dataclass
class ServerProcess:
    """`nencache serve` in a child process; `start()` again reuses the same ports."""

    directory: Path
    config: dict[str, Any]
    port: int = 0
    admin_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nencache://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> ServerProcess:
        path = self.directory / "server.yaml"
        path.write_text(yaml.safe_dump(self.config))
        log = open(self.directory / "server.log", "a")  # noqa: SIM115 (the child process writes it)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))} | self.env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nencache.cli", "serve", "--port", str(self.port), "--admin-port",
             str(self.admin_port), "--config", str(path), *self.extra],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}: {self.log()}") from None
                continue
            match = _LISTENING.search(line)
            if match:
                self.port = int(match.group(2))
                self.admin_port = int(match.group(3) or 0)
                return self
        raise TimeoutError(f"server did not start: {self.log()}")

    def _pump(self, proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            lines.put(line)

    def log(self) -> str:
        path = self.directory / "server.log"
        return "".join(self.lines) + (path.read_text()[-3000:] if path.exists() else "")

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def chunk_blob(key: bytes, payload: bytes, crc: int | None = None) -> bytes:
    """A valid chunk blob (raw codec, uint8 'dtype' 1 x 1 x len) of `payload`, stamped with `key`."""
    header = ChunkHeader(0, 3, 1, 1, 1, 1, len(payload), zlib.crc32(payload) if crc is None else crc, key)
    return header.pack() + payload


ATTACKER = "127.0.0.2"  # another client address: Linux routes all of 127/8 to loopback


def attacker_socket(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A connection to a server on 127.0.0.1 from `ATTACKER` (with a small receive buffer if `rcvbuf`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((ATTACKER, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def raw_connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(op: Op, request_id: int = 1, namespace: bytes = b"ns", keys: Sequence[bytes] = (),
            blobs: Sequence[bytes] | None = None, meta: bytes | None = None) -> bytes:
    """A well-formed request frame as bytes."""
    if meta is None:
        lengths = [len(b) for b in blobs] if blobs is not None else None
        meta = pack_keyed_meta(namespace, keys, lengths) if op not in (Op.PING, Op.STATS, Op.AUTH) else b""
    body = b"".join(blobs or ())
    return Frame(op, request_id, len(keys), len(meta), len(body)).pack() + meta + body


def read_frame(sock: socket.socket) -> tuple[Frame, bytes, bytes] | None:
    """The next reply (header, meta, body), or None at end of stream."""
    header = recv_exact(sock, HEADER_SIZE)
    if header is None:
        return None
    frame = unpack_header(header)
    meta = recv_exact(sock, frame.meta_len) or b""
    body = recv_exact(sock, frame.body_len) or b""
    return frame, meta, body


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    out = bytearray()
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            return None if not out else bytes(out)
        out += piece
    return bytes(out)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
