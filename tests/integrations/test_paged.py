"""Paged KV <-> chunks: gather from one block table, store, scatter into another, bit-exact."""

from __future__ import annotations

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.errors import LayoutError
from nencache.integrations.paged import PagedKV, blocks_of, detect_kv_dim, layer_order, slot_mapping

LAYERS, HEADS, DIM = 3, 2, 8


def paged_buffers(num_blocks: int, block_size: int, *, kv_dim: int = 0, hnd: bool = False,
                  dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Per-layer paged buffers; `hnd` stores heads before tokens in memory (a permuted, unmergeable view)."""
    layers = []
    for _ in range(LAYERS):
        if hnd:
            physical = torch.zeros(2, num_blocks, HEADS, block_size, DIM, dtype=dtype)
            layer = physical.permute(0, 1, 3, 2, 4)
        else:
            layer = torch.zeros(2, num_blocks, block_size, HEADS, DIM, dtype=dtype)
        layers.append(layer.transpose(0, 1) if kv_dim == 1 else layer)
    return layers


def random_block_table(num_tokens: int, block_size: int, num_blocks: int, seed: int) -> list[int]:
    needed = -(-num_tokens // block_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=generator)[:needed].tolist()


def write_request(paged: PagedKV, kv: torch.Tensor, block_ids: list[int]) -> None:
    paged.scatter(slot_mapping(block_ids, paged.block_size, 0, kv.shape[2]), kv)


@pytest.mark.parametrize(("block_size", "chunk_size", "num_tokens"), [
    (16, 32, 100),   # chunk a multiple of the block, partial last block and partial last chunk
    (16, 24, 77),    # chunk not a multiple of the block
    (8, 8, 64),      # chunk == block, everything full
    (16, 256, 40),   # one partial chunk smaller than a block pair
])
@pytest.mark.parametrize(("kv_dim", "hnd"), [(0, False), (1, False), (0, True)])
def test_round_trip_between_block_tables_is_bit_exact(block_size, chunk_size, num_tokens, kv_dim, hnd) -> None:
    num_blocks = 24
    torch.manual_seed(block_size * 1000 + num_tokens)
    tokens = torch.randint(0, 30000, (num_tokens,)).tolist()
    kv = torch.randn(LAYERS, 2, num_tokens, HEADS, DIM).to(torch.bfloat16)
    source = PagedKV(paged_buffers(num_blocks, block_size, kv_dim=kv_dim, hnd=hnd), block_size, kv_dim=kv_dim)
    table_a = random_block_table(num_tokens, block_size, num_blocks, seed=1)
    write_request(source, kv, table_a)

    layout = KVLayout(LAYERS, HEADS, DIM, torch.bfloat16)
    assert source.layout == layout
    with KVCache(CacheConfig(chunk_size=chunk_size, cpu_size="16MiB"), layout, "paged-test") as cache:
        gathered = source.gather(slot_mapping(table_a, block_size, 0, num_tokens))
        assert torch.equal(gathered, kv)
        cache.store(tokens, gathered)
        assert cache.lookup(tokens) == num_tokens

        target = PagedKV(paged_buffers(num_blocks, block_size, kv_dim=kv_dim, hnd=hnd), block_size, kv_dim=kv_dim)
        table_b = random_block_table(num_tokens, block_size, num_blocks, seed=2)
        assert table_b != table_a
        target.scatter(slot_mapping(table_b, block_size, 0, num_tokens), cache.retrieve(tokens))

    back = target.gather(slot_mapping(table_b, block_size, 0, num_tokens))
    assert torch.equal(back.view(torch.int16), kv.view(torch.int16))
    untouched = set(range(num_blocks)) - set(table_b)
    for layer in target.layers:
        assert not layer.kv[:, sorted(untouched)].any(), "scatter wrote outside the request's blocks"


def test_partial_range_and_out_buffer() -> None:
    block_size, num_blocks = 4, 10
    paged = PagedKV(paged_buffers(num_blocks, block_size), block_size)
    kv = torch.randn(LAYERS, 2, 13, HEADS, DIM).to(torch.bfloat16)
    table = [7, 2, 9, 0]
    write_request(paged, kv, table)
    out = torch.empty(LAYERS, 2, 13, HEADS, DIM, dtype=torch.bfloat16)
    paged.gather(slot_mapping(table, block_size, 5, 11), out=out[:, :, 5:11])
    assert torch.equal(out[:, :, 5:11], kv[:, :, 5:11])
    assert slot_mapping(table, block_size, 5, 9).tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0]
    assert blocks_of(table, block_size, 5, 13) == [2, 9, 0]
    assert blocks_of(table, block_size, 8, 8) == []


def test_shapes_and_errors() -> None:
    assert detect_kv_dim((2, 100, 16, 4, 64), 16) == 0
    assert detect_kv_dim((100, 2, 16, 4, 64), 16) == 1
    assert detect_kv_dim((2, 2, 16, 4, 64), 16, num_blocks=2) == 0
    with pytest.raises(LayoutError, match="MLA"):
        detect_kv_dim((100, 16, 576), 16)
    with pytest.raises(LayoutError, match="blocks"):
        slot_mapping([1, 2], 16, 0, 40)
    paged = PagedKV(paged_buffers(4, 4), 4)
    with pytest.raises(LayoutError, match="out of range"):
        paged.gather(torch.tensor([0, 16]))
    with pytest.raises(LayoutError, match="layer 1"):
        PagedKV([torch.zeros(2, 4, 4, 2, 8), torch.zeros(2, 4, 4, 2, 4)], 4)
    names = ["model.layers.10.self_attn.attn", "model.layers.2.self_attn.attn", "model.layers.0.self_attn.attn"]
    assert layer_order(names) == [names[2], names[1], names[0]]
