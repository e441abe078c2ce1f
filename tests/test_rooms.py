"""Waiting rooms, over every store: requests that cannot pass wait in the store, which
grants them in fair order as soon as budget frees (a refill, a refund, a freed slot)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pytest

from taskthrottle import Limit, RedisStore
from taskthrottle._entries import CONCURRENCY, Entry, entries
from taskthrottle._room import REOFFER_MS
from taskthrottle._store import Admission, Outcome, Rooms, Store
from taskthrottle.testing import ManualClock


class RoomStore(Store, Rooms, Protocol):
    """A store with waiting rooms: each store of the suite."""


ROOM = "llm"
TTL, GRANT, EXPIRES = 60_000, 30_000, 3_600_000
tpm = Limit.per_minute("tpm", 600, burst=10)  # 10 tokens a second, holds 10
pool = Limit.per_second("rps", 1)  # one request a second, holds one
slot = Limit.concurrency("slots", 1)


def ask(key: str | dict[str, list[Limit]], amount: float = 1, limit: Limit = tpm) -> list[Entry]:
    """The entries of a request of ``amount`` from ``limit`` under ``key``, or of one
    of each limit of a mapping."""
    if isinstance(key, dict):
        names = {lim.name for lims in key.values() for lim in lims}
        return entries(key, None, {"tpm": amount} if "tpm" in names else None)
    return entries(key, [limit], {limit.name: amount})


def join(store: RoomStore, lease_id: str, request: Sequence[Entry]) -> Outcome:
    return store.join(ROOM, lease_id, f"task-{lease_id}", request, TTL, EXPIRES)


def admit(store: RoomStore, most: int = 100) -> Admission:
    return store.admit(ROOM, most, TTL, GRANT)


def granted(store: RoomStore, most: int = 100) -> list[str]:
    return [lease_id for lease_id, _ in admit(store, most).granted]


def taken(store: RoomStore, most: int = 100) -> list[str]:
    """The tickets granted now, whose tasks take their leases up at once."""
    found = granted(store, most)
    store.admitted(ROOM, found)
    return found


def refund(store: RoomStore, lease_id: str, request: Sequence[Entry], amount: int) -> None:
    back = [e._replace(amount=-amount * 1000) for e in request if e.kind != CONCURRENCY]
    store.settle(f"{lease_id}:refund", lease_id, back, [])


def release(store: RoomStore, lease_id: str, request: Sequence[Entry]) -> None:
    freed = [e for e in request if e.kind == CONCURRENCY]
    store.settle(f"{lease_id}:r", lease_id, [], freed)


def test_a_request_that_fits_with_nobody_waiting_passes_at_once(store: RoomStore) -> None:
    """Nothing waits for its limits and it fits: granted now, no ticket left behind."""
    found = join(store, "a", ask("t", 4))
    assert found.granted and found.delay_ms == 0
    assert store.waiting(ROOM, ["a"]) == [False]
    assert admit(store) == Admission([], 0, intact=False)  # nothing ever waited


def test_a_refund_grants_the_head_of_the_room_at_once(store: RoomStore, clock: ManualClock) -> None:
    """The tokens an adjust gives back admit the waiting request with no time passing."""
    first = ask("t", 10)
    assert join(store, "a", first).granted
    found = join(store, "b", ask("t", 8))
    assert not found.granted and found.delay_ms == 800  # its own limits' wait, for the record
    assert found.violations == ((0, 800),)
    assert store.waiting(ROOM, ["b"]) == [True]
    assert granted(store) == []
    refund(store, "a", first, 8)
    assert granted(store) == ["b"]
    assert store.waiting(ROOM, ["b"]) == [False]


def test_refill_admits_in_order(store: RoomStore, clock: ManualClock) -> None:
    """Without a refund, refill admits each ticket when it fits."""
    assert join(store, "a", ask("t", 10)).granted
    assert not join(store, "b", ask("t", 5)).granted
    clock.advance(0.4)
    assert granted(store) == []
    clock.advance(0.1)
    assert granted(store) == ["b"]


def test_first_in_first_out_within_a_key(store: RoomStore, clock: ManualClock) -> None:
    """A small request behind a large one does not pass it, even where it would fit."""
    assert join(store, "a", ask("t", 10)).granted
    assert not join(store, "big", ask("t", 8)).granted
    assert not join(store, "small", ask("t", 1)).granted
    clock.advance(0.1)  # one token: enough for small, not for big
    assert granted(store) == []
    clock.advance(0.7)
    assert granted(store) == ["big"]
    clock.advance(0.1)
    assert granted(store) == ["small"]


def test_a_newcomer_waits_behind_the_room(store: RoomStore, clock: ManualClock) -> None:
    """A request that would fit now still waits while tickets wait for its limits."""
    assert join(store, "a", ask("t", 10)).granted
    assert not join(store, "big", ask("t", 8)).granted
    clock.advance(0.2)
    late = join(store, "late", ask("t", 1))
    assert not late.granted
    assert store.waiting(ROOM, ["big", "late"]) == [True, True]


def test_a_request_of_other_limits_does_not_wait_behind_the_room(store: RoomStore) -> None:
    """The room blocks only the limits its tickets wait for."""
    assert join(store, "a", ask("t", 10)).granted
    assert not join(store, "b", ask("t", 5)).granted
    assert join(store, "c", ask("u", 5)).granted


def test_flows_take_turns(store: RoomStore, clock: ManualClock) -> None:
    """Two tenants sharing a pool: whoever queued more, they are admitted in turn, and
    each in the order it queued."""
    both = {"pool": [pool]}
    assert join(store, "a0", ask({**both, "tenant:a": [tpm]})).granted
    for i in range(1, 5):
        assert not join(store, f"a{i}", ask({**both, "tenant:a": [tpm]})).granted
    for i in range(1, 3):
        assert not join(store, f"b{i}", ask({**both, "tenant:b": [tpm]})).granted
    order = []
    for _ in range(6):
        clock.advance(1)
        order += taken(store)
    assert order == ["a1", "b1", "a2", "b2", "a3", "a4"]


def test_a_large_request_is_not_starved_by_small_ones(store: RoomStore, clock: ManualClock) -> None:
    """Small requests of other tenants keep coming; the large one behind the pool still
    gets its turn, as they wait behind it."""
    assert join(store, "a", ask({"pool": [tpm]}, 10)).granted
    assert not join(store, "large", ask({"pool": [tpm], "tenant:l": [pool]}, 9)).granted
    admitted = []
    for i in range(10):
        clock.advance(0.1)
        assert not join(store, f"s{i}", ask({"pool": [tpm], f"tenant:{i}": [pool]}, 1)).granted
        admitted += granted(store)
        if admitted:
            break
    assert admitted == ["large"]


def test_a_freed_slot_admits_the_next_holder(store: RoomStore) -> None:
    """Concurrency: the release of the slot grants the waiting request, which holds it."""
    first = ask("dev", limit=slot)
    assert join(store, "a", first).granted
    assert not join(store, "b", ask("dev", limit=slot)).granted
    assert granted(store) == []
    release(store, "a", first)
    assert granted(store) == ["b"]
    assert not join(store, "c", ask("dev", limit=slot)).granted


def test_a_grant_is_redeemed_without_a_second_charge(store: RoomStore) -> None:
    """The task of a granted ticket acquires with its lease id: a replay, charging
    nothing."""
    first = ask("t", 10)
    assert join(store, "a", first).granted
    second = ask("t", 6)
    assert not join(store, "b", second).granted
    refund(store, "a", first, 10)
    assert granted(store) == ["b"]
    replay = store.acquire("b", second, 0, TTL)
    assert replay.granted and replay.replayed
    assert store.peek(ask("t", 1)) == [4000]


def test_an_unclaimed_grant_is_given_back(store: RoomStore, clock: ManualClock) -> None:
    """A grant whose task never takes it up is given back after the grant time: its
    charge refunded, its slots freed, its lease id forgotten (acquiring it charges anew)."""
    tph = Limit.per_hour("tph", 10)
    first = entries({"t": [tph], "dev": [slot]}, None, {"tph": 10})
    second = entries({"t": [tph], "dev": [slot]}, None, {"tph": 6})
    tokens, slots = entries("t", [tph], None), entries("dev", [slot], None)
    assert join(store, "a", first).granted
    assert not join(store, "b", second).granted
    refund(store, "a", first, 10)
    release(store, "a", first)
    assert granted(store) == ["b"]
    assert store.peek(tokens) == [4000]
    clock.advance(GRANT / 1000 - 0.001)
    admit(store)
    assert 4000 < store.peek(tokens)[0] < 4100
    assert store.peek(slots) == [0]
    clock.advance(0.001)
    assert admit(store).granted == []
    assert store.peek(tokens)[0] > 9999
    assert store.peek(slots) == [1000]
    again = store.acquire("b", second, 0, TTL)
    assert again.granted and not again.replayed


def test_a_taken_up_grant_is_kept(store: RoomStore, clock: ManualClock) -> None:
    """Once its task took the lease up, the grant outlives the grant time."""
    first = ask("dev", limit=slot)
    assert join(store, "a", first).granted
    assert not join(store, "b", ask("dev", limit=slot)).granted
    release(store, "a", first)
    assert granted(store) == ["b"]
    store.admitted(ROOM, ["b"])
    clock.advance(GRANT / 1000 + 1)
    admit(store)
    assert store.peek(ask("dev", limit=slot)) == [0]  # still b's


def test_a_grant_is_offered_again_until_taken(store: RoomStore, clock: ManualClock) -> None:
    """A releaser that got the grant but did not take the task: another one is offered
    it after a second."""
    first = ask("t", 10)
    assert join(store, "a", first).granted
    assert not join(store, "b", ask("t", 6)).granted
    refund(store, "a", first, 10)
    found = admit(store)
    assert found.granted == [("b", "task-b")]
    assert granted(store) == []
    clock.advance(REOFFER_MS / 1000)
    assert granted(store) == ["b"]
    store.admitted(ROOM, ["b"])
    clock.advance(REOFFER_MS / 1000)
    assert granted(store) == []


def test_joining_twice_queues_once(store: RoomStore) -> None:
    """A ticket joined again (a redelivery) keeps its place."""
    assert join(store, "a", ask("t", 10)).granted
    assert not join(store, "b", ask("t", 5)).granted
    assert not join(store, "b", ask("t", 5)).granted
    assert admit(store).waiting == 1


def test_an_expired_ticket_is_dropped(store: RoomStore, clock: ManualClock) -> None:
    """A ticket waits at most its expiry."""
    assert join(store, "a", ask("t", 10)).granted
    assert not join(store, "first", ask("t", 10)).granted  # keeps b waiting past its expiry
    assert not store.join(ROOM, "b", "task-b", ask("t", 5), TTL, 500).granted
    clock.advance(0.5)
    found = admit(store)
    assert found.granted == [] and found.waiting == 1
    assert store.waiting(ROOM, ["b"]) == [False]


def test_at_most_most(store: RoomStore, clock: ManualClock) -> None:
    """An admission grants at most what it is asked for; the rest next time."""
    assert join(store, "a", ask("t", 10)).granted
    for i in range(4):
        assert not join(store, f"w{i}", ask("t", 1)).granted
    clock.advance(1)
    assert granted(store, most=3) == ["w0", "w1", "w2"]
    assert granted(store, most=3) == ["w3"]


def test_every_key_of_a_room_expires(store: RoomStore, clock: ManualClock) -> None:
    """Tickets, grants, flows and their counts all live in keys with a TTL."""
    if not isinstance(store, RedisStore):
        pytest.skip("a MemoryStore has no keys")
    first = ask({"t": [tpm], "dev": [slot]}, 10)
    assert join(store, "a", first).granted
    assert not join(store, "b", ask({"t": [tpm], "dev": [slot]}, 5)).granted
    assert not join(store, "c", ask("t", 5)).granted
    refund(store, "a", first, 10)
    release(store, "a", first)
    assert granted(store) == ["b", "c"]
    found = list(store.client.scan_iter(match=store._codec.tag + "*"))
    assert any(b":room:" in key for key in found)
    assert {key: store.client.pttl(key) > 0 for key in found} == {key: True for key in found}


def test_a_lost_room_says_so(store: RoomStore) -> None:
    """Its state gone (a restart, a flush), an admission finds no room: the caller that
    knew tickets waited can tell they are lost."""
    if not isinstance(store, RedisStore):
        pytest.skip("a MemoryStore's rooms live as long as the store")
    assert join(store, "a", ask("t", 10)).granted
    assert not join(store, "b", ask("t", 5)).granted
    assert admit(store).intact
    store.client.delete(*store._codec.room_keys(ROOM))
    found = admit(store)
    assert not found.intact and found.waiting == 0
