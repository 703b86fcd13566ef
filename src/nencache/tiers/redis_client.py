"""`RedisClient`: routes keyed commands to the servers of one Redis deployment and runs them as pipelines.

Standalone: every key goes to the one server. Cluster: keys are spread over hash slots (no shared hash
tag, so chunks use every node's memory); commands are grouped per node and each node gets one
pipeline, all nodes written before any reply is read. Failures surface as `OSError` or `ReplyError`;
the caller decides what they mean.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from nencache.tiers.redis_url import Address, RedisTarget
from nencache.tiers.resp import Arg, Command, Connection, ConnectionPool, ProtocolError, Reply, ReplyError

Into = Callable[[list[int]], "memoryview | None"]
SLOTS = 16384
WINDOW_BYTES = 4 << 20  # bytes of replies outstanding per server in a windowed exchange


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of `key` (CRC16/XMODEM, honouring `{hash tags}`)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key, 0) % SLOTS


@dataclass(slots=True)
class Plan:
    """Commands per server; for each command, the positions of the keys it carries."""

    commands: dict[Address, list[Command]] = field(default_factory=dict)
    positions: dict[Address, list[list[int]]] = field(default_factory=dict)

    def add(self, address: Address, command: Command, positions: list[int]) -> None:
        self.commands.setdefault(address, []).append(command)
        self.positions.setdefault(address, []).append(positions)

    def extend(self, other: Plan, offset: int) -> None:
        """Add `other`'s commands too (one round trip for both), its positions shifted by `offset`."""
        for address, commands in other.commands.items():
            for command, positions in zip(commands, other.positions[address]):
                self.add(address, command, [p + offset for p in positions])


@dataclass(slots=True)
class _Exchange:
    """One server's part of a `Plan` in progress: how many commands were sent and answered."""

    conn: Connection
    commands: list[Command]
    positions: list[list[int]]
    sent: int = 0
    done: int = 0

    @property
    def pending(self) -> int:
        return len(self.commands) - self.done

    def send(self, count: int) -> None:
        count = min(count, len(self.commands) - self.sent)
        if count > 0:
            self.conn.send(self.commands[self.sent:self.sent + count])
            self.sent += count

    def read(self, into: Into | None = None) -> tuple[list[int], Reply]:
        positions = self.positions[self.done]
        self.conn.into = into(positions) if into is not None else None
        try:
            reply = self.conn.read_reply()
        finally:
            self.conn.into = None
        self.done += 1
        return positions, reply


