"""The vLLM connector's plain scheduler and worker, driven the way vLLM drives them, on CPU paged tensors."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.integrations.lookup_ipc import CacheLookup, LookupServer, register_local
from nencache.integrations.paged import PagedKV, slot_mapping
from nencache.integrations.vllm import connector_settings, request_salt
from nencache.integrations.vllm_scheduler import ConnectorScheduler, LoadPhase, ScheduledRequest
from nencache.integrations.vllm_worker import ConnectorWorker

LAYERS, HEADS, DIM = 2, 2, 8
BLOCK, CHUNK, NUM_BLOCKS = 16, 32, 64


class Engine:
    """A stand-in for vLLM: paged buffers, a block allocator, and a model that writes known KV per token."""

    def __init__(self, cache: KVCache, *, async_load: bool = False, on_piece=None) -> None:
        buffers = [torch.zeros(2, NUM_BLOCKS, BLOCK, HEADS, DIM, dtype=torch.float32) for _ in range(LAYERS)]
        self.paged = PagedKV(buffers, BLOCK)
        self.free = list(range(NUM_BLOCKS))[::-1]
        self.scheduler = ConnectorScheduler(cache, block_size=BLOCK, chunk_size=CHUNK, async_load=async_load)
        self.worker = ConnectorWorker(cache, self.paged, async_load=async_load, piece_tokens=CHUNK, on_piece=on_piece)

    def allocate(self, num_tokens: int) -> list[int]:
        return [self.free.pop() for _ in range(-(-num_tokens // BLOCK))]

    def compute(self, tokens: list[int], blocks: list[int], start: int) -> None:
        """The "model": the KV of token t at position p is a function of (t, p)."""
        self.paged.scatter(slot_mapping(blocks, BLOCK, start, len(tokens)), expected_kv(tokens)[:, :, start:])

    def read(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        return self.paged.gather(slot_mapping(blocks, BLOCK, start, end))


def expected_kv(tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor(tokens, dtype=torch.float32)
    pos = torch.arange(len(tokens), dtype=torch.float32)
    base = (ids * 1000 + pos)[None, None, :, None, None]
    offsets = torch.arange(LAYERS * 2 * HEADS * DIM, dtype=torch.float32).view(LAYERS, 2, 1, HEADS, DIM)
    return base + offsets / 1000


@pytest.fixture
def cache():
    with KVCache(CacheConfig(chunk_size=CHUNK, cpu_size="8MiB"), KVLayout(LAYERS, HEADS, DIM, torch.float32),
                 "sched-test") as kv_cache:
        yield kv_cache


def run_prefill(engine: Engine, req_id: str, prompt: list[int]) -> tuple[int, list[int]]:
    """One request through match -> allocate -> plan -> load -> forward -> save, like vLLM's step loop."""
    external, is_async = engine.scheduler.match(req_id, prompt, 0)
    assert not is_async
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated(req_id, blocks, external)
    plan = engine.scheduler.build(new=[ScheduledRequest(req_id, external, len(prompt) - external, blocks, prompt)])
    engine.worker.start_load(plan)
    engine.compute(prompt, blocks, external)  # the engine computes only what was not loaded
    engine.worker.save(plan)
    return external, blocks


def test_second_request_sharing_a_prefix_is_told_the_matched_tokens(cache) -> None:
    engine = Engine(cache)
    shared = list(range(1000, 1000 + 3 * CHUNK + 5))  # 3 full chunks and 5 more tokens
    first = shared + [7, 8, 9, 10, 11, 12]
    second = shared + [99, 98, 97]

    external, _ = run_prefill(engine, "a", first)
    assert external == 0
    assert cache.lookup(first) == len(first)  # stored, with its partial chunk

    external, blocks = run_prefill(engine, "b", second)
    assert external == 3 * CHUNK  # the full chunks of the shared prefix; the rest differs
    assert torch.equal(engine.read(blocks, 0, len(second)), expected_kv(second)[:, :, :])
    assert engine.worker.load_errors() == set()

    # The same prompt again: everything is cached, but the engine must compute the last token.
    external, blocks = run_prefill(engine, "c", first)
    assert external == len(first) - 1
    assert torch.equal(engine.read(blocks, 0, len(first)), expected_kv(first))


