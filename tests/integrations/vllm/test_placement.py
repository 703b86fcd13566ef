"""Block placements read from a backend's own cache write, and `PagedKV` moving tokens through them.

The plain tests use writers written here (token-major, dimension-major keys, an interleaved layout
that is not affine, broken writers). The `vllm` tests use vLLM's real CPU attention op and vLLM's
own view construction for every declared `KVCacheLayout`, with kernel blocks smaller than blocks.
"""

from __future__ import annotations

import pytest
import torch

from nencache.errors import LayoutError
from nencache.integrations.vllm.paged import PagedKV, blocks_of, slot_mapping
from nencache.integrations.vllm.placement import BlockPlacement, exact_integer_base

HEADS, DIM, TOKENS, BLOCKS, LAYERS = 3, 8, 16, 12, 2


def token_major(vectors: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
    """[key | value] per token row (FlashAttention's block order)."""
    tokens = buffer.shape[2]
    buffer[slots // tokens, :, slots % tokens] = vectors


def keys_by_dimension(vectors: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
    """vLLM's CPU backend: a block-head plane is keys `[dim, tokens]` then values `[tokens, dim]`."""
    blocks, heads, tokens, content = buffer.shape
    dim = content // 2
    plane = buffer.view(blocks, heads, 2, tokens * dim)
    block, offset = slots // tokens, slots % tokens
    for d in range(dim):
        plane[block, :, 0, d * tokens + offset] = vectors[:, :, d]
    for d in range(dim):
        plane[block, :, 1, offset * dim + d] = vectors[:, :, dim + d]


def pairs_interleaved(vectors: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
    """Tokens packed in pairs per dimension (a VNNI-like tiling): not affine in the token index."""
    blocks, heads, tokens, content = buffer.shape
    flat = buffer.view(blocks, heads, tokens * content)
    block, offset = slots // tokens, slots % tokens
    pair, within = offset // 2, offset % 2
    for j in range(content):
        flat[block, :, pair * content * 2 + j * 2 + within] = vectors[:, :, j]


WRITERS = {"token_major": token_major, "keys_by_dimension": keys_by_dimension, "pairs_interleaved": pairs_interleaved}


def buffers(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(BLOCKS, HEADS, TOKENS, 2 * DIM, dtype=dtype) for _ in range(LAYERS)]


def by_writer(writer, layers: list[torch.Tensor], slots: torch.Tensor, kv: torch.Tensor) -> None:
    """What the backend itself would leave in `layers` for `kv` at `slots`."""
    for layer, layer_kv in zip(layers, kv):
        writer(torch.cat([layer_kv[0], layer_kv[1]], dim=-1), slots, layer)


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_writes_what_the_backend_writes_and_gather_reads_it_back(name: str, dtype: torch.dtype) -> None:
    writer = WRITERS[name]
    layers = buffers(dtype)
    paged = PagedKV(layers, BlockPlacement.probe(writer, layers[0], 2 * DIM))
    assert (paged.placement.affine is None) == (name == "pairs_interleaved")
    generator = torch.Generator().manual_seed(7)
    slots = torch.randperm(BLOCKS * TOKENS, generator=generator)[:37]
    kv = torch.randn(LAYERS, 2, len(slots), HEADS, DIM, generator=generator).to(dtype)
    paged.scatter(slots, kv)
    reference = buffers(dtype)
    by_writer(writer, reference, slots, kv)
    for ours, theirs in zip(layers, reference):
        assert torch.equal(ours, theirs), "scatter must leave exactly the bytes the backend's own write leaves"
    assert torch.equal(paged.gather(slots), kv)


def test_partial_blocks_round_trip_between_block_tables() -> None:
    """Tokens of a request, including a partly filled last block, moved to another request's blocks."""
    layers = buffers()
    paged = PagedKV(layers, BlockPlacement.probe(keys_by_dimension, layers[0], 2 * DIM))
    kv = torch.randn(LAYERS, 2, 2 * TOKENS + 5, HEADS, DIM)
    first = slot_mapping([7, 2, 9], TOKENS, 0, 2 * TOKENS + 5)
    paged.scatter(first, kv)
    second = slot_mapping([1, 4, 11], TOKENS, 0, 2 * TOKENS + 5)
    paged.scatter(second, paged.gather(first))
    assert torch.equal(paged.gather(second), kv)
    out = torch.empty(LAYERS, 2, 9, HEADS, DIM)
    assert paged.gather(second[-9:], out=out) is out and torch.equal(out, kv[:, :, -9:])


def test_a_writer_that_changes_values_is_refused() -> None:
    def scaled(vectors, slots, buffer):
        token_major(vectors * 0.5, slots, buffer)

    with pytest.raises(LayoutError, match="changed the values"):
        BlockPlacement.probe(scaled, buffers()[0], 2 * DIM)


def test_a_writer_that_drops_or_collides_values_is_refused() -> None:
    def colliding(vectors, slots, buffer):
        token_major(vectors, slots // 2 * 2, buffer)  # odd tokens overwrite even ones

    with pytest.raises(LayoutError):
        BlockPlacement.probe(colliding, buffers()[0], 2 * DIM)


def test_probe_does_not_touch_the_engine_buffer() -> None:
    layer = torch.full((BLOCKS, HEADS, TOKENS, 2 * DIM), 5.0)
    BlockPlacement.probe(token_major, layer, 2 * DIM)
    assert bool((layer == 5.0).all())


def test_exact_integer_bases() -> None:
    assert exact_integer_base(torch.float32) == 1 << 24
    assert exact_integer_base(torch.bfloat16) == 256
    assert exact_integer_base(torch.float16) == 2048


def test_slot_helpers_and_errors() -> None:
    assert slot_mapping([3, 1], 4, 2, 7).tolist() == [14, 15, 4, 5, 6]
    assert blocks_of([3, 1, 8], 4, 2, 9) == [3, 1, 8] and blocks_of([3], 4, 2, 2) == []
    with pytest.raises(LayoutError, match="need 3 blocks"):
        slot_mapping([1, 2], 4, 0, 9)
    layers = buffers()
    paged = PagedKV(layers, BlockPlacement.probe(token_major, layers[0], 2 * DIM))
    with pytest.raises(LayoutError, match="out of range"):
        paged.gather(torch.tensor([BLOCKS * TOKENS]))
    with pytest.raises(LayoutError, match="strides"):
        PagedKV([layers[0], layers[1].transpose(1, 2).contiguous().transpose(1, 2)], paged.placement)
    with pytest.raises(LayoutError, match="cannot be split"):
        BlockPlacement.probe(token_major, layers[0], 2 * DIM + 1)


# --- vLLM's own declarations and ops ------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_tokens,heads,dim", [(128, 3, 64), (32, 2, 128), (64, 4, 80)])
def test_vllm_cpu_backend_placement_is_read_from_its_own_op(dtype: torch.dtype, block_tokens: int, heads: int,
                                                            dim: int) -> None:
    """The CPU backend keeps keys dimension-major and values token-major; scatter matches its op byte for byte."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_tokens, dim)

    def cpu_op(vectors, slots, buffer):
        blocks, h, tokens, _ = buffer.shape
        keys, values = buffer.view(blocks, h, tokens * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(vectors[..., :dim].contiguous(), vectors[..., dim:].contiguous(), keys, values,
                                       slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    layers = [torch.zeros(6, heads, block_tokens, 2 * dim, dtype=dtype) for _ in range(LAYERS)]
    placement = BlockPlacement.probe(cpu_op, layers[0], 2 * dim)
    assert placement.affine is not None
    keys, values = placement.affine
    assert (keys.per_token, keys.per_dim) == (1, block_tokens)  # keys: [dim, tokens]
    assert (values.per_token, values.per_dim) == (dim, 1)  # values: [tokens, dim]
    paged = PagedKV(layers, placement)
    slots = torch.randperm(6 * block_tokens)[:block_tokens + 9]
    kv = torch.randn(LAYERS, 2, len(slots), heads, dim).to(dtype)
    paged.scatter(slots, kv)
    reference = [torch.zeros_like(layer) for layer in layers]
    by_writer(cpu_op, reference, slots, kv)
    assert all(torch.equal(a, b) for a, b in zip(layers, reference))
    assert torch.equal(paged.gather(slots), kv)


@pytest.mark.vllm
@pytest.mark.parametrize("layout_name", ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"])
@pytest.mark.parametrize("kernel_tokens", [16, 8])
def test_every_declared_layout_with_kernel_blocks(layout_name: str, kernel_tokens: int) -> None:
    """Buffers made by vLLM's own `create_kv_cache_views` for each `KVCacheLayout`, kernel blocks of 8
    or 16 tokens in manager blocks of 16; a token-major backend writes them through the views."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheLayout,
        KVCacheTensor,
        compute_layer_kv_cache_shape_bytes,
        compute_layout_strides,
        create_kv_cache_views,
    )

    layout = KVCacheLayout[layout_name]
    spec = FullAttentionSpec(block_size=16, num_kv_heads=HEADS, head_size=DIM, dtype=torch.float32)
    num_blocks, names = 10, ["model.layers.0.attn", "model.layers.1.attn"]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, num_blocks, len(names), layout)  # as vLLM does
    tensor = KVCacheTensor(size=spec.page_size_bytes * num_blocks * len(names), layers=names, layer_stride=layer_stride,
                           block_stride=block_stride)
    raw = torch.zeros(tensor.size, dtype=torch.int8)
    try:
        views = create_kv_cache_views(raw, spec, num_blocks, layout, tensor, kernel_block_size=kernel_tokens)
    except ValueError as exc:  # vLLM itself refuses to split the blocks of layouts whose pages are not dense
        assert kernel_tokens < 16 and not layout.is_block_compact or layout.is_block_outermost, exc
        assert "cannot be split" in str(exc)
        return
    assert tuple(views[0].shape) == compute_layer_kv_cache_shape_bytes(spec, num_blocks, kernel_tokens)[:3] + (2 * DIM,)
    paged = PagedKV(views, BlockPlacement.probe(token_major, views[0], 2 * DIM))
    assert paged.block_tokens == kernel_tokens and paged.num_slots == num_blocks * 16
    slots = slot_mapping([4, 0, 7], 16, 0, 41)
    kv = torch.randn(LAYERS, 2, len(slots), HEADS, DIM)
    paged.scatter(slots, kv)
    for index, view in enumerate(views):  # what the backend would read back through vLLM's own view
        read = view[slots // kernel_tokens, :, slots % kernel_tokens]  # [tokens, heads, 2 * dim]
        assert torch.equal(read[..., :DIM], kv[index, 0]) and torch.equal(read[..., DIM:], kv[index, 1])
    assert torch.equal(paged.gather(slots), kv)
    others = torch.tensor(sorted(set(range(paged.num_slots)) - set(slots.tolist())))
    assert not bool(paged.gather(others).any()), "no byte outside the slots was written"
