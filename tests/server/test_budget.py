"""`FairBudget`: caps per connection and per client address, round-robin grants, timeouts, closed connections."""

from __future__ import annotations

import asyncio

import pytest

from nencache.server.budget import FairBudget, Holder


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_one_client_address_cannot_take_more_than_its_share() -> None:
    async def main() -> None:
        budget = FairBudget(total=8, per_client=4, per_connection=4)
        hog = [Holder(object(), "10.0.0.2") for _ in range(3)]
        assert await budget.take(hog[0], 4)
        assert not await budget.take(hog[1], 4, timeout=0.05)  # its address already holds its share
        good = Holder(object(), "10.0.0.1")
        assert await budget.take(good, 4, timeout=0.05)  # another address is served at once
        assert budget.free == 0 and budget.held_by("10.0.0.2") == 4

    run(main())


def test_a_connection_holds_at_most_its_cap_and_waiters_are_served_in_turn() -> None:
    async def main() -> None:
        budget = FairBudget(total=4, per_client=4, per_connection=2)
        first, second = Holder(object(), "z"), Holder(object(), "z")
        assert await budget.take(first, 2) and await budget.take(second, 2)
        assert not await budget.take(first, 1, timeout=0.01)  # its cap, whatever is free
        a, b = Holder(object(), "x"), Holder(object(), "y")
        order: list[str] = []

        async def want(holder: Holder, name: str) -> None:
            await budget.take(holder, 1)
            order.append(name)

        waiting = [asyncio.create_task(want(a, "a1")), asyncio.create_task(want(a, "a2"))]
        await asyncio.sleep(0.01)
        waiting.append(asyncio.create_task(want(b, "b1")))  # asks after both of a's requests
        await asyncio.sleep(0.01)
        budget.give(first, 2)
        await asyncio.sleep(0.01)
        assert order == ["a1", "b1"]  # in turn by connection, not in arrival order
        budget.give(second, 2)
        for task in waiting:
            await task
        assert order == ["a1", "b1", "a2"]

    run(main())


def test_a_closed_connection_stops_waiting_and_frees_nothing_it_did_not_hold() -> None:
    async def main() -> None:
        budget = FairBudget(total=2, per_client=2, per_connection=2)
        holder, other = Holder(object(), "x"), Holder(object(), "y")
        assert await budget.take(holder, 2)
        waiter = asyncio.create_task(budget.take(other, 2))
        await asyncio.sleep(0.01)
        budget.forget(other.connection)
        with pytest.raises(ConnectionAbortedError):
            await waiter
        budget.give(holder, 2)
        assert budget.free == 2

    run(main())
