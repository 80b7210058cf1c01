"""The commit lock alone: FIFO, granted by callback in the releasing call, no nesting."""

from __future__ import annotations

from ZEO.server.commit import CommitLock, ServerTransaction


def txn(n: int) -> ServerTransaction:
    return ServerTransaction(n, b"", b"", {}, None, " ")


def test_a_free_lock_is_granted_at_once_and_others_queue_in_order():
    lock = CommitLock()
    granted: list[int] = []
    a, b, c = txn(1), txn(2), txn(3)
    assert lock.acquire(a, lambda t: granted.append(t.txn_id)) is True
    assert granted == [1] and lock.holder is a
    assert lock.acquire(b, lambda t: granted.append(t.txn_id)) is False
    assert lock.acquire(c, lambda t: granted.append(t.txn_id)) is False
    assert lock.waiting == 2
    lock.release(a)
    assert granted == [1, 2] and lock.holder is b  # granted inside release(), not later
    lock.release(c)  # not the holder: nothing happens
    assert lock.holder is b and lock.waiting == 1
    lock.release(b)
    assert granted == [1, 2, 3] and lock.holder is c
    lock.release(c)
    assert lock.holder is None and lock.waiting == 0


def test_a_cancelled_waiter_is_never_granted():
    lock = CommitLock()
    granted: list[int] = []
    a, b, c = txn(1), txn(2), txn(3)
    for t in (a, b, c):
        lock.acquire(t, lambda t: granted.append(t.txn_id))
    lock.cancel(b)
    lock.release(a)
    assert granted == [1, 3] and lock.holder is c


def test_a_newcomer_during_a_grant_goes_behind_the_waiters():
    """While a release is granting, the lock may be free for a moment (a granted vote that
    ended at once); a vote arriving then must still queue behind the earlier waiters."""
    lock = CommitLock()
    order: list[int] = []
    a, b, c, late = txn(1), txn(2), txn(3), txn(4)
    lock.acquire(a, lambda t: order.append(1))
    queued_late: list[bool] = []

    def granted_b(t: ServerTransaction) -> None:
        order.append(2)
        lock.release(b)  # b's vote ended at once (a conflict, say)
        queued_late.append(lock.acquire(late, lambda t: order.append(4)))

    lock.acquire(b, granted_b)
    lock.acquire(c, lambda t: order.append(3))
    lock.release(a)
    assert queued_late == [False]
    assert order == [1, 2, 3] and lock.holder is c
    lock.release(c)
    assert order == [1, 2, 3, 4] and lock.holder is late


def test_a_chain_of_votes_that_end_at_once_does_not_nest():
    """Each granted vote releases at once (conflicts); the grants run in a loop in the
    outermost release, not one inside the other (5,000 would exceed the recursion limit)."""
    lock = CommitLock()
    first = txn(0)
    lock.acquire(first, lambda t: None)
    count = 0

    def release_now(t: ServerTransaction) -> None:
        nonlocal count
        count += 1
        lock.release(t)

    for n in range(1, 5001):
        lock.acquire(txn(n), release_now)
    lock.release(first)
    assert count == 5000
    assert lock.holder is None and lock.waiting == 0
