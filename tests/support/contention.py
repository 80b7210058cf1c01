"""Concurrent writers bumping one ``BTrees.Length``: resolvable conflicts under load."""

from __future__ import annotations

import threading

import transaction
from ZODB.POSException import ConflictError


def bump_lengths(dbs: list, key: str, times: int, attempts: int = 50) -> list[str]:
    """One thread per entry of ``dbs`` (a ``ZODB.DB`` each, repeats allowed) adds 1 to
    ``root[key]`` ``times`` times, retrying each ConflictError up to ``attempts`` times.
    Returns what went wrong (empty: every increment committed)."""
    errors: list[str] = []

    def bump(db) -> None:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            for _ in range(times):
                for _attempt in range(attempts):
                    try:
                        tm.begin()
                        conn.root()[key].change(1)
                        tm.commit()
                        break
                    except ConflictError:
                        tm.abort()
                else:
                    errors.append(f"gave up after {attempts} conflicts")
        except Exception as e:
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=bump, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
