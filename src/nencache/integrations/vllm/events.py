"""KV events for KV-aware routers: what NenCache stored, in vLLM's event types. Imports vLLM.

Each worker reports the chunks its saves added (`worker.StoredRun`) as `BlockStored` events keyed by
a hash of the tokens that does not depend on the worker's rank, so every tensor-parallel rank
reports the same events and vLLM's aggregation keeps exactly those all ranks agree on. A reset of
the cache is `AllBlocksCleared`.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    AllBlocksCleared,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
    KVEventAggregator,
)

from nencache.integrations.vllm.worker import StoredRun


class NenCacheKVEvents(KVConnectorKVEvents):
    """Events from the workers of one step, counted so only those every worker reported survive."""

    def __init__(self, num_workers: int = 1) -> None:
        self._aggregator = KVEventAggregator(num_workers)

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._aggregator.add_events(events)

    def aggregate(self) -> "NenCacheKVEvents":
        common = self._aggregator.get_common_events()
        self._aggregator.clear_events()
        self._aggregator.add_events(common)
        self._aggregator.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._aggregator.increment_workers(count)

    def get_all_events(self) -> list[KVCacheEvent]:
        return self._aggregator.get_all_events()

    def get_number_of_workers(self) -> int:
        return self._aggregator.get_number_of_workers()

    def clear_events(self) -> None:
        self._aggregator.clear_events()
        self._aggregator.reset_workers()


def stored_events(runs: Iterable[StoredRun], chunk_size: int) -> list[KVCacheEvent]:
    """`BlockStored` events (one per save, chunk-sized blocks) for the runs a worker stored."""
    return [BlockStored(block_hashes=list(run.keys), parent_block_hash=run.parent, token_ids=list(run.token_ids),
                        block_size=chunk_size, lora_id=None, medium=MEDIUM_CPU, lora_name=None)
            for run in runs if run.keys]


def cleared_event() -> KVCacheEvent:
    return AllBlocksCleared()