class RedisClient:
    """Connections, cluster slot table and pipelined exchanges for one `RedisTarget`."""

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        self.target = target
        self._pool = ConnectionPool(target, timeout)
        self._slots: list[Address | None] = []
        self._stale = target.cluster
        self._value_size = 0  # size of recent large values, to size fetch windows

    def plan(self, keys: Sequence[bytes], verb: str, per_slot: bool = False,
             args: Sequence[tuple[Arg, ...]] | None = None) -> Plan:
        """One `verb` per slot group (multi-key verbs: MGET, UNLINK) or per key (with `args[i]` after key i)."""
        if self.target.cluster:
            if self._stale:
                self.refresh()
            groups: dict[tuple[Address, int], list[int]] = {}
            for pos, key in enumerate(keys):
                slot = key_slot(key)
                owner = self._slots[slot]
                if owner is None:
                    raise ConnectionError(f"no Redis Cluster node serves slot {slot}")
                groups.setdefault((owner, slot), []).append(pos)
        else:
            groups = {(self.target.nodes[0], 0): list(range(len(keys)))}
        plan = Plan()
        for (address, _), positions in groups.items():
            if per_slot:
                plan.add(address, (verb, *(keys[p] for p in positions)), positions)
            else:
                for pos in positions:
                    plan.add(address, (verb, keys[pos], *(args[pos] if args else ())), [pos])
        return plan

    def run(self, plan: Plan) -> list[tuple[list[int], Reply]]:
        """Send each server its whole pipeline, then read every reply: one round trip."""
        return list(self.exchange(plan, window=False))

    def exchange(self, plan: Plan, window: bool, into: Into | None = None) -> Iterator[tuple[list[int], Reply]]:
        """Pipelined exchange with every server of `plan`; (positions, reply) pairs yielded as they arrive.

        `into(positions)` may name the buffer a command's bulk reply is read into (used when its length
        matches); the reply is then that very buffer.

        With `window`, each server has only about `WINDOW_BYTES` of replies outstanding (sized from the
        values seen so far): Redis then streams large values from warm buffers instead of first building
        one huge reply (measured 2-3x faster for multi-MiB chunks than MGET), and the caller checks each
        value while the next is on its way.
        """
        runs: list[_Exchange] = []
        finished = False
        try:
            for address, commands in plan.commands.items():
                run = _Exchange(self._pool.acquire(address), commands, plan.positions[address])
                runs.append(run)
                run.send(self._window() if window else len(commands))
            while any(r.pending for r in runs):
                for run in runs:
                    if not run.pending:
                        continue
                    positions, reply = run.read(into)
                    if window:
                        if isinstance(reply, memoryview) and len(reply) >= WINDOW_BYTES // 64:
                            self._value_size = len(reply)
                        run.send(self._window() - (run.sent - run.done))
                    yield positions, reply
            finished = True
        finally:
            for run in runs:
                if finished:
                    self._pool.release(run.conn)
                else:
                    run.conn.close()

    def call(self, address: Address, *args: Arg) -> Reply:
        """One command to one server; raise `ReplyError` for an error reply."""
        plan = Plan()
        plan.add(address, args, [])
        [(_, reply)] = self.run(plan)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def servers(self) -> list[Address]:
        """The standalone server, or every cluster master in the slot table."""
        if not self.target.cluster:
            return [self.target.nodes[0]]
        return list(dict.fromkeys(s for s in self._slots if s is not None))

    def check(self) -> None:
        """Return if every server answers (cluster: slot table reloaded, cluster_state:ok everywhere); else raise."""
        if self.target.cluster:
            self.refresh()
            if None in self._slots:
                raise ConnectionError("the cluster does not cover every hash slot")
        plan = Plan()
        for address in self.servers():
            plan.add(address, ("CLUSTER", "INFO") if self.target.cluster else ("PING",), [])
        for _, reply in self.run(plan):
            if isinstance(reply, ReplyError):
                raise reply
            if self.target.cluster and b"cluster_state:ok" not in bytes(reply):  # type: ignore[arg-type]
                raise ConnectionError("a cluster node reports a cluster_state other than ok")

    def refresh(self) -> None:
        """Reload the slot table (CLUSTER SLOTS) from the first node that answers."""
        problem: BaseException = ConnectionError("no cluster node given")
        for address in dict.fromkeys([*self.servers(), *self.target.nodes]):
            try:
                table = _slot_table(self.call(address, "CLUSTER", "SLOTS"), address)
            except (OSError, ReplyError) as exc:
                problem = exc
                continue
            self._slots, self._stale = table, False
            return
        raise problem

    def mark_stale(self) -> None:
        """Reload the slot table before the next command (after a MOVED/ASK reply)."""
        self._stale = self.target.cluster

    def reset(self) -> None:
        """Drop every connection (after a failure; the next command reconnects)."""
        self._pool.reset()

    def _window(self) -> int:
        return max(2, WINDOW_BYTES // self._value_size) if self._value_size else 4


def _slot_table(reply: Reply, asked: Address) -> list[Address | None]:
    """Turn a CLUSTER SLOTS reply into a slot -> master address table."""
    if not isinstance(reply, list) or not reply:
        raise ProtocolError("empty CLUSTER SLOTS reply (is cluster_state ok?)")
    table: list[Address | None] = [None] * SLOTS
    entry: Any
    for entry in reply:
        try:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = bytes(master[0]).decode() or (asked[0] if isinstance(asked, tuple) else "127.0.0.1")
            address: Address = (host, int(master[1]))
        except (TypeError, ValueError, IndexError, UnicodeDecodeError):
            raise ProtocolError(f"unexpected CLUSTER SLOTS entry {entry!r:.80}") from None
        if not 0 <= start <= end < SLOTS:
            raise ProtocolError(f"bad slot range {start}-{end} in CLUSTER SLOTS")
        table[start:end + 1] = [address] * (end - start + 1)
    return table
