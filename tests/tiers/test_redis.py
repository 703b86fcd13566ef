"""RedisTier against real redis-server processes: contract (standalone and cluster), faults, sharing, TTL, auth."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from nencache.errors import ClosedError, ConfigError, TierError
from nencache.tiers.redis.tier import RedisTier, key_slot
from nencache.tiers.redis.url import parse_url
from nencache.tiers.redis.resp import Connection
from tests.redis_util import RedisServer, free_port, make_certificate, start_cluster, start_server
from tests.tiers.contract import TierContract, make_blob, make_key

pytestmark = pytest.mark.redis


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def raw(url: str) -> Connection:
    """A plain connection to the first server of `url`, to look at or damage what the tier stored."""
    target = parse_url(url)
    return Connection(target.nodes[0], target, timeout=5.0)


def rkey(namespace: str, key: bytes, prefix: str = "nencache") -> bytes:
    return f"{prefix}:{namespace}:".encode() + key


def items(n: int, tokens: int = 8, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [(make_key(i), make_blob(make_key(i), tokens=tokens, seed=i)) for i in range(start, start + n)]


@pytest.fixture
def tier(redis_server: RedisServer) -> Iterator[RedisTier]:
    t = RedisTier(redis_server.url, uuid.uuid4().hex)
    yield t
    t.clear()
    t.close()


class TestRedisContract(TierContract):
    pass


class TestRedisClusterContract(TierContract):
    @pytest.fixture
    def tier(self, redis_cluster) -> Iterator[RedisTier]:
        t = RedisTier(redis_cluster.url, uuid.uuid4().hex)
        assert t.is_up
        yield t
        t.clear()
        t.close()


# -- layout of keys -----------------------------------------------------------------------------

def test_keys_are_prefixed_and_clear_keeps_other_namespaces(redis_server: RedisServer) -> None:
    a, b = RedisTier(redis_server.url, "a*"), RedisTier(redis_server.url, "ab", key_prefix="nencache")
    try:
        a.put(items(3))
        b.put(items(3))
        with raw(redis_server.url) as conn:
            assert conn.call("EXISTS", rkey("a*", make_key(0))) == 1
        a.clear()  # "a*" is a glob pattern: clear must not take "ab" along
        assert a.contains_prefix([k for k, _ in items(3)]) == 0
        assert b.contains_prefix([k for k, _ in items(3)]) == 3
    finally:
        b.clear()
        a.close()
        b.close()


def test_cluster_spreads_chunks_over_every_node_and_clears_them_all(redis_cluster) -> None:
    ns = uuid.uuid4().hex
    t, other = RedisTier(redis_cluster.url, ns), RedisTier(redis_cluster.url, ns + "-other")
    try:
        t.put(items(48))
        other.put(items(4))
        assert all(int(node.cli("dbsize")) > 0 for node in redis_cluster.nodes)
        assert t.contains_prefix([k for k, _ in items(48)]) == 48
        t.clear()
        assert sum(int(node.cli("dbsize")) for node in redis_cluster.nodes) == 4
        assert other.contains_prefix([k for k, _ in items(4)]) == 4
    finally:
        other.clear()
        t.close()
        other.close()


def test_key_slot_matches_redis(redis_cluster) -> None:
    with raw(redis_cluster.url) as conn:
        for key in [b"plain", b"{user}:x", b"a{}b", b"x{y}z{w}", b"{", b"}{", os.urandom(30), b"\x00{\xff}\x01"]:
            assert key_slot(key) == conn.call("CLUSTER", "KEYSLOT", key), key


# -- corrupt values --------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["junk", "truncated", "flipped", "other-key", "empty"])
def test_damaged_value_is_a_counted_miss_and_deleted(tier: RedisTier, redis_server: RedisServer, damage: str) -> None:
    (key, blob), (key2, blob2) = items(2, tokens=32)
    tier.put([(key, blob), (key2, blob2)])
    ns = tier._prefix.decode().split(":")[1]
    bad = {"junk": os.urandom(len(blob)), "truncated": blob[:-7], "flipped": blob[:-1] + bytes([blob[-1] ^ 1]),
           "other-key": blob2, "empty": b""}[damage]
    with raw(redis_server.url) as conn:
        conn.call("SET", rkey(ns, key), bad)
        got = tier.get([key, key2])
        assert got[0] is None and bytes(got[1]) == blob2
        assert tier.stats().corrupt == 1
        assert conn.call("EXISTS", rkey(ns, key)) == 0  # the damaged value was removed


def test_evicted_key_ends_the_prefix_and_full_redis_drops_puts(tmp_path: Path) -> None:
    server = start_server(tmp_path, ["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"])
    t = RedisTier(server.url, "full")
    try:
        data = items(6)
        t.put(data)
        with raw(server.url) as conn:
            conn.call("UNLINK", rkey("full", make_key(3)))  # as if Redis had evicted it
        assert t.contains_prefix([k for k, _ in data]) == 3
        big = items(8, tokens=4096, start=100)  # 256 KiB each: Redis refuses past 2 MB (OOM)
        for i in range(0, 8, 2):
            t.put(big[i:i + 2])
        stats = t.stats()
        assert stats.dropped >= 1 and stats.errors >= 1 and t.is_up
        assert t.contains_prefix([make_key(0)]) == 1
    finally:
        t.close()
        server.kill()


def test_blob_held_by_caller_is_never_overwritten(tier: RedisTier) -> None:
    data = items(4, tokens=2048)  # 128 KiB blobs: received into pooled, reused buffers
    tier.put(data)
    held = tier.get([data[0][0]])[0]
    for _ in range(20):
        for g, (_, b) in zip(tier.get([k for k, _ in data[1:]]), data[1:]):
            assert bytes(g) == b
    assert bytes(held) == data[0][1]


# -- faults ----------------------------------------------------------------------------------------

def test_unreachable_at_start_warns_once_serves_misses_fast_then_recovers(tmp_path: Path, caplog) -> None:
    port = free_port()
    keys = [k for k, _ in items(4)]
    with caplog.at_level(logging.WARNING, logger="nencache.redis"):
        started = time.perf_counter()
        t = RedisTier(f"redis://127.0.0.1:{port}", "late", retry_cap=0.5)
        try:
            for _ in range(200):
                assert t.contains_prefix(keys) == 0
                assert t.get(keys) == [None] * 4
                t.put(items(4))
            assert time.perf_counter() - started < 1.0
            warnings = [r for r in caplog.records if r.name == "nencache.redis" and r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
            assert t.stats().dropped == 800 and t.stats().misses == 800
            server = RedisServer(tmp_path, port)
            server.start()
            try:
                wait_for(lambda: t.is_up, 5.0, "the tier to notice Redis is up")
                t.put(items(4))
                assert t.contains_prefix(keys) == 4
            finally:
                server.kill()
        finally:
            t.close()


def test_killed_mid_run_no_exception_then_back_within_seconds(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    t = RedisTier(server.url, "kill")
    data = items(6, tokens=64)
    blobs = dict(data)
    keys = list(blobs)
    failures: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                t.put(data[:3])
                for k, g in zip(keys, t.get(keys)):
                    assert g is None or bytes(g) == blobs[k], "served a wrong chunk"
                t.contains_prefix(keys)
        except BaseException as exc:  # noqa: BLE001 - any escape is the failure under test
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    try:
        t.put(data)
        for th in threads:
            th.start()
        time.sleep(0.3)
        server.kill()
        wait_for(lambda: not t.is_up, 3.0, "the tier to mark Redis down")
        started = time.perf_counter()
        for _ in range(100):
            assert t.get(keys) == [None] * 6 and t.contains_prefix(keys) == 0
            t.put(data)
        assert time.perf_counter() - started < 0.5, "misses while down must not wait on timeouts"
        assert t.stats().errors >= 1 and t.stats().dropped >= 600
        server.start()  # same port, empty (no persistence)
        wait_for(lambda: t.is_up, 6.0, "the tier to use Redis again after a restart")
        t.put(data)
        assert [bytes(g) for g in t.get(keys)] == [blobs[k] for k in keys]
    finally:
        stop.set()
        for th in threads:
            th.join(10)
        t.close()
        server.kill()
    assert not failures, failures


def test_stalled_server_costs_one_timeout_then_misses_are_immediate(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    t = RedisTier(server.url, "stall", timeout=0.2)
    keys = [k for k, _ in items(3)]
    try:
        t.put(items(3))
        os.kill(server.proc.pid, signal.SIGSTOP)
        started = time.perf_counter()
        assert t.get(keys) == [None] * 3
        assert time.perf_counter() - started < 1.0
        assert not t.is_up and t.stats().errors == 1
        started = time.perf_counter()
        assert t.contains_prefix(keys) == 0 and t.get(keys) == [None] * 3
        assert time.perf_counter() - started < 0.05
        os.kill(server.proc.pid, signal.SIGCONT)
        wait_for(lambda: t.is_up, 6.0, "the tier to come back after SIGCONT")
        assert t.contains_prefix(keys) == 3
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        t.close()
        server.kill()


def test_silent_endpoint_bounded_by_timeout() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        started = time.perf_counter()
        t = RedisTier(f"redis://127.0.0.1:{listener.getsockname()[1]}", "silent", timeout=0.1)
        try:
            assert time.perf_counter() - started < 1.0 and not t.is_up
            assert t.get([make_key(1)]) == [None]
        finally:
            t.close()


def test_cluster_node_killed_then_restarted(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path)
    t = RedisTier(cluster.url, "nodes", retry_cap=1.0)
    data = items(24)
    keys = [k for k, _ in data]
    try:
        t.put(data)
        assert t.contains_prefix(keys) == 24
        cluster.nodes[1].kill()
        t.get(keys)  # fails on the dead node: counted, no exception
        assert not t.is_up and t.stats().errors >= 1
        started = time.perf_counter()
        t.put(data)
        assert t.get(keys) == [None] * 24
        assert time.perf_counter() - started < 0.05
        cluster.nodes[1].start()
        wait_for(lambda: "cluster_state:ok" in cluster.nodes[0].cli("cluster", "info"), 20.0, "cluster_state:ok")
        wait_for(lambda: t.is_up, 6.0, "the tier to use the cluster again")
        t.put(data)
        assert t.contains_prefix(keys) == 24
    finally:
        t.close()
        cluster.kill()


def test_slot_moved_to_another_node_is_followed(tmp_path: Path) -> None:
    """A slot migrated under the tier: the bulk path meets MOVED, redis-py re-reads the topology, reads go on."""
    cluster = start_cluster(tmp_path)
    t = RedisTier(cluster.url, "moved")
    data = items(1)
    key = data[0][0]
    try:
        t.put(data)
        assert t.contains_prefix([key]) == 1
        slot = key_slot(b"nencache:moved:" + key)
        nodes = {n.port: redis.Redis(port=n.port) for n in cluster.nodes}
        ids = {port: r.execute_command("CLUSTER MYID").decode() for port, r in nodes.items()}
        owner = next(p for p, r in nodes.items() if r.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1)
        target = next(p for p in nodes if p != owner)
        nodes[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[owner])
        nodes[owner].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        names = nodes[owner].execute_command("CLUSTER GETKEYSINSLOT", slot, 10)
        nodes[owner].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *names)
        for r in nodes.values():
            r.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        wait_for(lambda: t.get([key])[0] is not None, 5.0, "reads from the slot's new node")
        assert bytes(t.get([key])[0]) == data[0][1] and t.contains_prefix([key]) == 1
        assert nodes[target].execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
        t.delete([key])  # the control path (redis-py) follows the new owner too
        assert nodes[target].execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        for r in nodes.values():
            r.close()
    finally:
        t.close()
        cluster.kill()


# -- sharing, expiry, auth, transports --------------------------------------------------------------

_WRITER = """
import sys
sys.path.insert(0, sys.argv[3])
from tests.tiers.contract import make_blob, make_key
from nencache.tiers.redis.tier import RedisTier
tier = RedisTier(sys.argv[1], sys.argv[2])
tier.put([(make_key(i), make_blob(make_key(i), tokens=300, seed=i)) for i in range(12)])
assert tier.stats().stored_chunks == 12 and tier.is_up, tier.stats()
tier.close()
"""


@pytest.mark.parametrize("where", ["redis_server", "redis_cluster"])
def test_chunks_put_by_another_process_read_bit_exact(request, where: str) -> None:
    url = request.getfixturevalue(where).url
    ns = uuid.uuid4().hex
    subprocess.run([sys.executable, "-c", _WRITER, url, ns, str(Path(__file__).parents[2])], check=True, timeout=120)
    t = RedisTier(url, ns)
    try:
        got = t.get([make_key(i) for i in range(12)])
        assert [bytes(g) for g in got] == [make_blob(make_key(i), tokens=300, seed=i) for i in range(12)]
    finally:
        t.clear()
        t.close()


def test_ttl_is_honoured(redis_server: RedisServer) -> None:
    t = RedisTier(redis_server.url, "ttl", ttl=1)
    key = make_key(7)
    try:
        t.put([(key, make_blob(key))])
        with raw(redis_server.url) as conn:
            assert 0 < conn.call("PTTL", rkey("ttl", key)) <= 1000
        assert t.contains_prefix([key]) == 1
        wait_for(lambda: t.get([key]) == [None], 3.0, "the key to expire")
    finally:
        t.close()


def test_password_and_acl_user_in_url(tmp_path: Path, caplog) -> None:
    server = start_server(tmp_path, ["--requirepass", "s3cret", "--user", "alice", "on", ">p@ss", "~*", "&*", "+@all"])
    base = f"127.0.0.1:{server.port}"
    try:
        for url in (f"redis://:s3cret@{base}", f"redis://alice:p%40ss@{base}/0", f"valkey://alice:p%40ss@{base}"):
            t = RedisTier(url, "auth")
            t.put(items(2))
            assert t.contains_prefix([make_key(0), make_key(1)]) == 2, url
            assert "p@ss" not in t.url and "s3cret" not in t.url
            t.close()
        with caplog.at_level(logging.WARNING, logger="nencache.redis"):
            for url in (f"redis://:wrong@{base}", f"redis://{base}"):
                t = RedisTier(url, "auth")
                assert not t.is_up and t.get([make_key(0)]) == [None]
                t.close()
        assert "check the user and password" in caplog.text
    finally:
        server.kill()


def test_unix_socket_and_database_number(redis_server: RedisServer) -> None:
    unix = RedisTier(f"unix://{redis_server.unix}?db=2", "sock")
    tcp = RedisTier(f"redis://127.0.0.1:{redis_server.port}/2", "sock")
    db0 = RedisTier(f"redis://127.0.0.1:{redis_server.port}", "sock")
    try:
        unix.put(items(3))
        assert bytes(tcp.get([make_key(2)])[0]) == items(3)[2][1]
        assert db0.contains_prefix([make_key(0)]) == 0
    finally:
        unix.clear()
        for t in (unix, tcp, db0):
            t.close()


def test_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    try:
        server = start_server(tmp_path / "tls", tls=(cert, key))
    except RuntimeError as exc:
        pytest.skip(f"this redis-server was built without TLS: {exc}")
    try:
        t = RedisTier(f"rediss://127.0.0.1:{server.port}?ssl_ca_certs={cert}", "tls")
        data = items(3, tokens=200)
        t.put(data)
        assert [bytes(g) for g in t.get([k for k, _ in data])] == [b for _, b in data]
        t.close()
        untrusted = RedisTier(f"rediss://127.0.0.1:{server.port}", "tls")  # system CAs do not know our cert
        assert not untrusted.is_up
        untrusted.close()
    finally:
        server.kill()


# -- misuse and parsing (no server needed) -----------------------------------------------------------

def test_misuse_raises_clear_errors() -> None:
    t = RedisTier(f"redis://127.0.0.1:{free_port()}", "x")
    with pytest.raises(TierError, match="must be bytes"):
        t.get(["not-bytes"])  # type: ignore[list-item]
    t.close()
    with pytest.raises(ClosedError):
        t.get([make_key(1)])
    with pytest.raises(ConfigError, match="timeout"):
        RedisTier("redis://127.0.0.1:1", "x", timeout=0)
    with pytest.raises(ConfigError, match="TTL"):
        RedisTier("redis://127.0.0.1:1", "x", ttl=-1)


@pytest.mark.parametrize("url,nodes,cluster,user,password,db,tls", [
    ("redis://localhost", (("localhost", 6379),), False, None, None, 0, False),
    ("redis://u:p%3Aw@h:7000/3", (("h", 7000),), False, "u", "p:w", 3, False),
    ("rediss://:pw@h", (("h", 6379),), False, None, "pw", 0, True),
    ("valkey://[::1]:6380", (("::1", 6380),), False, None, None, 0, False),
    ("unix://:pw@/run/redis.sock?db=1", ("/run/redis.sock",), False, None, "pw", 1, False),
    ("redis-cluster://a:1,b:2,c:3", (("a", 1), ("b", 2), ("c", 3)), True, None, None, 0, False),
    ("rediss-cluster://u:p@a:1?ssl_cert_reqs=none", (("a", 1),), True, "u", "p", 0, True),
])
def test_parse_url(url, nodes, cluster, user, password, db, tls) -> None:
    target = parse_url(url)
    assert (target.nodes, target.cluster, target.username, target.password, target.db) == (nodes, cluster, user, password, db)
    assert (target.tls is not None) == tls
    assert password is None or password not in target.display()


@pytest.mark.parametrize("url,message", [
    ("http://h", "unsupported Redis URL"),
    ("redis://h:notaport", "bad port"),
    ("redis://a:1,b:2", "redis-cluster://"),
    ("redis-cluster://a:1/2", "only database 0"),
    ("redis://h?colour=red", "unknown Redis URL option"),
    ("redis://h?ssl_ca_certs=/x", "need a TLS URL"),
    ("unix://relative.sock", "absolute socket path"),
    ("redis://h/x", "must be a number"),
])
def test_parse_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_url(url)
