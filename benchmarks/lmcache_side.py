#!/usr/bin/env python3
"""LMCache 0.5.6 side of the NenCache benchmarks.

Drives LMCache's own storage engine (``LMCacheEngine`` from
``LMCacheEngineBuilder``, with the ``EngineType.MOCK`` GPU connector so it runs
on CPU) over a KV shape and prints ONE JSON line to stdout with the median
store / retrieve throughput in GB/s (1e9 bytes/s) of raw KV bytes.

Run it with the LMCache virtualenv (see ``benchmarks/setup_lmcache.sh``)::

    .venv-lmcache/bin/python benchmarks/lmcache_side.py --backend cpu \
        --layers 30 --kv-heads 3 --head-dim 64 --dtype bf16 \
        --chunk-size 256 --chunks 64 --reps 5

Fairness rules implemented here:

* LMCache's ``MockGPUConnector`` copies no bytes. We subclass it so that the
  timed store includes the one copy a real GPU connector makes (engine KV
  ``[layers, 2, tokens, kv_heads, head_dim]`` -> LMCache memory objects in its
  ``KV_2LTD`` layout) and the timed retrieve includes the copy back into an
  engine KV tensor. After each retrieve the bytes are compared with the source.
* ``disk``: the timed store lasts until LMCache's async writes have finished
  and its files are fsync'ed; the retrieve is cold (page cache dropped, LMCache
  CPU tier disabled with ``local_cpu=False``).
* ``redis`` / ``server``: ``local_cpu=False`` so every retrieve goes over the
  socket; the timed store lasts until every chunk is visible on the server.

This script must not import nencache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

os.environ["LMCACHE_TRACK_USAGE"] = "false"
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import torch  # noqa: E402
from lmcache.utils import (  # noqa: E402
    CacheEngineKey,
    EngineType,
    mock_up_broadcast_fn,
    mock_up_broadcast_object_fn,
)
from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector import CreateGPUConnector  # noqa: E402
from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402

# The LMCache plumbing `nencache bench --compare lmcache` ships with NenCache (that file imports no NenCache).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "nencache", "bench"))
from lmcache_probe import CopyingMockConnector, drop_page_cache, fsync_paths, stdout_to_stderr  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("cpu", "disk", "redis", "server")
TEARDOWN_HUNG: list[str] = []  # engines whose destroy() did not return


@dataclass(frozen=True)
class Bench:
    """Benchmark parameters (one KV shape, one backend)."""

    backend: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    chunk_size: int
    chunks: int
    reps: int
    warmup: int
    disk_path: str | None
    remote_url: str | None
    torch_threads: int
    pause: float = 0.0  # seconds of idle before each timed store and retrieve (as the caller's own side)

    @property
    def tokens(self) -> int:
        return self.chunk_size * self.chunks

    @property
    def kv_bytes(self) -> int:
        """Raw KV bytes moved per store / retrieve."""
        elem = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return self.layers * 2 * self.tokens * self.kv_heads * self.head_dim * elem


StepHook = Callable[[LMCacheEngine, list[CacheEngineKey]], None]


@dataclass
class Hooks:
    """Backend-specific steps around the timed regions."""

    lmcache_config: dict[str, Any]
    # Runs inside the timed store, after engine.store() returned.
    finish_store: StepHook
    # Runs before the timed retrieve (untimed), e.g. to drop the page cache.
    before_retrieve: StepHook
    # Runs after each rep (untimed) to free what the rep stored.
    after_rep: StepHook
    notes: dict[str, Any]


# --------------------------------------------------------------------------
# LMCache plumbing
# --------------------------------------------------------------------------


def build_engine(
    bench: Bench, config_kwargs: dict[str, Any], instance_id: str
) -> LMCacheEngine:
    """Build an LMCacheEngine via LMCacheEngineBuilder with a MOCK connector."""
    config = LMCacheEngineConfig.from_defaults(**config_kwargs)
    config.validate()
    kv_shape = (bench.layers, 2, bench.chunk_size, bench.kv_heads, bench.head_dim)
    metadata = LMCacheMetadata(
        model_name="nencache-bench",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=DTYPES[bench.dtype],
        kv_shape=kv_shape,
        chunk_size=bench.chunk_size,
    )
    mock = CreateGPUConnector(config, metadata, EngineType.MOCK)
    if not isinstance(mock, MockGPUConnector):
        raise RuntimeError(f"EngineType.MOCK gave {type(mock).__name__}")
    engine = LMCacheEngineBuilder.get_or_create(
        instance_id,
        config,
        metadata,
        CopyingMockConnector(kv_shape=mock.kv_shape),
        mock_up_broadcast_fn,
        mock_up_broadcast_object_fn,
    )
    engine.post_init()
    return engine


def chunk_keys(engine: LMCacheEngine, tokens: torch.Tensor) -> list[CacheEngineKey]:
    """CacheEngineKeys LMCache derives for these tokens (one per chunk)."""
    return [key for _, _, key in engine.token_database.process_tokens(tokens=tokens)]


def backend_named(engine: LMCacheEngine, name: str) -> Any:
    """The storage backend object LMCache registered under ``name``."""
    backends = engine.storage_manager.storage_backends
    if name not in backends:
        raise RuntimeError(f"LMCache did not create {name}; has {list(backends)}")
    return backends[name]


def assert_cpu_tier_empty(engine: LMCacheEngine) -> None:
    """Fail if LMCache's CPU hot cache holds chunks (it would serve the hit)."""
    held = backend_named(engine, "LocalCPUBackend").get_keys()
    if held:
        raise RuntimeError(
            f"LocalCPUBackend holds {len(held)} chunks; retrieve not cold"
        )


