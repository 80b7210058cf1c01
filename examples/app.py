"""A small ZODB application on a ZEO server: a shared guest book.

Usage: ``python app.py ADDRESS [MESSAGE...]``, where ADDRESS is ``host:port`` or a Unix socket
path.  Each run signs the book with MESSAGE (if given) and prints every entry.  Run it from
several machines at once: ZEO keeps their views consistent, and conflicting writes are retried.
"""

from __future__ import annotations

import sys
import time

import BTrees.OOBTree
import transaction
from persistent import Persistent

import ZEO


class Entry(Persistent):
    """One signature: when and what."""

    def __init__(self, message: str) -> None:
        self.when = time.time()
        self.message = message


def parse_address(text: str):
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1", int(port))


def sign(db, message: str) -> None:
    conn = db.open()  # joins the thread's transaction manager
    try:
        # attempts() retries the block when another client's commit conflicts with ours.
        for attempt in transaction.manager.attempts():
            with attempt:
                root = conn.root()
                if "guestbook" not in root:
                    root["guestbook"] = BTrees.OOBTree.OOBTree()
                book = root["guestbook"]
                book[len(book)] = Entry(message)
    finally:
        conn.close()


def entries(db) -> list[str]:
    with db.transaction() as conn:
        book = conn.root().get("guestbook", {})
        return [book[k].message for k in sorted(book)]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    db = ZEO.DB(parse_address(argv[0]), wait_timeout=30, client_label="guestbook-example")
    try:
        if len(argv) > 1:
            sign(db, " ".join(argv[1:]))
        for i, message in enumerate(entries(db), 1):
            print(f"{i}. {message}")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
