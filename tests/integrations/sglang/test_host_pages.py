"""Pages of SGLang's real MHA and MLA host pools, in every memory layout they offer per-page access for:
the chunk NenCache stores is the KV SGLang's own transfer views address, and pages written under one
layout come back bit-exact under another."""

from __future__ import annotations

import itertools

import pytest
import torch

from nencache import CacheConfig
from nencache.errors import LayoutError
from nencache.integrations.page_store import PageStore, page_namespace
from nencache.integrations.sglang.backend import HiCacheBackend
from nencache.integrations.sglang.pages import HostPageLayout

from .conftest import PAGE, host_indices, random_pages

LAYOUTS = {"mha": ["layer_first", "page_first", "page_first_direct", "page_head"],
           "mla": ["layer_first", "page_first", "page_first_direct"]}


def sglang_rows(host, start: int) -> torch.Tensor:
    """The page at token slot `start` as `[layers, K|V or latent, tokens, heads, dim]`, read through the
    per-layer views and pointer tables SGLang builds for its transfer kernels (not through NenCache)."""
    layers = range(host.layer_num)
    if hasattr(host, "kv_cache_dim"):  # MLA: data_refs[layer] is [slots, 1, latent]; the direct kernels take
        # the whole page_first_direct buffer, [pages, layers, page, 1, latent]
        rows = [host.kv_buffer[start // PAGE, l] if host.layout == "page_first_direct"
                else host.data_refs[l][start : start + PAGE] for l in layers]
        return torch.stack(rows).unsqueeze(1)
    if host.layout == "page_head":  # no per-layer views: SGLang's zero-copy pointers, one per head and K|V
        pointers, sizes = host.get_split_heads_page_buffer_meta(host_indices([start]), host.head_num)
        flat = host.kv_buffer.view(-1)
        item = flat.element_size()
        blocks = [flat[(p - flat.data_ptr()) // item :][: sizes[0] // item].view(PAGE, host.layer_num, host.head_dim)
                  for p in pointers]  # K(head 0), V(head 0), K(head 1), ...
        k = torch.stack(blocks[0::2], dim=2).permute(1, 0, 2, 3)
        v = torch.stack(blocks[1::2], dim=2).permute(1, 0, 2, 3)
        return torch.stack([k, v], dim=1)
    direct = host.layout == "page_first_direct"
    pick = (lambda ref: ref[start // PAGE]) if direct else (lambda ref: ref[start : start + PAGE])
    return torch.stack([torch.stack([pick(host.k_data_refs[l]), pick(host.v_data_refs[l])]) for l in layers])


def as_rows(page: HostPageLayout, chunk: torch.Tensor) -> torch.Tensor:
    """A stored chunk in `sglang_rows`' shape (for MLA: the latent row put back together)."""
    if not page.latent:
        return chunk
    layers, _, tokens, _, half = chunk.shape
    return chunk.permute(0, 2, 1, 3, 4).reshape(layers, tokens, 1, 2 * half).unsqueeze(1)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16)


def memory_store(page: HostPageLayout) -> PageStore:
    return PageStore.from_config(CacheConfig(cpu_size="1MiB"), page.layout, page.page_tokens,
                                 page_namespace("tiny-model", page.layout, page.page_tokens, shard=page.page_format))


@pytest.mark.parametrize(("kind", "layout"), [(k, l) for k, ls in LAYOUTS.items() for l in ls])
def test_chunk_is_the_kv_sglangs_transfer_views_address(make_pool, kind, layout) -> None:
    host = make_pool(kind, layout)
    page = HostPageLayout.of(host)
    assert page.latent == (kind == "mla") and page.page_tokens == PAGE
    starts = [0, 8, 20]
    random_pages(host, starts)
    for start in starts:
        chunk = page.to_chunk(host.get_data_page(start, flat=False))
        assert tuple(chunk.shape) == page.layout.shape(PAGE)
        assert torch.equal(bits(as_rows(page, chunk)), bits(sglang_rows(host, start)))
        assert torch.equal(page.from_chunk(chunk), host.get_data_page(start, flat=True))


@pytest.mark.parametrize(("kind", "writer", "reader"),
                         [(k, w, r) for k, ls in LAYOUTS.items() for w, r in itertools.permutations(ls, 2)])
def test_pages_round_trip_between_host_layouts(make_pool, kind, writer, reader) -> None:
    write_pool, read_pool = make_pool(kind, writer), make_pool(kind, reader)
    write_page, read_page = HostPageLayout.of(write_pool), HostPageLayout.of(read_pool)
    assert write_page.layout == read_page.layout
    store = memory_store(write_page)
    sender = HiCacheBackend(store, write_pool, write_page)
    receiver = HiCacheBackend(store, read_pool, read_page)
    random_pages(write_pool, [20, 4, 12], seed=1)
    keys = ["h0", "h1", "h2"]
    assert sender.batch_set_v1(keys, host_indices([20, 4, 12])) == [True] * 3
    assert sender.batch_exists(keys + ["h9"]) == 3 and receiver.batch_exists(["h9"] + keys) == 0

    assert receiver.batch_get_v1(keys, host_indices([0, 28, 8])) == [True] * 3
    for sent, got in zip([20, 4, 12], [0, 28, 8]):
        assert torch.equal(bits(sglang_rows(read_pool, got)), bits(sglang_rows(write_pool, sent)))
    flat = receiver.get("h1")
    assert flat is not None and torch.equal(bits(flat), bits(read_pool.get_data_page(28, flat=True)))
    assert receiver.get("nope") is None
    store.close()


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_layouts_without_per_page_access_are_refused_with_the_fix(make_pool, kind) -> None:
    host = make_pool(kind, "page_unified")  # constructs, but SGLang's get_data_page raises for it
    with pytest.raises(ValueError, match="Unsupported layout"):
        host.get_data_page(0)
    with pytest.raises(LayoutError, match="--hicache-mem-layout layer_first or page_first"):
        HostPageLayout.of(host)
    with pytest.raises(LayoutError, match="neither MHA heads"):
        HostPageLayout.of(object())


def test_geometry_checks(make_pool) -> None:
    mha, mla = HostPageLayout.of(make_pool("mha", "page_first")), HostPageLayout.of(make_pool("mla", "page_first"))
    assert mla.layout.num_kv_heads == 1 and mla.layout.head_dim * 2 == 24 and mla.page_format != mha.page_format
    store = memory_store(mha)
    with pytest.raises(LayoutError, match="geometry differs"):
        HiCacheBackend(store, make_pool("mla", "page_first"), mla)
    backend = HiCacheBackend(store, make_pool("mha", "page_first"), mha)
    with pytest.raises(LayoutError, match="host indices"):
        backend.batch_get_v1(["p", "q"], host_indices([0]))
    with pytest.raises(LayoutError, match="expected"):
        backend.set("p", torch.zeros(3, dtype=torch.bfloat16))
    namespaces = {page_namespace(model, mha.layout, PAGE, shard=shard)
                  for model in ("a", "b") for shard in ("mha/kv/tp=0/2", "mha/kv/tp=1/2")}
    assert len(namespaces) == 4
    store.close()
