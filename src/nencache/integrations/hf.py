"""transformers integration: prefill with reuse, and generation through `model.generate`.

`CachedModel` wraps a causal LM and a `KVCache` whose layout comes from `model.config`. A prompt is
looked up; its cached prefix is copied straight from the pool into a `DynamicCache`; only the rest
is computed; the new chunks are stored. transformers is imported only by this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.keys import TokenIds, token_array
from nencache.layout import KVLayout


@dataclass(slots=True)
class PrefillResult:
    """The model's state after a prompt: its KV cache and the logits of the tokens it computed."""

    cache: Any  # transformers.DynamicCache holding the whole prompt
    logits: torch.Tensor  # [1, computed_tokens, vocab]
    cached_tokens: int
    computed_tokens: int
    seconds: float


@dataclass(slots=True)
class GenerationResult:
    """Generated tokens and where the prompt's KV came from."""

    token_ids: list[int]  # the new tokens only
    prompt_tokens: int
    cached_tokens: int
    ttft: float  # seconds from the call to the first new token
    seconds: float


def model_fingerprint(model: Any) -> str:
    """A digest of the model's config and a sample of every weight: different weights, different keys."""
    digest = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(name.encode())
            sample = param.detach().reshape(-1)[:64].to("cpu", torch.float32)
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


class _FirstTokenTimer:
    """A transformers streamer that only notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:  # call 1 is the prompt itself
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class CachedModel:
    """A causal LM whose prefills reuse KV from a `KVCache`."""

    def __init__(self, model: Any, cache: KVCache) -> None:
        expected = KVLayout.from_model_config(model.config, dtype=model.dtype)
        if cache.layout != expected:
            raise ValueError(f"cache layout {cache.layout} does not match the model's KV layout {expected}")
        self.model = model
        self.cache = cache
        self._staging: torch.Tensor | None = None
        self._staging_views: list[weakref.ref[torch.Tensor]] = []

    @classmethod
    def wrap(cls, model: Any, config: CacheConfig | None = None, model_id: str | None = None) -> "CachedModel":
        """Build the `KVCache` for `model` (layout from its config, namespace from its id and weights)."""
        layout = KVLayout.from_model_config(model.config, dtype=model.dtype)
        name = model_id or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        extra = json.dumps({k: getattr(model.config, k, None) for k in ("rope_theta", "rope_scaling",
                                                                          "rope_parameters", "sliding_window")},
                           sort_keys=True, default=str)
        cache = KVCache(config, layout, name, fingerprint=model_fingerprint(model), extra=extra)
        return cls(model, cache)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_dynamic_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def load_prefix(self, token_ids: TokenIds, *, salt: str | None = None) -> tuple[Any, int]:
        """A `DynamicCache` holding the longest cached prefix of `token_ids` (at most all but the last token)."""
        tokens = token_array(token_ids)
        dynamic = self.new_dynamic_cache()
        prompt = self.cache.prompt(tokens, salt=salt)  # hashed once for the lookup and the load
        hit = self.cache.lookup(prompt)
        if hit == 0:
            return dynamic, 0
        layout = self.cache.layout
        device = self.device
        staging = self._staging_buffer((layout.num_layers, 2, layout.num_kv_heads, hit, layout.head_dim),
                                       pin=device.type == "cuda")
        # Chunks are [layers, 2, tokens, heads, dim]; the permuted view lets one copy land heads-first.
        got = self.cache.retrieve_prefix(prompt.head(hit), out=staging.permute(0, 1, 3, 2, 4))
        use = min(got, len(tokens) - 1)
        if use <= 0:
            return dynamic, 0
        if device.type != "cpu":
            staging = staging.to(device, non_blocking=True)
        from transformers.cache_utils import DynamicLayer

        views = []
        for index in range(layout.num_layers):
            keys, values = staging[index, 0, :, :use].unsqueeze(0), staging[index, 1, :, :use].unsqueeze(0)
            dynamic.update(keys[:, :, :0], values[:, :, :0], index)  # creates the layer on the right device/dtype
            layer = dynamic.layers[index]
            if type(layer) is DynamicLayer:  # hand over the views: the model's own cat is then the only copy
                layer.keys, layer.values = keys, values
                views += [weakref.ref(keys), weakref.ref(values)]
            else:  # sliding-window and other layers keep their own update rules
                dynamic.update(keys, values, index)
        if device.type == "cpu":
            self._staging_views = views
        return dynamic, use

    def _staging_buffer(self, shape: tuple[int, ...], pin: bool) -> torch.Tensor:
        """A `shape` tensor on reused memory when no cache still holds views of it (fresh memory costs
        page faults, measured here at ~1 GB/s), else newly allocated."""
        needed = math.prod(shape)
        free = all(ref() is None for ref in self._staging_views)
        if self._staging is None or self._staging.numel() < needed or not free:
            self._staging = torch.empty(needed, dtype=self.cache.layout.dtype, pin_memory=pin)
            self._staging_views = []
        return self._staging[:needed].view(shape)

    @torch.inference_mode()
    def prefill(self, token_ids: TokenIds, *, salt: str | None = None, store: bool = True) -> PrefillResult:
        """Run the prompt: cached prefix from the cache, the rest through the model; store new chunks."""
        started = time.perf_counter()
        tokens = token_array(token_ids)
        dynamic, cached = self.load_prefix(tokens, salt=salt)
        rest = torch.as_tensor(tokens[cached:], device=self.device).unsqueeze(0)
        output = self.model(input_ids=rest, cache=dynamic, use_cache=True)
        seconds = time.perf_counter() - started
        if store:
            self.store_dynamic(tokens, output.cache, salt=salt)
        return PrefillResult(output.cache, output.logits, cached, len(tokens) - cached, seconds)

    def store_dynamic(self, token_ids: TokenIds, dynamic: Any, *, salt: str | None = None) -> int:
        """Store the KV a `DynamicCache` holds for `token_ids` (its first `len(token_ids)` positions)."""
        tokens = token_array(token_ids)
        length = min(len(tokens), dynamic.get_seq_length())
        layers = [(layer.keys[..., :length, :], layer.values[..., :length, :]) for layer in dynamic.layers]
        return self.cache.store_layers(tokens[:length], layers, salt=salt)

    @torch.inference_mode()
    def generate(self, token_ids: TokenIds, max_new_tokens: int = 64, *, salt: str | None = None,
                 eos_token_id: int | list[int] | None = None, store: bool = True) -> GenerationResult:
        """Greedy generation through `model.generate`, starting from the cached prefix of the prompt.

        After generating, the KV of the prompt and the answer is stored, so the next turn of a chat
        finds it.
        """
        from transformers import GenerationConfig

        started = time.perf_counter()
        tokens = token_array(token_ids)
        dynamic, cached = self.load_prefix(tokens, salt=salt)
        timer = _FirstTokenTimer()
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                                  pad_token_id=eos_token_id if isinstance(eos_token_id, int) else None)
        input_ids = torch.as_tensor(tokens, device=self.device).unsqueeze(0)
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), cache=dynamic,
                                     generation_config=config, streamer=timer)
        seconds = time.perf_counter() - started
        new_tokens = output[0, len(tokens):].tolist()
        if store:  # the prompt (a repeat is a full hit) and prompt + answer (the next chat turn)
            self.store_dynamic(tokens, dynamic, salt=salt)
            self.store_dynamic(list(tokens.tolist()) + new_tokens, dynamic, salt=salt)
        ttft = (timer.first_token_at or time.perf_counter()) - started
        return GenerationResult(new_tokens, len(tokens), cached, ttft, seconds)
