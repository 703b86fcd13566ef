"""The connector's plain scheduler and worker, driven the way vLLM drives them, on CPU paged buffers.

The "engine" here is a stand-in for vLLM's scheduler loop and model (the real engine runs in
test_engine.py); the scheduler, the lookups, the pins, the worker and the paged buffers are the
connector's own classes.
"""

from __future__ import annotations

import threading
import time
from itertools import count

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.integrations.vllm.lookup import PinBook, RankLookups, register_local
from nencache.integrations.vllm.paged import PagedKV, slot_mapping
from nencache.integrations.vllm.placement import BlockPlacement
from nencache.integrations.vllm.scheduler import ConnectorScheduler, LoadPhase, ScheduledRequest
from nencache.integrations.vllm.worker import ConnectorWorker

LAYERS, HEADS, DIM = 2, 2, 8
BLOCK, CHUNK, NUM_BLOCKS = 16, 32, 64
_ENGINES = count()


def token_major_writer(vectors: torch.Tensor, slots: torch.Tensor, buffer: torch.Tensor) -> None:
    """A backend whose block holds each token's [key | value] row per head (FlashAttention's order)."""
    tokens = buffer.shape[2]
    buffer[slots // tokens, :, slots % tokens] = vectors


class Engine:
    """A stand-in for vLLM: paged buffers, a block allocator, and a model that writes known KV per token."""

    def __init__(self, cache: KVCache, *, async_load: bool = False, on_piece=None, save_decode: bool = True) -> None:
        buffers = [torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM) for _ in range(LAYERS)]
        self.paged = PagedKV(buffers, BlockPlacement.probe(token_major_writer, buffers[0], 2 * DIM))
        self.free = list(range(NUM_BLOCKS))[::-1]
        self.key = f"engine-{next(_ENGINES)}/dp0"
        self.book = PinBook(cache)
        register_local(self.key, 0, self.book)
        self.pins = RankLookups(self.key, 1)
        self.scheduler = ConnectorScheduler(self.pins, block_size=BLOCK, chunk_size=CHUNK, async_load=async_load,
                                            save_decode=save_decode, lookup_wait=10.0)
        self.worker = ConnectorWorker(cache, self.paged, self.book, block_size=BLOCK, async_load=async_load,
                                      piece_tokens=CHUNK, on_piece=on_piece)

    def allocate(self, num_tokens: int) -> list[int]:
        return [self.free.pop() for _ in range(-(-num_tokens // BLOCK))]

    def compute(self, tokens: list[int], blocks: list[int], start: int) -> None:
        """The "model": the KV of token t at position p is a function of (t, p)."""
        self.paged.scatter(slot_mapping(blocks, BLOCK, start, len(tokens)), expected_kv(tokens)[:, :, start:])

    def read(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        return self.paged.gather(slot_mapping(blocks, BLOCK, start, end))

    def close(self) -> None:
        register_local(self.key, 0, None)
        self.scheduler.close()
        self.worker.close()


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


@pytest.fixture
def engine(cache):
    built = Engine(cache)
    yield built
    built.close()


def run_prefill(engine: Engine, req_id: str, prompt: list[int], computed: int = 0) -> tuple[int, list[int]]:
    """One request through match -> allocate -> plan -> load -> forward -> save, like vLLM's step loop."""
    external, is_async = engine.scheduler.match(req_id, prompt, computed)
    assert external is not None and not is_async
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated(req_id, blocks, external)
    plan = engine.scheduler.build(new=[ScheduledRequest(req_id, computed + external, len(prompt) - computed - external,
                                                        blocks, prompt)])
    engine.worker.start_load(plan)
    engine.compute(prompt, blocks, computed + external)  # the engine computes only what was not loaded
    engine.worker.save(plan)
    return external, blocks


def test_second_request_sharing_a_prefix_is_told_the_matched_tokens(cache, engine) -> None:
    shared = list(range(1000, 1000 + 3 * CHUNK + 5))  # 3 full chunks and 5 more tokens
    first = shared + [7, 8, 9, 10, 11, 12]
    second = shared + [99, 98, 97]

    external, _ = run_prefill(engine, "a", first)
    assert external == 0
    assert cache.lookup(first) == len(first)  # stored, with its partial chunk

    external, blocks = run_prefill(engine, "b", second)
    assert external == 3 * CHUNK  # the full chunks of the shared prefix; the rest differs
    assert torch.equal(engine.read(blocks, 0, len(second)), expected_kv(second))
    assert engine.worker.load_errors() == set()

    # The same prompt again: everything is cached, but the engine must compute the last token.
    external, blocks = run_prefill(engine, "c", first)
    assert external == len(first) - 1
    assert torch.equal(engine.read(blocks, 0, len(first)), expected_kv(first))
    assert len(engine.book) == 0, "every load handed its pin back"


def test_chunks_evicted_between_lookup_and_load_still_load_from_the_pin(cache, engine) -> None:
    prompt = list(range(5, 5 + 4 * CHUNK))
    run_prefill(engine, "a", prompt)
    # The engine's own prefix cache holds 2 blocks: NenCache loads only what lies beyond them.
    external, _ = engine.scheduler.match("b", prompt, 2 * BLOCK)
    assert external == len(prompt) - 1 - 2 * BLOCK
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated("b", blocks, external)
    cache.invalidate(prompt)  # chunks vanish between lookup and load
    assert cache.lookup(prompt) == 0
    plan = engine.scheduler.build(new=[ScheduledRequest("b", 2 * BLOCK + external, 1, blocks, prompt)])
    engine.worker.start_load(plan)
    assert engine.worker.load_errors() == set()
    assert torch.equal(engine.read(blocks, 2 * BLOCK, len(prompt) - 1), expected_kv(prompt)[:, :, 2 * BLOCK : -1])


def test_a_lost_pin_loads_what_is_left_and_reports_the_rest(cache, engine) -> None:
    prompt = list(range(5, 5 + 4 * CHUNK))
    run_prefill(engine, "a", prompt)
    external, _ = engine.scheduler.match("b", prompt, 0)
    blocks = engine.allocate(len(prompt))
    engine.scheduler.allocated("b", blocks, external)
    engine.book.release(["b"])  # the pin expired, and all but the first chunk went away
    cache.invalidate(prompt)
    cache.store(prompt[:CHUNK], expected_kv(prompt[:CHUNK]))
    plan = engine.scheduler.build(new=[ScheduledRequest("b", external, 1, blocks, prompt)])
    engine.worker.start_load(plan)
    # Only the first chunk is left: everything from token 32 on is reported, by block, for recomputation.
    assert engine.worker.load_errors() == set(blocks[CHUNK // BLOCK:])
    assert torch.equal(engine.read(blocks, 0, CHUNK), expected_kv(prompt)[:, :, :CHUNK])


def test_a_queued_request_is_looked_up_and_pinned_before_it_is_scheduled(cache, engine) -> None:
    prompt = list(range(70, 70 + 3 * CHUNK))
    cache.store(prompt, expected_kv(prompt))
    engine.scheduler.seen("q", prompt)
    deadline = time.monotonic() + 10
    while len(engine.book) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(engine.book) == 1
    cache.invalidate(prompt)  # what the lookup pinned stays loadable
    external, blocks = run_prefill(engine, "q", prompt)
    assert external == len(prompt) - 1
    assert torch.equal(engine.read(blocks, 0, len(prompt)), expected_kv(prompt))


def test_a_slow_lookup_answers_not_yet_and_never_blocks_the_scheduler(cache) -> None:
    gate = threading.Event()

    class SlowPins:
        def pin(self, req_id, token_ids, *, salt=None):
            gate.wait(10)
            return 2 * CHUNK

        def release(self, req_ids):
            return None

        def reset(self):
            return True

    scheduler = ConnectorScheduler(SlowPins(), block_size=BLOCK, chunk_size=CHUNK, lookup_wait=0.01)
    prompt = list(range(3 * CHUNK))
    started = time.perf_counter()
    assert scheduler.match("s", prompt, 0) == (None, False)
    assert time.perf_counter() - started < 1.0
    gate.set()
    deadline = time.monotonic() + 10
    while (answer := scheduler.match("s", prompt, 0))[0] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answer == (2 * CHUNK, False)
    scheduler.close()


def test_a_failing_lookup_is_a_miss(cache) -> None:
    class BrokenPins:
        def pin(self, req_id, token_ids, *, salt=None):
            raise ConnectionError("worker gone")

        def release(self, req_ids):
            return None

        def reset(self):
            return False

    scheduler = ConnectorScheduler(BrokenPins(), block_size=BLOCK, chunk_size=CHUNK, lookup_wait=5.0)
    assert scheduler.match("x", list(range(100)), 0) == (0, False)
    assert scheduler.reset() is False
    scheduler.close()


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
    engine.close()


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
    engine.close()


def test_a_finished_request_saves_its_generated_tokens_and_holds_its_blocks_until_then(cache, engine) -> None:
    prompt = list(range(600, 600 + 2 * CHUNK + 10))  # 74 tokens in 5 blocks of 16
    external, blocks = run_prefill(engine, "chat", prompt)
    sequence = prompt + [5, 6, 7, 8, 9, 10]
    engine.compute(sequence[:-1], blocks, len(prompt))  # decoding wrote the KV of all but the last token
    assert engine.scheduler.finished("chat", sequence, len(sequence) - 1, blocks) is True  # vLLM keeps the blocks
    plan = engine.scheduler.build(finished_req_ids={"chat"})
    [final] = plan.saves
    assert final.save is not None and final.save.final and len(final.token_ids) == len(sequence) - 1
    engine.worker.save(plan)
    sent, _ = engine.worker.finished({"chat"})
    assert sent == {"chat"}, "the worker reports the final save so vLLM frees the blocks"
    engine.scheduler.worker_report(finished_saving=sent)
    assert engine.scheduler.states == {}
    # The next turn (prompt, answer, new message) finds the first turn's prompt and answer.
    turn2 = sequence[:-1] + [42] * 20
    assert cache.lookup(turn2) == len(sequence) - 1
    assert torch.equal(cache.retrieve(sequence[:-1]), expected_kv(sequence[:-1]))


def test_without_save_decode_a_finished_request_frees_its_blocks_at_once(cache) -> None:
    engine = Engine(cache, save_decode=False)
    prompt = list(range(800, 800 + CHUNK + 3))
    _, blocks = run_prefill(engine, "r", prompt)
    assert engine.scheduler.finished("r", prompt + [1, 2], len(prompt) + 1, blocks) is False
    engine.close()


def test_a_save_gathers_only_what_is_not_cached(cache, engine, monkeypatch) -> None:
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


def test_a_cached_chunk_evicted_before_the_save_is_stored_again(cache, engine) -> None:
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


def test_a_long_prompt_is_saved_in_bounded_pieces(cache, engine) -> None:
    prompt = list(range(10_000, 10_000 + 20 * CHUNK + 7))  # more than two pieces of 8 chunks
    run_prefill(engine, "long", prompt)
    assert engine.worker._staging is not None and engine.worker._staging.shape[2] <= 8 * CHUNK
    assert cache.lookup(prompt) == len(prompt)
    assert torch.equal(cache.retrieve(prompt), expected_kv(prompt))


def test_reset_forgets_pins_and_clears_the_cache(cache, engine) -> None:
    prompt = list(range(900, 900 + 2 * CHUNK))
    run_prefill(engine, "a", prompt)
    assert engine.scheduler.match("b", prompt, 0)[0] == len(prompt) - 1
    assert len(engine.book) == 1
    assert engine.scheduler.reset() is True
    assert len(engine.book) == 0 and cache.lookup(prompt) == 0
    assert engine.scheduler.match("c", prompt, 0) == (0, False)


def test_kv_producer_saves_but_never_loads_and_consumer_never_saves(cache) -> None:
    prompt = list(range(20, 20 + 2 * CHUNK))
    cache.store(prompt, expected_kv(prompt))
    producer = ConnectorScheduler(RankLookups("none", 1), block_size=BLOCK, chunk_size=CHUNK, can_load=False)
    assert producer.match("p", prompt, 0) == (0, False)
    consumer = ConnectorScheduler(RankLookups("none", 1), block_size=BLOCK, chunk_size=CHUNK, can_save=False)
    consumer.build(new=[ScheduledRequest("c", 0, len(prompt), list(range(4)), prompt)])
    assert consumer.build().saves == []
    producer.close()
    consumer.close()
