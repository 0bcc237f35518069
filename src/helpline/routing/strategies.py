"""Routing strategies: pure functions from candidates to the order in which they are offered."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    counselor_id: int
    active: int  # conversations assigned plus offers pending
    last_assigned_at: float
    last_offer_at: float  # 0.0 unless the site's strategy is one of LAST_OFFER_STRATEGIES


# The strategies whose order looks at ``last_offer_at``. Only for them does hunting look it up:
# the latest of every offer each candidate was ever made, on every hunt. None of the built-in
# strategies needs it; a new one that does names itself here.
LAST_OFFER_STRATEGIES: frozenset[str] = frozenset()

# The strategies whose order the store keeps in an index, offering each conversation to one
# counselor: for them hunting asks for the first few free counselors in that order
# (routing.presence), not for every free counselor of the site with their load (1,000 counselors:
# 1,000 counts on every round). ``leastrecent``: by ``(last_assigned_at, counselor_id)``;
# ``roundrobin``: by ``counselor_id`` from after the last counselor offered, then from the lowest.
# A strategy named here must order as its function below does, and presence must know its index.
STORE_ORDERED_STRATEGIES: frozenset[str] = frozenset({"leastrecent", "roundrobin"})


def ringall(cands: Sequence[Candidate]) -> list[Candidate]:
    """Everyone at once; the first to read wins."""
    return sorted(cands, key=lambda c: c.counselor_id)


def leastrecent(cands: Sequence[Candidate]) -> list[Candidate]:
    """The counselor who has waited longest since their last conversation."""
    return sorted(cands, key=lambda c: (c.last_assigned_at, c.counselor_id))


def fewestchats(cands: Sequence[Candidate]) -> list[Candidate]:
    """The counselor with the fewest conversations in hand; ties go to the least recent."""
    return sorted(cands, key=lambda c: (c.active, c.last_assigned_at, c.counselor_id))


def roundrobin(cands: Sequence[Candidate], last: int | None) -> list[Candidate]:
    """In turn by id, starting after ``last``, the counselor offered most recently."""
    ordered = sorted(cands, key=lambda c: c.counselor_id)
    if last is None:
        return ordered
    after = [c for c in ordered if c.counselor_id > last]
    return after + [c for c in ordered if c.counselor_id <= last]


def shuffled(cands: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
    out = list(cands)
    rng.shuffle(out)
    return out


def order(
    strategy: str, cands: Sequence[Candidate], *, last: int | None = None, rng: random.Random | None = None
) -> list[Candidate]:
    if strategy == "ringall":
        return ringall(cands)
    if strategy == "leastrecent":
        return leastrecent(cands)
    if strategy == "fewestchats":
        return fewestchats(cands)
    if strategy == "roundrobin":
        return roundrobin(cands, last)
    if strategy == "random":
        return shuffled(cands, rng or random.Random())
    raise ValueError(f"unknown strategy {strategy!r}")


def offers_per_round(strategy: str, cands: Sequence[Candidate]) -> int:
    """How many candidates one round of hunting offers a conversation to."""
    return len(cands) if strategy == "ringall" else min(1, len(cands))
