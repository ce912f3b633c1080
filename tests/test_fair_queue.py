"""The per-model queue takes users in turn: the order itself, without a host."""

from __future__ import annotations

import asyncio

import pytest

from llm_nb.errors import QueueFull
from llm_nb.host.scheduler import CALLER, ModelQueue


async def _run(queue: ModelQueue, arrivals: list[tuple[str | None, str]], cancel: set[str] = frozenset()) -> list[str]:
    """One request holds the only slot; ``arrivals`` queue up behind it in this order; then it ends."""
    order: list[str] = []
    release = asyncio.Event()

    async def request(user: str | None, tag: str, hold: bool = False) -> None:
        async with queue.slot(user):
            order.append(tag)
            if hold:
                await release.wait()

    first = asyncio.create_task(request("alice", "first", hold=True))
    await asyncio.sleep(0)
    tasks = {}
    for user, tag in arrivals:
        tasks[tag] = asyncio.create_task(request(user, tag))
        await asyncio.sleep(0)
    for tag in cancel:
        tasks.pop(tag).cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *tasks.values())
    assert queue.running == 0 and queue.waiting == 0
    return order[1:]


def test_a_free_slot_goes_to_the_waiting_user_served_least_recently():
    arrivals = [("alice", f"a{i}") for i in range(1, 6)] + [("bob", "b1"), ("bob", "b2"), ("carol", "c1")]
    order = asyncio.run(_run(ModelQueue("m", slots=1, max_waiting=100), arrivals))
    # bob and carol were never served: they go before alice's second; then users take turns.
    assert order == ["b1", "c1", "a1", "b2", "a2", "a3", "a4", "a5"]


def test_without_users_the_order_is_first_come_first_served():
    arrivals = [(None, f"r{i}") for i in range(6)]
    order = asyncio.run(_run(ModelQueue("m", slots=1, max_waiting=100), [(None, "x"), *arrivals]))
    assert order == ["x", *(f"r{i}" for i in range(6))]


def test_a_waiter_cancelled_in_the_queue_takes_no_slot_and_others_go_on():
    arrivals = [("bob", "b1"), ("carol", "c1"), ("alice", "a1")]
    order = asyncio.run(_run(ModelQueue("m", slots=1, max_waiting=100), arrivals, cancel={"c1"}))
    assert order == ["b1", "a1"]


def test_the_caller_of_the_request_is_the_default_user():
    async def scenario() -> list[str]:
        queue = ModelQueue("m", slots=1, max_waiting=100)
        order: list[str] = []
        release = asyncio.Event()

        async def request(user: str, tag: str, hold: bool = False) -> None:
            CALLER.set(user)  # what the auth middleware does for each request
            async with queue.slot():
                order.append(tag)
                if hold:
                    await release.wait()

        tasks = [asyncio.create_task(request("alice", "a0", hold=True))]
        await asyncio.sleep(0)
        for user, tag in [("alice", "a1"), ("alice", "a2"), ("bob", "b1")]:
            tasks.append(asyncio.create_task(request(user, tag)))
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["a0", "b1", "a1", "a2"]


def test_a_full_queue_is_still_refused_at_once():
    async def scenario() -> None:
        queue = ModelQueue("m", slots=1, max_waiting=1)
        release = asyncio.Event()

        async def hold(user: str) -> None:
            async with queue.slot(user):
                await release.wait()

        tasks = [asyncio.create_task(hold("alice")), asyncio.create_task(hold("bob"))]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            async with queue.slot("carol"):
                pass
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
