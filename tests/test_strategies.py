"""The routing strategies: pure functions from candidates to the order in which they are offered."""

from __future__ import annotations

import random

import pytest

from helpline.routing.strategies import (
    Candidate,
    fewestchats,
    leastrecent,
    offers_per_round,
    order,
    ringall,
    roundrobin,
    shuffled,
)

STRATEGIES = ("ringall", "leastrecent", "fewestchats", "roundrobin", "random")


def cand(uid: int, active: int = 0, last_assigned_at: float = 0.0, last_offer_at: float = 0.0) -> Candidate:
    return Candidate(uid, active, last_assigned_at, last_offer_at)


def ids(cands: list[Candidate]) -> list[int]:
    return [c.counselor_id for c in cands]


# A pool given out of id order, with distinct loads and histories.
POOL = (
    cand(7, active=2, last_assigned_at=300.0, last_offer_at=310.0),
    cand(3, active=0, last_assigned_at=100.0, last_offer_at=400.0),
    cand(5, active=1, last_assigned_at=50.0, last_offer_at=60.0),
    cand(1, active=0, last_assigned_at=200.0, last_offer_at=0.0),
)


def test_ringall_offers_everyone_in_a_stable_id_order() -> None:
    assert ids(ringall(POOL)) == [1, 3, 5, 7]
    assert ids(ringall(list(reversed(POOL)))) == [1, 3, 5, 7]


def test_leastrecent_puts_who_waited_longest_since_their_last_conversation_first() -> None:
    assert ids(leastrecent(POOL)) == [5, 3, 1, 7]


def test_leastrecent_breaks_ties_by_id_and_ignores_load_and_offers() -> None:
    tied = [cand(9, active=0, last_offer_at=1.0), cand(2, active=2, last_offer_at=99.0), cand(4)]
    assert ids(leastrecent(tied)) == [2, 4, 9]


def test_fewestchats_puts_the_least_loaded_first() -> None:
    assert ids(fewestchats(POOL)) == [3, 1, 5, 7]


def test_fewestchats_breaks_ties_by_least_recent_then_id() -> None:
    tied = [
        cand(8, active=1, last_assigned_at=10.0),
        cand(6, active=1, last_assigned_at=5.0),
        cand(4, active=1, last_assigned_at=10.0),
        cand(2, active=3, last_assigned_at=0.0),
    ]
    assert ids(fewestchats(tied)) == [6, 4, 8, 2]


def test_roundrobin_without_a_remembered_position_starts_at_the_lowest_id() -> None:
    assert ids(roundrobin(POOL, None)) == [1, 3, 5, 7]


@pytest.mark.parametrize(
    ("last", "expected"),
    [
        (1, [3, 5, 7, 1]),
        (3, [5, 7, 1, 3]),
        (5, [7, 1, 3, 5]),
        (7, [1, 3, 5, 7]),
        # The remembered counselor left the pool: continue after where they stood.
        (4, [5, 7, 1, 3]),
        (0, [1, 3, 5, 7]),
        (99, [1, 3, 5, 7]),
    ],
)
def test_roundrobin_continues_after_the_remembered_position_and_wraps(last: int, expected: list[int]) -> None:
    assert ids(roundrobin(POOL, last)) == expected


def test_roundrobin_fed_its_own_choice_visits_everyone_in_turn() -> None:
    last: int | None = None
    visited = []
    for _ in range(9):
        first = roundrobin(POOL, last)[0]
        visited.append(first.counselor_id)
        last = first.counselor_id
    assert visited == [1, 3, 5, 7, 1, 3, 5, 7, 1]


def test_random_with_a_seeded_rng_is_a_reproducible_permutation() -> None:
    a = shuffled(POOL, random.Random(1234))
    b = shuffled(POOL, random.Random(1234))
    assert a == b
    assert sorted(ids(a)) == [1, 3, 5, 7]
    expected = list(POOL)
    random.Random(1234).shuffle(expected)
    assert a == expected


def test_random_spreads_the_first_choice_over_everyone() -> None:
    rng = random.Random(7)
    firsts = {shuffled(POOL, rng)[0].counselor_id for _ in range(200)}
    assert firsts == {1, 3, 5, 7}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_do_not_touch_their_input_and_keep_every_candidate(strategy: str) -> None:
    pool = list(POOL)
    out = order(strategy, pool, last=3, rng=random.Random(0))
    assert pool == list(POOL)
    assert out is not pool
    assert sorted(ids(out)) == [1, 3, 5, 7]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_accept_an_empty_pool(strategy: str) -> None:
    assert order(strategy, [], rng=random.Random(0)) == []
    assert offers_per_round(strategy, []) == 0


def test_order_dispatches_to_each_strategy() -> None:
    assert order("ringall", POOL) == ringall(POOL)
    assert order("leastrecent", POOL) == leastrecent(POOL)
    assert order("fewestchats", POOL) == fewestchats(POOL)
    assert order("roundrobin", POOL) == roundrobin(POOL, None)
    assert order("roundrobin", POOL, last=5) == roundrobin(POOL, 5)
    assert order("random", POOL, rng=random.Random(42)) == shuffled(POOL, random.Random(42))


def test_order_random_without_an_rng_still_gives_a_permutation() -> None:
    assert sorted(ids(order("random", POOL))) == [1, 3, 5, 7]


def test_order_rejects_an_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'broadcast'"):
        order("broadcast", POOL)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ringall_offers_to_every_candidate_in_one_round(n: int) -> None:
    assert offers_per_round("ringall", POOL[:n]) == n


@pytest.mark.parametrize("strategy", ["leastrecent", "fewestchats", "roundrobin", "random"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_other_strategies_offer_to_one_candidate_per_round(strategy: str, n: int) -> None:
    assert offers_per_round(strategy, POOL[:n]) == 1
