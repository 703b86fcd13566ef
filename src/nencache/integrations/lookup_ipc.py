"""Prefix lookups across processes: the engine's scheduler asks the worker that owns the cache.

vLLM runs its scheduler and its workers in different processes (except with one GPU, where they
share one). `LookupServer` answers `lookup(token_ids, salt)` for a worker's `KVCache` on a local
Unix socket; `CacheLookup` is what the scheduler holds: the cache itself when it lives in the same
process (`register_local`), otherwise a client of that socket. Any failure is a miss (0 tokens).

Wire format (little-endian): request `u32 salt_len, salt bytes, int64 tokens...`; reply `u64 matched`.
The socket is created with owner-only permissions and connections authenticate with a key
derived from the engine id, which only processes of the same engine know.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener

import numpy as np

from nencache.keys import TokenIds, token_array
from nencache.integrations.vllm_scheduler import PrefixLookup

log = logging.getLogger("nencache.vllm")

_LOCAL: dict[str, PrefixLookup] = {}
_LOCAL_LOCK = threading.Lock()
_HEAD = struct.Struct("<I")
_REPLY = struct.Struct("<Q")
MAX_REQUEST_BYTES = 64 << 20  # 8M tokens


def register_local(engine_key: str, cache: PrefixLookup | None) -> None:
    """Make a worker's cache visible to a scheduler in the same process (None: remove it)."""
    with _LOCAL_LOCK:
        if cache is None:
            _LOCAL.pop(engine_key, None)
        else:
            _LOCAL[engine_key] = cache


def endpoint(engine_key: str) -> tuple[str, bytes]:
    """The socket path and authentication key of an engine's lookup server."""
    digest = hashlib.blake2b(engine_key.encode(), digest_size=16, person=b"nencache-lookup").hexdigest()
    path = os.path.join(tempfile.gettempdir(), f"nencache-{digest[:20]}.sock")
    authkey = hashlib.blake2b(engine_key.encode(), digest_size=32, person=b"nencache-authkey").digest()
    return path, authkey


def encode_request(token_ids: TokenIds, salt: str | bytes | None) -> bytes:
    raw = salt.encode() if isinstance(salt, str) else bytes(salt or b"")
    return _HEAD.pack(len(raw)) + raw + token_array(token_ids).tobytes()


def decode_request(data: bytes) -> tuple[np.ndarray, bytes | None]:
    if len(data) < _HEAD.size or len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"lookup request of {len(data)} bytes is out of bounds")
    (salt_len,) = _HEAD.unpack_from(data)
    body = data[_HEAD.size + salt_len :]
    if _HEAD.size + salt_len > len(data) or len(body) % 8:
        raise ValueError("malformed lookup request")
    salt = data[_HEAD.size : _HEAD.size + salt_len] or None
    return np.frombuffer(body, dtype="<i8"), salt


class LookupServer:
    """Answers lookups for one cache on a Unix socket, one thread per connected scheduler."""

    def __init__(self, cache: PrefixLookup, engine_key: str) -> None:
        self.cache = cache
        self.path, authkey = endpoint(engine_key)
        if os.path.exists(self.path):
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._listener = Listener(self.path, family="AF_UNIX", authkey=authkey)
        finally:
            os.umask(old_umask)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="nencache-lookup", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except Exception:  # closed, or a peer that failed authentication
                if self._closed.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="nencache-lookup-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while not self._closed.is_set():
                try:
                    tokens, salt = decode_request(conn.recv_bytes(MAX_REQUEST_BYTES))
                    matched = self.cache.lookup(tokens, salt=salt)
                    conn.send_bytes(_REPLY.pack(matched))
                except (EOFError, OSError):
                    return
                except Exception as exc:
                    log.warning("lookup server: dropped a bad request (%r)", exc)
                    return


class CacheLookup:
    """The scheduler's view of the workers' cache: in-process when possible, else over the socket."""

    def __init__(self, engine_key: str, *, retry_seconds: float = 1.0) -> None:
        self.engine_key = engine_key
        self.path, self._authkey = endpoint(engine_key)
        self.retry_seconds = retry_seconds
        self._conn: Connection | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def lookup(self, token_ids: TokenIds, *, salt: str | bytes | None = None) -> int:
        with _LOCAL_LOCK:
            local = _LOCAL.get(self.engine_key)
        if local is not None:
            return local.lookup(token_ids, salt=salt)
        with self._lock:
            conn = self._connect()
            if conn is None:
                return 0
            try:
                conn.send_bytes(encode_request(token_ids, salt))
                return int(_REPLY.unpack(conn.recv_bytes(_REPLY.size))[0])
            except Exception as exc:
                log.warning("NenCache lookup server unreachable (%r); treating it as a miss", exc)
                self._drop()
                return 0

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connect(self) -> Connection | None:
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._next_try or not os.path.exists(self.path):
            return None
        try:
            self._conn = Client(self.path, family="AF_UNIX", authkey=self._authkey)
        except Exception as exc:
            log.debug("cannot reach the lookup server at %s: %r", self.path, exc)
            self._next_try = time.monotonic() + self.retry_seconds
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._next_try = time.monotonic() + self.retry_seconds
