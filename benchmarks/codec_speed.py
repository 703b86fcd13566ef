"""Encode and decode speed of the quantizing codecs on real-shaped KV, beside a plain copy of the same bytes.

One 256-token chunk of SmolLM2-135M KV (30 layers, 3 KV heads, head_dim 64, bf16: 5.9 MB), read as an
engine hands it over (a token slice of a larger cache), for int8, fp8 and int4:

- `encode` to a blob (bytes), `decode_into` an engine-shaped tensor (a token slice of a larger one); a
  codec without `decode_into` (in older trees) decodes to a new tensor that is then copied there, as the
  store did with it;
- on the main thread, and on two worker threads at once (as the write-behind and the fetch threads run
  them: torch's intra-op threads behave differently there);
- `copy_` of the chunk into a preallocated tensor: the floor, so the ratio "codec / copy" is the share
  of memory speed a codec reaches, comparable across machines and trees.

GB/s are of bf16 KV (the chunk's decoded size); medians over reps, each the median of 15 calls.

    python benchmarks/codec_speed.py [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import table, write_section  # noqa: E402

from nencache.bench.context import SMOLLM2  # noqa: E402
from nencache.bench.kv import smooth_kv  # noqa: E402
from nencache.codecs import get_codec  # noqa: E402

CODECS = ("int8", "fp8", "int4")
CALLS = 15


def per_call(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(CALLS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def on_two_threads(fn: Callable[[], object]) -> float:
    """Seconds per call when two threads call `fn` at once (the throughput of the pair)."""
    done: list[float] = []

    def run() -> None:
        done.append(per_call(fn))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statistics.median(done) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(3)
    cache = smooth_kv(SMOLLM2, 1024, gen)
    chunk = cache[:, :, 256:512]
    target = torch.empty_like(cache)[:, :, 512:768]
    nbytes = chunk.numel() * chunk.element_size()
    floor = torch.empty_like(chunk)
    results: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.reps):
        copy_s = per_call(lambda: floor.copy_(chunk))
        for name in CODECS:
            codec = get_codec(name)
            blob = codec.encode(chunk)
            decode_into = getattr(codec, "decode_into", None) or (lambda b, out, c=codec: out.copy_(c.decode(b)))
            decode_into(blob, target)  # first calls (compiling, paging code in) off the clock
            cases = {"encode": lambda c=codec: c.encode(chunk),
                     "decode_into": lambda d=decode_into, b=blob: d(b, target)}
            for operation, fn in cases.items():
                for threads, seconds in (("main", per_call(fn)), ("2 workers", on_two_threads(fn))):
                    results.setdefault((name, operation, threads), []).append(seconds)
        results.setdefault(("copy", "copy_", "main"), []).append(copy_s)
    copy = statistics.median(results[("copy", "copy_", "main")])
    rows = []
    for (name, operation, threads), values in results.items():
        seconds = statistics.median(values)
        rows.append([f"{name} {operation}, {threads}", f"{nbytes / seconds / 1e9:.2f}", f"{copy / seconds:.3f}"])
    body = table(["codec: operation, threads", "GB/s", "codec / copy"], rows)
    body += (f"\n\nOne 256-token SmolLM2-135M chunk ({nbytes / 1e6:.1f} MB of bf16 KV), a token slice of a larger "
             f"cache, encoded to bytes and decoded into a token slice of another; '2 workers': two threads at "
             f"once, throughput of the pair; torch threads: {torch.get_num_threads()}; medians of {args.reps} reps "
             f"of {CALLS} calls.")
    print(body)
    write_section("codecs: encode and decode speed", body)


if __name__ == "__main__":
    main()
