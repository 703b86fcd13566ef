"""Other model shapes in the real engine: tensor parallelism over two CPU workers, and an MLA model.

Both use small random-initialised models (no weights can be fetched here): a Llama whose 4 heads
split over two ranks, and a DeepSeek-V2 whose KV is one MLA latent per token. Greedy answers must
equal plain vLLM's in the same configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integrations.vllm.engine import run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TWO_WORKERS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core each: vLLM's CPU build binds a worker per NUMA node otherwise


def spec(model: Path, connector: dict[str, Any] | None, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": str(model), "connector": connector, "steps": steps, **extra}


def test_tensor_parallel_ranks_each_load_their_own_heads(tiny_llama_dir: Path, tmp_path: Path,
                                                          prompts: dict[str, list[int]]) -> None:
    """Two ranks, each with its own cache of its own heads; a hit counts only what both ranks hold."""
    doc, short = prompts["doc"], prompts["doc_short"]
    [plain] = run_engine(spec(tiny_llama_dir, None, [{"prompts": [doc, short]}], tensor_parallel_size=2),
                         env=TWO_WORKERS)
    connector = {"disk_path": str(tmp_path), "cpu_size": "128MiB"}
    [first, reuse] = run_engine(spec(tiny_llama_dir, connector, [{"prompts": [doc]}, {"prompts": [doc, short]}],
                                     tensor_parallel_size=2), env=TWO_WORKERS)
    [restart] = run_engine(spec(tiny_llama_dir, connector, [{"prompts": [doc]}], tensor_parallel_size=2),
                           env=TWO_WORKERS)
    assert len({tuple(o) for o in plain["outputs"]}) == 2, "the model's answers depend on the prompt"
    assert first["outputs"] == plain["outputs"][:1] and first["cached"] == [0]
    assert reuse["cached"] == [len(doc) - 1, 1024] and reuse["outputs"] == plain["outputs"]
    assert restart["cached"] == [len(doc) - 1] and restart["outputs"] == plain["outputs"][:1]
    ranks = sorted(p.name for p in tmp_path.iterdir())
    assert len(ranks) == 2, f"each rank keeps its own heads' chunks: {ranks}"


def test_mla_model_runs_with_the_connector_standing_aside_on_cpu(tiny_mla_dir: Path,
                                                                  prompts: dict[str, list[int]]) -> None:
    """vLLM's CPU platform turns chunked prefill and prefix caching off for MLA models (its MLA backend
    cannot resume a prefill from cached KV there), so the connector says so once and loads nothing;
    the engine starts and answers exactly as without it."""
    doc = prompts["doc"][:700]
    [plain] = run_engine(spec(tiny_mla_dir, None, [{"prompts": [doc]}]))
    [served] = run_engine(spec(tiny_mla_dir, {"cpu_size": "64MiB"}, [{"prompts": [doc, doc]}]))
    assert served["outputs"] == plain["outputs"] * 2
    assert served["cached"] == [0, 0]


@pytest.mark.vllm
def test_mla_latent_placement_is_read_from_the_cpu_mla_backend() -> None:
    """The CPU MLA backend's own cache write: one 576-wide latent per token, split into halves."""
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

    from nencache.integrations.vllm.paged import PagedKV
    from nencache.integrations.vllm.placement import BlockPlacement

    rank, rope, blocks, tokens = 512, 64, 6, 16

    def write(vectors: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
        CPUMLAImpl.do_kv_cache_update(None, vectors[:, 0, :rank].contiguous(), vectors[:, :, rank:].contiguous(),  # type: ignore[arg-type]
                                      buffer, slots, "auto", torch.tensor(1.0))

    layers = [torch.zeros(blocks, 1, tokens, rank + rope) for _ in range(2)]
    placement = BlockPlacement.probe(write, layers[0], rank + rope)
    paged = PagedKV(layers, placement)
    assert (placement.num_heads, placement.head_dim) == (1, (rank + rope) // 2)
    slots = torch.tensor([3, 17, 18, 40, 95])
    latent = torch.randn(2, len(slots), rank + rope)
    for layer, values in zip(layers, latent):
        write(values[:, None, :], slots, layer)
    gathered = paged.gather(slots)  # [layers, 2, tokens, 1, 288]: the latent's halves
    assert torch.equal(torch.cat([gathered[:, 0, :, 0], gathered[:, 1, :, 0]], dim=-1), latent)
    copy = [torch.zeros_like(layer) for layer in layers]
    PagedKV(copy, placement).scatter(slots, gathered)
    assert all(torch.equal(a, b) for a, b in zip(copy, layers))
