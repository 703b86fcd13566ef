"""vLLM's own declarations of its KV cache, read for the connector. Imports vLLM.

- Which KV cache group NenCache serves: vLLM's `KVCacheConfig` lists the groups and their specs.
  NenCache serves a model whose transferable KV is one full-attention (or MLA) group stored in the
  model's dtype, in an engine that can resume a prefill from cached KV. Anything else (a hybrid
  model's mamba or sliding-window groups, a quantized KV cache, decode context parallelism, an
  engine with neither chunked prefill nor prefix caching) gets one clear log line and a connector
  that stays out of the way: the engine runs as if it were not there.
- How that group's buffers are laid out: each layer's buffer is the logical `[kernel_blocks, heads,
  block_tokens, content]` view vLLM made from its `KVCacheLayout` (the strides say the
  permutation), and where a token's KV sits inside a block is read from the layer's attention
  backend by running its own cache-write operation (`BlockPlacement.probe`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.kv_cache_interface import KVCacheSpecKind, KVQuantMode, get_kv_cache_spec_kind

from nencache.errors import LayoutError
from nencache.integrations.vllm.paged import PagedKV
from nencache.integrations.vllm.placement import BlockPlacement, CacheWriter

_SERVED_KINDS = (KVCacheSpecKind.FULL_ATTENTION, KVCacheSpecKind.MLA_ATTENTION)
_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True, slots=True)
class ServedGroup:
    """The KV cache group the connector moves, as vLLM declared it."""

    index: int  # position in `KVCacheConfig.kv_cache_groups` (and in a request's per-group block ids)
    layer_names: tuple[str, ...]
    block_size: int  # tokens per manager block (a slot is `block_id * block_size + offset`)
    latent: bool  # MLA: one latent vector per token instead of a key and a value


def served_group(kv_cache_config: Any, vllm_config: Any) -> tuple[ServedGroup | None, str]:
    """The group NenCache serves (None when it serves none) and, then, why (a sentence for the log)."""
    if kv_cache_config is None or not getattr(kv_cache_config, "kv_cache_groups", None):
        return None, "vLLM passed no KV cache config to the connector"
    cache_dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto"))
    if cache_dtype != "auto":
        return None, f"kv_cache_dtype={cache_dtype} (NenCache moves KV kept in the model's dtype)"
    chunked = getattr(getattr(vllm_config, "scheduler_config", None), "enable_chunked_prefill", True)
    prefix_caching = getattr(getattr(vllm_config, "cache_config", None), "enable_prefix_caching", True)
    if chunked is False and prefix_caching is False:
        return None, ("vLLM runs this model with neither chunked prefill nor prefix caching, so its attention never "
                      "resumes a prefill from KV already in its cache (vLLM turns both off for MLA models on CPU), "
                      "and KV loaded into it would not be used as computed")
    parallel = getattr(vllm_config, "parallel_config", None)
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if int(getattr(parallel, name, 1) or 1) > 1:
            return None, f"{name}={getattr(parallel, name)} (each rank holds only some of a prompt's tokens)"
    groups = list(kv_cache_config.kv_cache_groups)
    transfer = [i for i, group in enumerate(groups) if getattr(group, "enable_kv_transfer", True)]
    kinds = [get_kv_cache_spec_kind(groups[i].kv_cache_spec) for i in transfer]
    if len(transfer) != 1:
        described = ", ".join(sorted(kind.value for kind in kinds)) or "none"
        return None, f"the model's KV is split into {len(transfer)} groups ({described}); NenCache serves one attention group"
    index, kind = transfer[0], kinds[0]
    if kind not in _SERVED_KINDS:
        return None, f"the model's KV cache group is {kind.value}; NenCache serves full attention and MLA"
    spec = groups[index].kv_cache_spec
    if getattr(spec, "kv_quant_mode", KVQuantMode.NONE) != KVQuantMode.NONE:
        return None, f"the KV cache is quantized ({KVQuantMode(spec.kv_quant_mode).name})"
    latent = kind is KVCacheSpecKind.MLA_ATTENTION
    if not latent and spec.head_size != spec.head_size_v:
        return None, f"keys ({spec.head_size}) and values ({spec.head_size_v}) differ in size"
    return ServedGroup(index, tuple(groups[index].layer_names), int(spec.block_size), latent), ""


def layer_order(names: Sequence[str]) -> list[str]:
    """Layer names sorted by the layer number they carry (`model.layers.12.self_attn.attn` -> 12)."""
    def number(name: str) -> tuple[int, str]:
        found = _LAYER_NUMBER.findall(name)
        return (int(found[0]) if found else 1 << 30, name)

    return sorted(names, key=number)


def paged_kv(kv_caches: Mapping[str, torch.Tensor], group: ServedGroup, layers: Mapping[str, Any]) -> PagedKV:
    """The served group's buffers as `PagedKV`, its placement read from the first layer's backend.

    `layers` maps layer names to vLLM's attention layer modules (the static forward context). Layers
    that share another layer's buffer (KV sharing) are moved once.
    """
    names = [name for name in layer_order(group.layer_names) if name in kv_caches]
    if not names:
        raise LayoutError(f"vLLM registered none of the KV cache group's layers ({', '.join(group.layer_names[:3])}, ...)")
    buffers: list[torch.Tensor] = []
    seen: set[tuple[int, int]] = set()
    for name in names:
        buffer = kv_caches[name]
        where = (buffer.untyped_storage().data_ptr(), buffer.storage_offset())
        if where not in seen:
            seen.add(where)
            buffers.append(buffer)
    first = buffers[0]
    if first.dim() != 4:
        raise LayoutError(f"layer {names[0]} buffer has shape {tuple(first.shape)}, not vLLM's declared "
                          "[kernel_blocks, heads, block_tokens, content]")
    if group.block_size % first.shape[2]:
        raise LayoutError(f"kernel blocks of {first.shape[2]} tokens do not divide blocks of {group.block_size}")
    module = layers.get(names[0])
    if module is None:
        raise LayoutError(f"vLLM's forward context has no attention layer {names[0]!r}")
    writer, vector_dim = _writer(module, first, group.latent)
    placement = BlockPlacement.probe(writer, first, vector_dim)
    return PagedKV(buffers, placement)


def _writer(module: Any, like: torch.Tensor, latent: bool) -> tuple[CacheWriter, int]:
    """The layer's own cache-write operation as a `CacheWriter`, and a token's vector size."""
    impl = getattr(module, "impl", None)
    update = getattr(impl, "do_kv_cache_update", None)
    if update is None:
        raise LayoutError(f"the attention backend {type(impl).__name__} exposes no cache-write operation to read "
                          "its block layout from")
    content = int(like.shape[3])
    if latent:
        rank = int(module.kv_lora_rank)

        def write_latent(vectors: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
            latent_c, rope = vectors[:, 0, :rank].contiguous(), vectors[:, :, rank:].contiguous()
            update(latent_c, rope, buffer, slots, module.kv_cache_dtype, module._k_scale)

        return write_latent, content
    head_dim = content // 2

    def write_kv(vectors: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
        update(module, vectors[..., :head_dim].contiguous(), vectors[..., head_dim:].contiguous(), buffer, slots)

    return write_kv, content
