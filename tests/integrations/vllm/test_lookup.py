"""Pins and cross-process lookups: `PinBook`, `LookupServer`, `RankLookups`."""

from __future__ import annotations

import time
from multiprocessing.connection import Client

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.integrations.vllm.lookup import (
    PinBook,
    LookupServer,
    RankLookups,
    decode_pin,
    encode_pin,
    endpoint,
    register_local,
)

CHUNK = 16
LAYOUT = KVLayout(2, 2, 4, torch.float32)


def make_cache(cpu_size: str = "4MiB") -> KVCache:
    return KVCache(CacheConfig(chunk_size=CHUNK, cpu_size=cpu_size), LAYOUT, "lookup-test")


def kv(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(seed))


def test_a_pin_survives_invalidation_until_taken_and_released() -> None:
    with make_cache() as cache:
        prompt = list(range(3 * CHUNK + 5))
        data = kv(len(prompt))
        cache.store(prompt, data)
        book = PinBook(cache)
        assert book.pin("r", prompt) == len(prompt)
        cache.invalidate()
        assert cache.lookup(prompt) == 0
        pinned = book.take("r")
        assert pinned is not None and book.take("r") is None
        copy = torch.cat([chunk.tensor() for chunk in pinned.chunks], dim=2)
        assert torch.equal(copy, data)
        pinned.release()
        pinned.release()  # twice is harmless


def test_pins_are_replaced_released_and_expire() -> None:
    with make_cache("1MiB") as cache:  # 1 MiB holds 8 chunks of 16 tokens: pins decide what stays
        first, second = list(range(2 * CHUNK)), list(range(1000, 1000 + 2 * CHUNK))
        cache.store(first, kv(len(first)))
        cache.store(second, kv(len(second), 1))
        book = PinBook(cache, ttl=0.05)
        assert book.pin("a", first) == 2 * CHUNK
        assert book.pin("a", second) == 2 * CHUNK  # replaces "a"'s first pin
        assert len(book) == 1
        time.sleep(0.1)
        assert book.pin("b", first) == 2 * CHUNK  # "a" expired and was released on the way
        assert len(book) == 1 and book.take("a") is None
        book.release(["b", "unknown"])
        assert len(book) == 0
        book.pin("c", first)
        book.reset()
        assert len(book) == 0 and cache.lookup(first) == 0


def test_lookups_over_a_socket_take_the_smallest_pin_of_all_ranks() -> None:
    key = f"lookup-ranks-{time.monotonic_ns()}"
    with make_cache() as rank0, make_cache() as rank1:
        prompt = list(range(4 * CHUNK))
        rank0.store(prompt, kv(len(prompt)))
        rank1.store(prompt[: 2 * CHUNK], kv(2 * CHUNK))  # rank 1 holds less
        books = [PinBook(rank0), PinBook(rank1)]
        servers = [LookupServer(book, key, rank) for rank, book in enumerate(books)]
        lookups = RankLookups(key, 2)
        try:
            assert lookups.pin("r", prompt) == 2 * CHUNK
            assert lookups.pin("r", prompt, salt="tenant-b") == 0
            assert [len(book) for book in books] == [1, 1]
            lookups.release(["r"])
            assert [len(book) for book in books] == [0, 0]
            assert lookups.reset() is True
            assert rank0.lookup(prompt) == 0 and rank1.lookup(prompt) == 0
        finally:
            lookups.close()
            for server in servers:
                server.close()
    assert RankLookups("no-such-engine", 2).pin("r", prompt) == 0
    assert RankLookups("no-such-engine", 1).reset() is False


def test_in_process_books_are_used_without_a_socket() -> None:
    key = f"lookup-local-{time.monotonic_ns()}"
    with make_cache() as cache:
        prompt = list(range(2 * CHUNK))
        cache.store(prompt, kv(len(prompt)))
        book = PinBook(cache)
        register_local(key, 0, book)
        try:
            assert RankLookups(key, 1).pin("x", prompt) == 2 * CHUNK
            assert len(book) == 1
        finally:
            register_local(key, 0, None)


def test_malformed_requests_are_dropped_and_the_server_keeps_serving() -> None:
    key = f"lookup-bad-{time.monotonic_ns()}"
    with make_cache() as cache:
        prompt = list(range(2 * CHUNK))
        cache.store(prompt, kv(len(prompt)))
        server = LookupServer(PinBook(cache), key, 0)
        path, authkey = endpoint(key, 0)
        try:
            for bad in (b"", b"\x09", b"\x01\xff\xff\xff\xff", encode_pin("r", prompt, None)[:-3]):
                with Client(path, family="AF_UNIX", authkey=authkey) as conn:
                    conn.send_bytes(bad)
                    with pytest.raises(EOFError):
                        conn.recv_bytes()
            with pytest.raises(Exception):
                Client(path, family="AF_UNIX", authkey=b"wrong key").send_bytes(encode_pin("r", prompt, None))
            assert RankLookups(key, 1).pin("r", prompt) == 2 * CHUNK
        finally:
            server.close()


def test_pin_messages_round_trip() -> None:
    req_id, tokens, salt = decode_pin(encode_pin("req-7", [1, 2, 3, 1 << 40], "salt"))
    assert (req_id, tokens.tolist(), salt) == ("req-7", [1, 2, 3, 1 << 40], b"salt")
    with pytest.raises(ValueError):
        decode_pin(b"\x01\x05\x00\x00\x00ab")


def test_a_requests_first_pin_reports_its_arrival_to_the_policies_once() -> None:
    class Counting(KVCache):
        arrivals: list[int] = []

        def note_request(self, token_ids, *, salt=None) -> None:
            self.arrivals.append(len(token_ids))
            super().note_request(token_ids, salt=salt)

    with Counting(CacheConfig(chunk_size=CHUNK, cpu_size="4MiB", eviction="learned"), LAYOUT, "lookup-test") as cache:
        book = PinBook(cache)
        prompt = list(range(2 * CHUNK))
        book.pin("r", prompt)
        book.pin("r", prompt)  # the scheduler asked again
        book.pin("s", prompt)
        assert cache.arrivals == [2 * CHUNK, 2 * CHUNK]
