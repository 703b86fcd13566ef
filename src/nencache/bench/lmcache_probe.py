"""LMCache's side of `nencache bench --compare lmcache`, run with an interpreter that imports LMCache.

This file runs as a script in LMCache's environment, so it imports nothing from NenCache. It drives
LMCache's own storage engine (`LMCacheEngineBuilder`, with its MOCK GPU connector so it runs on a
CPU; the connector is given the one real copy a GPU connector makes each way) and answers on stdout,
one JSON object per line (LMCache's own output goes to stderr).

    python lmcache_probe.py memory --layers 30 --kv-heads 3 --head-dim 64 --tokens 16384
        resident memory (RSS) the engine adds after storing that many tokens in its local CPU backend,
        sized to hold them
    python lmcache_probe.py disk --layers 30 --kv-heads 3 --head-dim 64 --tokens 16384 --dir /var/tmp
        one line `{"ready": true}`, then for each line read on stdin one rep: store (until every chunk is
        on disk and fsynced) and a cold retrieve (page cache dropped) with the CPU tier off, bytes
        checked: `{"store_s": ..., "retrieve_s": ...}`

benchmarks/lmcache_side.py (the repository's side-by-side benchmarks) imports its LMCache plumbing
from here: the copying connector, the stdout redirection, the page-cache and fsync helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

os.environ["LMCACHE_TRACK_USAGE"] = "false"
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import torch  # noqa: E402
from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector  # noqa: E402


class CopyingMockConnector(MockGPUConnector):
    """LMCache's MockGPUConnector plus the real KV copy a GPU connector makes.

    Memory objects use LMCache's KV_2LTD layout `[2, layers, tokens, kv_heads*head_dim]`; the engine
    tensor (passed as `kvcaches=`) is `[layers, 2, tokens, kv_heads, head_dim]`. One strided copy per chunk.
    """

    def _views(self, memory_obj: Any, kv: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory object, engine KV slice), both as [2, layers, tokens*hidden]."""
        hidden = self.kv_shape[3] * self.kv_shape[4]
        obj = memory_obj.tensor.view(2, self.num_layers, -1)
        eng = kv.view(self.num_layers, 2, -1)[:, :, start * hidden : end * hidden]
        return obj, eng.transpose(0, 1)

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        obj, eng = self._views(memory_obj, kwargs["kvcaches"], start, end)
        obj.copy_(eng)

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        obj, eng = self._views(memory_obj, kwargs["kvcaches"], start, end)
        eng.copy_(obj)

    def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(obj, start, end, **kwargs)

    def batched_to_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(obj, start, end, **kwargs)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """fd 1 goes to stderr (LMCache's logs and C prints); yields the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as real:
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def build_engine(args: argparse.Namespace, config: dict[str, Any], name: str) -> Any:
    from lmcache.utils import EngineType, mock_up_broadcast_fn, mock_up_broadcast_object_fn
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector import CreateGPUConnector
    from lmcache.v1.metadata import LMCacheMetadata

    engine_config = LMCacheEngineConfig.from_defaults(**config)
    engine_config.validate()
    shape = (args.layers, 2, args.chunk_size, args.kv_heads, args.head_dim)
    metadata = LMCacheMetadata(model_name="nencache-bench", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=shape, chunk_size=args.chunk_size)
    mock = CreateGPUConnector(engine_config, metadata, EngineType.MOCK)
    engine = LMCacheEngineBuilder.get_or_create(name, engine_config, metadata,
                                                CopyingMockConnector(kv_shape=mock.kv_shape),
                                                mock_up_broadcast_fn, mock_up_broadcast_object_fn)
    engine.post_init()
    return engine


def kv_bytes(args: argparse.Namespace) -> int:
    return args.layers * 2 * args.tokens * args.kv_heads * args.head_dim * 2


def memory(args: argparse.Namespace, out: Any) -> None:
    import lmcache.v1.cache_engine  # noqa: F401  (code is loaded before the baseline: only data is counted)
    import lmcache.v1.gpu_connector.mock_gpu_connector  # noqa: F401

    gen = torch.Generator().manual_seed(1)
    kv = torch.randn((args.layers, 2, args.tokens, args.kv_heads, args.head_dim), generator=gen).to(torch.bfloat16)
    tokens = torch.randint(0, 50_000, (args.tokens,), generator=gen)
    out_kv = torch.zeros_like(kv)  # the engine's buffers exist before the cache does
    before = rss_bytes()
    size_gb = kv_bytes(args) / 2**30 * 1.02 + 0.01  # room for the tokens (LMCache sizes its pool in GB)
    engine = build_engine(args, {"chunk_size": args.chunk_size, "local_cpu": True, "max_local_cpu_size": size_gb},
                          f"nencache-bench-memory-{os.getpid()}")
    engine.store(tokens, kvcaches=kv)
    hit = int(engine.retrieve(tokens, kvcaches=out_kv).sum())
    after = rss_bytes()
    out.write(json.dumps({"rss_bytes": after - before, "tokens": args.tokens, "cached_tokens": hit,
                          "bytes_equal": bool(torch.equal(out_kv.view(torch.int16), kv.view(torch.int16))),
                          "max_local_cpu_size_gb": size_gb}) + "\n")


def drop_page_cache(paths: list[str]) -> str:
    """Evict `paths` from the page cache; returns the method that worked."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
        return "drop_caches"
    except OSError:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise_dontneed"


