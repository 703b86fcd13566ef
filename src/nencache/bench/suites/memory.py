"""`memory`: resident memory per cached token, NenCache (raw, int8, fp8 CPU codecs) against LMCache.

Each side runs in a fresh process holding the same number of SmolLM2-135M tokens in its CPU tier,
sized to hold exactly them: NenCache's `KVCache` (`nencache.bench.memory_probe`) and, with
`--compare lmcache` where LMCache is installed, LMCache's local CPU backend
(`nencache.bench.lmcache_probe`). The figure is the process's resident memory after storing and
reading back every token, minus its resident memory before the cache was created (code loaded and
the engine's own KV buffers allocated first), divided by the tokens. Target: NenCache at most 50% of
LMCache (with a codec at the model's noise floor: int8; fp8 beside it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nencache.bench.context import SMOLLM2, BenchContext
from nencache.bench.results import Plot, Series, SuiteResult, Summary, Table, TargetCheck

CODECS = ("raw", "int8", "fp8")
TARGET = 0.5
PROBE = Path(__file__).resolve().parent.parent / "lmcache_probe.py"


def _json_lines(command: list[str], timeout: float = 900) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    errors = [line["error"] for line in lines if "error" in line]
    if errors or done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or "").strip().splitlines()[-3:])
        raise RuntimeError(errors[0] if errors else f"exit {done.returncode}: {tail}")
    return lines


def nencache_rss(codec: str, tokens: int) -> dict:
    return _json_lines([sys.executable, "-m", "nencache.bench.memory_probe", codec, str(tokens)])[-1]


def lmcache_rss(python: Path, tokens: int) -> dict:
    layout = SMOLLM2
    lines = _json_lines([str(python), str(PROBE), "memory", "--layers", str(layout.num_layers), "--kv-heads",
                         str(layout.num_kv_heads), "--head-dim", str(layout.head_dim), "--tokens", str(tokens)])
    return {**lines[-1], "lmcache_version": lines[0].get("lmcache_version")}


def run(ctx: BenchContext) -> SuiteResult:
    result = SuiteResult("memory", "Resident memory per cached token")
    tokens = ctx.scale.memory_tokens
    reps = 1 if ctx.quick else 3
    per_token: dict[str, list[float]] = {}
    pool_per_token: dict[str, float] = {}  # what NenCache's pool itself takes: the rest is code's working memory
    lmcache = ctx.lmcache_python if ctx.compare_lmcache else None
    version = None
    for rep in range(reps):
        ctx.progress.step(f"rep {rep + 1} of {reps}: NenCache {', '.join(CODECS)}" + (", LMCache" if lmcache else ""))
        for codec in CODECS:
            figures = nencache_rss(codec, tokens)
            if figures["cached_tokens"] != tokens:
                raise RuntimeError(f"NenCache ({codec}) cached {figures['cached_tokens']} of {tokens} tokens")
            per_token.setdefault(f"NenCache {codec}", []).append(figures["rss_bytes"] / tokens)
            pool_per_token[f"NenCache {codec}"] = figures["pool_bytes"] / tokens
        if lmcache is not None:
            try:
                figures = lmcache_rss(lmcache, tokens)
            except Exception as exc:
                result.notes.append(f"LMCache: failed ({exc}); its column is empty")
                lmcache = None
                continue
            version = figures.get("lmcache_version")
            per_token.setdefault("LMCache", []).append(figures["rss_bytes"] / figures["cached_tokens"])
    kv_per_token = SMOLLM2.bytes_per_token
    baseline = Summary.of(per_token["LMCache"]).median if "LMCache" in per_token else None
    table = Table(["cache", "bytes per cached token", "x the KV's own bytes", "vs LMCache", "pool bytes per token"], [])
    series = Series("bytes per cached token", [], [])
    for name, values in per_token.items():
        value = Summary.of(values).median
        pool = pool_per_token.get(name)
        table.rows.append([name, f"{value:,.0f}", f"{value / kv_per_token:.3f}",
                           f"{value / baseline:.2f}x" if baseline else "-", f"{pool:,.0f}" if pool else "-"])
        series.x.append(name)
        series.y.append(value)
        result.figures[name] = {"bytes_per_token": values, "median": value, "pool_bytes_per_token": pool}
    result.tables.append(table)
    if baseline:
        ratios = {codec: Summary.of(per_token[f"NenCache {codec}"]).median / baseline for codec in CODECS}
        best = min(("int8", "fp8"), key=lambda codec: ratios[codec])
        result.targets.append(TargetCheck(
            "Memory against LMCache", f"<= {TARGET:.0%} of LMCache's bytes per cached token",
            ", ".join(f"{codec} {ratio:.0%}" for codec, ratio in ratios.items()), ratios[best] <= TARGET,
            f"{tokens} SmolLM2-135M tokens; LMCache {version} local CPU backend, raw"))
    else:
        result.targets.append(TargetCheck("Memory against LMCache", f"<= {TARGET:.0%} of LMCache's bytes per cached token",
                                          "LMCache not installed here (--compare lmcache)", None))
    result.notes.append(f"{tokens} tokens of SmolLM2-135M KV ({kv_per_token} bytes per token, bf16) held in the CPU "
                        f"tier of a fresh process, sized to hold them; resident memory after storing and reading them "
                        "back, minus before the cache existed, each side's code loaded first (NenCache's codec by "
                        "one small chunk: the codecs' compiled loops, about 110 MiB with numba); it includes what "
                        "the allocator keeps of the codecs' working memory, a fixed amount that weighs more the "
                        "fewer tokens are held; median of "
                        f"{reps}. int8 and fp8 quality on this model: "
                        "benchmarks/RESULTS.md, section codecs (int8 is at the model's noise floor).")
    result.plots.append(Plot("Resident memory per cached token", "bytes", [series],
                             hlines=[(baseline * TARGET, "50% of LMCache")] if baseline else []))
    return result


STEPS = 3
