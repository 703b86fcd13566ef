"""`RedisClient`: the bulk data path of the Redis tier: keyed commands routed to servers and run as pipelines.

Standalone: every key goes to the one server. Cluster: keys are spread over hash slots (no shared hash
tag, so chunks use every node's memory); commands are grouped per node and each node gets one
pipeline, all nodes written before any reply is read. The slot -> node table, health checks and every
control command come from redis-py (`RedisClient.control`, see `nencache.tiers.redis.control`); only
the pipelines themselves run on the hand-written RESP client. Failures surface as `OSError` or
`ReplyError`; the caller decides what they mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from nencache.tiers.redis.control import RedisControl, key_slot
from nencache.tiers.redis.url import Address, RedisTarget
from nencache.tiers.redis.resp import Arg, Command, Connection, ConnectionPool, Reply

Into = Callable[[list[int]], "memoryview | None"]
WINDOW_BYTES = 4 << 20  # bytes of replies outstanding per server in a windowed exchange


@dataclass(slots=True)
class Plan:
    """Commands per server; for each command, the positions of the keys it carries."""

    commands: dict[Address, list[Command]] = field(default_factory=dict)
    positions: dict[Address, list[list[int]]] = field(default_factory=dict)

    def add(self, address: Address, command: Command, positions: list[int]) -> None:
        self.commands.setdefault(address, []).append(command)
        self.positions.setdefault(address, []).append(positions)


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
    """Bulk pipelines for one `RedisTarget`; `control` (redis-py) owns its topology and control commands."""

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        self.target = target
        self.control = RedisControl(target, timeout)
        self._pool = ConnectionPool(target, timeout)
        self._slots: list[Address | None] = []
        self._stale = target.cluster
        self._value_size = 0  # size of recent large values, to size fetch windows

    def plan(self, keys: Sequence[bytes], verb: str, args: Sequence[tuple[Arg, ...]] | None = None) -> Plan:
        """One `verb` per key (with `args[i]` after key i), grouped by the server that holds each key."""
        if self.target.cluster:
            if self._stale:
                self.refresh()
            groups: dict[Address, list[int]] = {}
            for pos, key in enumerate(keys):
                owner = self._slots[key_slot(key)]
                if owner is None:
                    raise ConnectionError(f"no Redis Cluster node serves slot {key_slot(key)}")
                groups.setdefault(owner, []).append(pos)
        else:
            groups = {self.target.nodes[0]: list(range(len(keys)))}
        plan = Plan()
        for address, positions in groups.items():
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

    def check(self) -> None:
        """Return if every server answers (a cluster: topology reloaded, every slot served, state ok); else raise."""
        self.control.check()
        if self.target.cluster:
            self._slots, self._stale = self.control.slot_owners(), False

    def refresh(self) -> None:
        """Reload the slot table from redis-py's view of the cluster."""
        self.control.refresh()
        self._slots, self._stale = self.control.slot_owners(), False

    def mark_stale(self) -> None:
        """Reload the slot table before the next command (after a MOVED/ASK reply)."""
        self._stale = self.target.cluster

    def reset(self) -> None:
        """Drop every connection, bulk and control (after a failure; the next command reconnects)."""
        self._pool.reset()
        self.control.reset()

    def _window(self) -> int:
        return max(2, WINDOW_BYTES // self._value_size) if self._value_size else 4