def wait_until(pred: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Spin (with tiny sleeps) until ``pred()`` is true."""
    deadline = time.perf_counter() + timeout_s
    while not pred():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.0005)


# --------------------------------------------------------------------------
# Generic timed loop
# --------------------------------------------------------------------------


def run_reps(bench: Bench, hooks: Hooks) -> dict[str, Any]:
    """Store then retrieve ``bench.tokens`` tokens, ``warmup + reps`` times."""
    dtype = DTYPES[bench.dtype]
    shape = (bench.layers, 2, bench.tokens, bench.kv_heads, bench.head_dim)
    gen = torch.Generator().manual_seed(1234)
    src = torch.empty(shape, dtype=dtype)
    dst = torch.empty_like(src)
    instance_id = f"nencache-bench-{os.getpid()}"
    engine = build_engine(bench, hooks.lmcache_config, instance_id)
    store_s: list[float] = []
    retrieve_s: list[float] = []
    try:
        for rep in range(bench.warmup + bench.reps):
            # Fresh token ids and KV bits each rep: nothing is cached already,
            # and a stale hit could not pass the byte check.
            tokens = torch.randint(0, 50_000, (bench.tokens,), generator=gen)
            src.view(torch.int16).random_(-(2**15), 2**15, generator=gen)
            keys = chunk_keys(engine, tokens)

            time.sleep(bench.pause)
            t0 = time.perf_counter()
            engine.store(tokens, kvcaches=src)
            hooks.finish_store(engine, keys)
            t_store = time.perf_counter() - t0

            dst.zero_()
            hooks.before_retrieve(engine, keys)
            if not hooks.lmcache_config["local_cpu"]:
                assert_cpu_tier_empty(engine)
            time.sleep(bench.pause)
            t0 = time.perf_counter()
            mask = engine.retrieve(tokens, kvcaches=dst)
            t_retrieve = time.perf_counter() - t0

            hit = int(mask.sum())
            if hit != bench.tokens:
                raise RuntimeError(f"rep {rep}: retrieved {hit}/{bench.tokens} tokens")
            if not torch.equal(dst.view(torch.uint8), src.view(torch.uint8)):
                raise RuntimeError(f"rep {rep}: retrieved KV bytes differ from stored")
            hooks.after_rep(engine, keys)
            if rep >= bench.warmup:
                store_s.append(t_store)
                retrieve_s.append(t_retrieve)
    finally:
        destroy_engine(instance_id, hooks.notes)
    return summarize(bench, hooks, store_s, retrieve_s)


def destroy_engine(
    instance_id: str, notes: dict[str, Any], timeout_s: float = 5
) -> None:
    """LMCacheEngineBuilder.destroy(), bounded in time.

    In 0.5.6 ``RedisConnector.close()`` (a coroutine on the storage manager's
    event loop) calls the blocking ``AsyncPQExecutor.shutdown()``, which
    schedules onto that same loop and waits: a deadlock. We give up after
    ``timeout_s``, note it, and main() then leaves with os._exit().
    """
    t = threading.Thread(
        target=LMCacheEngineBuilder.destroy, args=(instance_id,), daemon=True
    )
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        TEARDOWN_HUNG.append(instance_id)
        notes["teardown_hung"] = (
            "LMCacheEngineBuilder.destroy() hung (0.5.6 RedisConnector.close "
            "deadlocks on its own event loop); process exits via os._exit"
        )


def summarize(
    bench: Bench, hooks: Hooks, store_s: list[float], retrieve_s: list[float]
) -> dict[str, Any]:
    """Result record: medians + per-rep GB/s and the config used."""
    store = [bench.kv_bytes / s / 1e9 for s in store_s]
    retrieve = [bench.kv_bytes / s / 1e9 for s in retrieve_s]
    return {
        "impl": "lmcache",
        "lmcache_version": lmcache_version(),
        "backend": bench.backend,
        "store_gbps": round(statistics.median(store), 4),
        "retrieve_gbps": round(statistics.median(retrieve), 4),
        "store_gbps_reps": [round(x, 4) for x in store],
        "retrieve_gbps_reps": [round(x, 4) for x in retrieve],
        "store_s_reps": [round(s, 6) for s in store_s],
        "retrieve_s_reps": [round(s, 6) for s in retrieve_s],
        "kv_bytes": bench.kv_bytes,
        "tokens": bench.tokens,
        "config": asdict(bench),
        "lmcache_config": hooks.lmcache_config,
        **hooks.notes,
    }


def lmcache_version() -> str:
    from importlib.metadata import version

    return version("lmcache")


def noop(_engine: LMCacheEngine, _keys: list[CacheEngineKey]) -> None:
    """Hook that does nothing."""


def cpu_size_gb(bench: Bench, copies: float) -> float:
    """LocalCPUBackend pool size (GiB) for ``copies`` rounds of KV plus slack."""
    return round(copies * bench.kv_bytes / 1024**3 + 0.25, 3)


# --------------------------------------------------------------------------
# Backends (one function each)
# --------------------------------------------------------------------------


def run_cpu(bench: Bench) -> dict[str, Any]:
    """LocalCPUBackend only (LMCache's hot CPU tier)."""

    def clear(engine: LMCacheEngine, _keys: list[CacheEngineKey]) -> None:
        engine.clear()

    hooks = Hooks(
        lmcache_config={
            "chunk_size": bench.chunk_size,
            "local_cpu": True,
            "max_local_cpu_size": cpu_size_gb(bench, 1.5),
        },
        finish_store=noop,  # LocalCPUBackend puts synchronously
        before_retrieve=noop,
        after_rep=clear,
        notes={},
    )
    return run_reps(bench, hooks)


def run_disk(bench: Bench) -> dict[str, Any]:
    """LocalDiskBackend, CPU tier disabled; durable store, cold retrieve."""
    root = bench.disk_path or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="lmcache-disk-", dir=root)
    notes: dict[str, Any] = {"disk_dir": workdir}
    rounds = bench.warmup + bench.reps

    def paths_of(engine: LMCacheEngine, keys: list[CacheEngineKey]) -> list[str]:
        disk = backend_named(engine, "LocalDiskBackend")
        return [disk._key_to_path(k) for k in keys]

    def finish_store(engine: LMCacheEngine, keys: list[CacheEngineKey]) -> None:
        disk = backend_named(engine, "LocalDiskBackend")
        wait_until(lambda: all(disk.contains(k) for k in keys), "disk writes")
        fsync_paths(paths_of(engine, keys))

    def before_retrieve(engine: LMCacheEngine, keys: list[CacheEngineKey]) -> None:
        notes["cold_method"] = drop_page_cache(paths_of(engine, keys))

    hooks = Hooks(
        lmcache_config={
            "chunk_size": bench.chunk_size,
            "local_cpu": False,
            "max_local_cpu_size": cpu_size_gb(bench, 1.5),
            "local_disk": f"file://{workdir}/",
            "max_local_disk_size": round(
                1.2 * rounds * bench.kv_bytes / 1024**3 + 0.5, 3
            ),
        },
        finish_store=finish_store,
        before_retrieve=before_retrieve,
        after_rep=noop,
        notes=notes,
    )
    try:
        return run_reps(bench, hooks)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_reachable(url: str) -> None:
    """Raise ConnectionError unless ``scheme://host:port`` accepts TCP."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if port is None:
        raise ValueError(f"remote url needs an explicit port: {url}")
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {url}: {exc}") from exc


def remote_hooks(bench: Bench, url: str, notes: dict[str, Any]) -> Hooks:
    """Hooks for a RemoteBackend at ``url`` with the CPU tier disabled."""
    check_reachable(url)

    def finish_store(engine: LMCacheEngine, keys: list[CacheEngineKey]) -> None:
        remote = backend_named(engine, "RemoteBackend")
        pending = list(keys)

        def all_visible() -> bool:
            pending[:] = [k for k in pending if not remote.contains(k)]
            return not pending

        wait_until(all_visible, f"puts to {url}")

    return Hooks(
        lmcache_config={
            "chunk_size": bench.chunk_size,
            "local_cpu": False,
            "max_local_cpu_size": cpu_size_gb(bench, 1.5),
            "remote_url": url,
            "remote_serde": "naive",
        },
        finish_store=finish_store,
        before_retrieve=noop,
        after_rep=noop,
        notes=notes,
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0
) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@contextlib.contextmanager
def spawned(cmd: list[str], port: int) -> Iterator[None]:
    """Run ``cmd`` (a server on ``port``) for the duration of the block."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_redis(bench: Bench) -> dict[str, Any]:
    """RemoteBackend over ``redis://`` (naive serde), CPU tier disabled."""
    if bench.remote_url:
        return run_reps(bench, remote_hooks(bench, bench.remote_url, {}))
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found and no --remote-url given")
    port = free_port()
    cmd = [exe, "--bind", "127.0.0.1", "--port", str(port)]
    cmd += ["--save", "", "--appendonly", "no"]
    url = f"redis://127.0.0.1:{port}"
    with spawned(cmd, port):
        return run_reps(bench, remote_hooks(bench, url, {"spawned": "redis-server"}))


def run_server(bench: Bench) -> dict[str, Any]:
    """RemoteBackend over ``lm://`` against LMCache's own lmcache_server."""
    if bench.remote_url:
        return run_reps(bench, remote_hooks(bench, bench.remote_url, {}))
    port = free_port()
    cmd = [sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"]
    url = f"lm://127.0.0.1:{port}"
    with spawned(cmd, port):
        notes = {"spawned": "python -m lmcache.v1.server 127.0.0.1 PORT cpu"}
        return run_reps(bench, remote_hooks(bench, url, notes))


RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "cpu": run_cpu,
    "disk": run_disk,
    "redis": run_redis,
    "server": run_server,
}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Bench:
    """Command line -> Bench."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKENDS, required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--chunks", type=int, required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed reps first")
    p.add_argument("--disk-path", default=None, help="parent dir for disk files")
    p.add_argument("--remote-url", default=None, help="redis://… or lm://…")
    p.add_argument("--pause", type=float, default=0.0, help="idle seconds before each timed store and retrieve")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for the KV copies (0: torch default)",
    )
    a = p.parse_args(argv)
    return Bench(
        backend=a.backend,
        layers=a.layers,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        dtype=a.dtype,
        chunk_size=a.chunk_size,
        chunks=a.chunks,
        reps=a.reps,
        warmup=a.warmup,
        disk_path=a.disk_path,
        remote_url=a.remote_url,
        torch_threads=a.torch_threads,
        pause=a.pause,
    )


def main(argv: list[str] | None = None) -> int:
    bench = parse_args(argv)
    if bench.torch_threads > 0:
        torch.set_num_threads(bench.torch_threads)
    with stdout_to_stderr() as out:
        try:
            result = RUNNERS[bench.backend](bench)
            rc = 0
        except Exception as exc:  # report, don't crash: one JSON line always
            result = {
                "impl": "lmcache",
                "backend": bench.backend,
                "error": f"{type(exc).__name__}: {exc}",
                "config": asdict(bench),
            }
            rc = 1
        out.write(json.dumps(result) + "\n")
        out.flush()
    if TEARDOWN_HUNG:
        # LMCache's non-daemon event-loop thread is stuck; don't wait for it.
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