def test_engine_prefix_hit_and_evicted_chunks(cache) -> None:
    engine = Engine(cache)
    prompt = list(range(5, 5 + 4 * CHUNK))
    run_prefill(engine, "a", prompt)
    # The engine's own prefix cache holds 2 blocks: NenCache loads only what lies beyond them.
    external, _ = engine.scheduler.match("b", prompt, 2 * BLOCK)
    assert external == len(prompt) - 1 - 2 * BLOCK
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated("b", blocks, external)
    cache.invalidate(prompt[: 3 * CHUNK])  # chunks vanish between lookup and load
    cache.store(prompt[:CHUNK], expected_kv(prompt[:CHUNK]))
    plan = engine.scheduler.build(new=[ScheduledRequest("b", 2 * BLOCK + external, 1, blocks, prompt)])
    engine.worker.start_load(plan)
    # Only the first chunk is left: everything from token 32 on is reported, by block, for recomputation.
    assert engine.worker.load_errors() == set(blocks[CHUNK // BLOCK:])


def test_request_aborted_mid_load_frees_state_and_reports_failed_blocks(cache) -> None:
    gate, reached = threading.Event(), threading.Event()

    def on_piece(req_id: str, position: int) -> None:
        if position == CHUNK:  # after the first piece: pause until the abort went out
            reached.set()
            gate.wait(10)

    prompt = list(range(300, 300 + 4 * CHUNK + 3))
    cache.store(prompt, expected_kv(prompt))
    engine = Engine(cache, async_load=True, on_piece=on_piece)
    external, is_async = engine.scheduler.match("r", prompt, 0)
    assert (external, is_async) == (len(prompt) - 1, True)
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated("r", blocks, external)
    engine.worker.start_load(engine.scheduler.build())  # async loads go out before the request is scheduled
    assert reached.wait(10)

    assert engine.scheduler.finished("r") is True  # aborted: keep the blocks while the worker writes them
    assert engine.scheduler.states["r"].load is LoadPhase.SENT
    next_plan = engine.scheduler.build(finished_req_ids={"r"})
    assert next_plan.aborted == ["r"]
    engine.worker.start_load(next_plan)
    gate.set()
    engine.worker.wait(10)

    _, loaded = engine.worker.finished({"r"})
    failed = engine.worker.load_errors()
    assert loaded == {"r"}
    assert failed == set(blocks[CHUNK // BLOCK:]), "every block after the first loaded piece is reported"
    assert torch.equal(engine.read(blocks, 0, CHUNK), expected_kv(prompt)[:, :, :CHUNK])
    engine.scheduler.worker_report(loaded, failed)
    assert engine.scheduler.states == {}
    assert engine.scheduler.build().requests == []
    engine.worker.close()


def test_async_load_completes_and_request_is_then_saved_once(cache) -> None:
    prompt = list(range(50, 50 + 2 * CHUNK))
    cache.store(prompt[:CHUNK], expected_kv(prompt[:CHUNK]))
    engine = Engine(cache, async_load=True)
    external, is_async = engine.scheduler.match("r", prompt, 0)
    assert (external, is_async) == (CHUNK, True)
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated("r", blocks, external)
    engine.worker.start_load(engine.scheduler.build())
    engine.worker.wait(10)
    _, loaded = engine.worker.finished()
    engine.scheduler.worker_report(loaded, engine.worker.load_errors())
    engine.scheduler.allocated("r", blocks, 0)  # vLLM's second call once the load is done
    plan = engine.scheduler.build(new=[ScheduledRequest("r", CHUNK, CHUNK, blocks, prompt)])
    assert [w.req_id for w in plan.saves] == ["r"] and not plan.loads
    engine.compute(prompt, blocks, CHUNK)
    engine.worker.save(plan)
    assert cache.lookup(prompt) == len(prompt)
    assert torch.equal(cache.retrieve(prompt), expected_kv(prompt))
    assert engine.scheduler.finished("r") is False and engine.scheduler.states == {}
    engine.worker.close()


def test_lookup_over_a_socket_and_in_process(cache) -> None:
    prompt = list(range(9, 9 + 2 * CHUNK))
    cache.store(prompt, expected_kv(prompt))
    key = "engine-under-test/dp0"
    server = LookupServer(cache, key)
    client = CacheLookup(key)
    try:
        assert client.lookup(prompt) == len(prompt)
        assert client.lookup(prompt, salt="tenant-b") == 0
        register_local(key, SimpleNamespace(lookup=lambda tokens, salt=None: 7))
        assert client.lookup(prompt) == 7
    finally:
        register_local(key, None)
        client.close()
        server.close()
    assert CacheLookup("no-such-engine").lookup(prompt) == 0


def test_request_salt_and_connector_settings() -> None:
    plain = SimpleNamespace(cache_salt=None, lora_request=None, mm_features=None)
    assert request_salt(plain) is None
    lora = SimpleNamespace(cache_salt="t1", lora_request=SimpleNamespace(lora_name="sql", lora_int_id=3),
                           mm_features=[SimpleNamespace(identifier="img-abc",
                                                        mm_position=SimpleNamespace(offset=4, length=9))])
    assert request_salt(lora) == "salt=t1|lora=sql:3|mm=img-abc@4+9"
    overrides, options = connector_settings({"lmcache.chunk_size": 64, "nencache.async_load": True,
                                             "nencache.cpu_size": "1GiB", "discard_partial_chunks": True})
    assert overrides == {"chunk_size": 64, "cpu_size": "1GiB"} and options == {"async_load": True}


def test_a_save_gathers_only_what_is_not_cached(cache, monkeypatch) -> None:
    engine = Engine(cache)
    prefix = list(range(300, 300 + 2 * CHUNK))
    prompt = prefix + list(range(7, 7 + CHUNK + 5))
    cache.store(prefix, expected_kv(prefix))
    gathered: list[int] = []
    gather = engine.paged.gather
    monkeypatch.setattr(engine.paged, "gather", lambda slots, out=None: (gathered.append(len(slots)), gather(slots, out=out))[1])
    lookups = cache.stats()["lookups"]
    external, _ = run_prefill(engine, "r", prompt)
    assert external == 2 * CHUNK and gathered == [len(prompt) - 2 * CHUNK]
    assert cache.stats()["lookups"] == lookups + 1  # the scheduler's; the save's own check is not counted
    assert torch.equal(cache.retrieve(prompt), expected_kv(prompt))


def test_a_cached_chunk_evicted_before_the_save_is_stored_again(cache) -> None:
    engine = Engine(cache)
    prefix = list(range(400, 400 + 2 * CHUNK))
    prompt = prefix + list(range(3, 3 + CHUNK))
    cache.store(prefix, expected_kv(prefix))
    external, _ = engine.scheduler.match("r", prompt, 0)
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated("r", blocks, external)
    plan = engine.scheduler.build(new=[ScheduledRequest("r", external, len(prompt) - external, blocks, prompt)])
    engine.worker.start_load(plan)
    engine.compute(prompt, blocks, external)
    cache.invalidate(prefix)  # gone between the load and the save
    engine.worker.save(plan)
    assert cache.lookup(prompt) == len(prompt)
    assert torch.equal(cache.retrieve(prompt), expected_kv(prompt))
