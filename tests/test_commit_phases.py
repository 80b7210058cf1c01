"""The phases of a server transaction: the transition table alone, without sockets (the whole
commit path runs over real sockets in test_server.py and the conformance suites)."""

from __future__ import annotations

import itertools

import pytest

from ZEO.server.commit import (
    LOCKED_PHASES,
    TRANSITIONS,
    IllegalTransition,
    ServerTransaction,
    TxnPhase,
)

P = TxnPhase


def txn_in(phase: TxnPhase) -> ServerTransaction:
    t = ServerTransaction(1, b"", b"", {}, None, " ")
    t.phase = phase  # set directly: the table is under test
    return t


@pytest.mark.parametrize("start,end", list(itertools.product(P, P)),
                         ids=lambda p: p.value)
def test_only_the_table_s_transitions_are_allowed(start, end):
    t = txn_in(start)
    if end in TRANSITIONS[start]:
        t.move_to(end)
        assert t.phase is end
    else:
        with pytest.raises(IllegalTransition, match=f"{start.value} -> {end.value}"):
            t.move_to(end)
        assert t.phase is start


@pytest.mark.parametrize("path", [
    # commit
    [P.WAITING, P.VOTING, P.VOTED, P.FINISHING, P.ENDED],
    # abort after a successful vote
    [P.WAITING, P.VOTING, P.VOTED, P.ABORTING, P.ENDED],
    # a vote that failed (a conflict): ended at once
    [P.WAITING, P.VOTING, P.ENDED],
    # client-conflict-resolution: conflicts handed back, stores added, voted again
    [P.WAITING, P.VOTING, P.OPEN, P.WAITING, P.VOTING, P.VOTED, P.FINISHING, P.ENDED],
    # aborted before its vote, or while waiting for the lock
    [P.ENDED],
    [P.WAITING, P.ENDED],
], ids=["commit", "abort-voted", "failed-vote", "revote", "abort-open", "abort-waiting"])
def test_lifecycles(path):
    t = ServerTransaction(1, b"", b"", {}, None, " ")
    assert t.phase is P.OPEN
    for phase in path:
        t.move_to(phase)
        assert t.holds_lock == (phase in LOCKED_PHASES)
    assert t.phase is P.ENDED


def test_the_table_covers_every_phase_and_ended_is_final():
    assert set(TRANSITIONS) == set(P)
    assert TRANSITIONS[P.ENDED] == frozenset()
    # Once the storage has voted, only its finish or its abort can follow.
    assert TRANSITIONS[P.VOTED] == {P.FINISHING, P.ABORTING}
    assert LOCKED_PHASES == {P.VOTING, P.VOTED, P.FINISHING, P.ABORTING}