def fsync_paths(paths: list[str]) -> None:
    """fsync each file and then its directory."""
    for path in [*paths, *([os.path.dirname(paths[0])] if paths else [])]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk(args: argparse.Namespace, out: Any) -> None:
    work = tempfile.mkdtemp(prefix="lmcache-disk-", dir=args.dir)
    try:
        engine = build_engine(args, {"chunk_size": args.chunk_size, "local_cpu": False,
                                     "max_local_cpu_size": kv_bytes(args) / 2**30 * 1.5 + 0.25,
                                     "local_disk": f"file://{work}/",
                                     "max_local_disk_size": kv_bytes(args) / 2**30 * 64 + 1},
                              f"nencache-bench-disk-{os.getpid()}")
        backend = engine.storage_manager.storage_backends["LocalDiskBackend"]
        gen = torch.Generator().manual_seed(2)
        source = torch.empty((args.layers, 2, args.tokens, args.kv_heads, args.head_dim), dtype=torch.bfloat16)
        target = torch.empty_like(source)
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for _ in sys.stdin:
            tokens = torch.randint(0, 50_000, (args.tokens,), generator=gen)
            source.view(torch.int16).random_(-(2**15), 2**15, generator=gen)
            keys = [key for _, _, key in engine.token_database.process_tokens(tokens=tokens)]
            started = time.perf_counter()
            engine.store(tokens, kvcaches=source)
            deadline = time.monotonic() + 120
            while not all(backend.contains(k) for k in keys):
                if time.monotonic() > deadline:
                    raise TimeoutError("LMCache did not finish its disk writes within 120 s")
                time.sleep(0.0005)
            paths = [backend._key_to_path(k) for k in keys]
            fsync_paths(paths)
            store_s = time.perf_counter() - started
            drop_page_cache(paths)
            target.zero_()
            started = time.perf_counter()
            hit = int(engine.retrieve(tokens, kvcaches=target).sum())
            retrieve_s = time.perf_counter() - started
            if hit != args.tokens or not torch.equal(target.view(torch.int16), source.view(torch.int16)):
                raise RuntimeError(f"LMCache returned {hit} of {args.tokens} tokens, or different bytes")
            for path in paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            engine.clear()
            out.write(json.dumps({"store_s": store_s, "retrieve_s": retrieve_s}) + "\n")
            out.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["memory", "disk"])
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--kv-heads", type=int, required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args()
    from importlib.metadata import version

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with stdout_to_stderr() as out:
        try:
            out.write(json.dumps({"lmcache_version": version("lmcache")}) + "\n")
            (memory if args.mode == "memory" else disk)(args, out)
        except Exception as exc:  # one JSON line always says what went wrong
            out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
            out.flush()
            os._exit(1)
        out.flush()
    os._exit(0)  # LMCache's background threads would keep the process alive


if __name__ == "__main__":
    main()
