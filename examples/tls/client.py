"""Open the TLS client configuration and count visits: ``python client.py client.conf``."""

import sys

import ZODB.config


def main(path: str) -> None:
    db = ZODB.config.databaseFromFile(open(path))
    try:
        with db.transaction() as conn:
            root = conn.root()
            root["visits"] = root.get("visits", 0) + 1
            print(f"visits: {root['visits']}")
    finally:
        db.close()


if __name__ == "__main__":
    main(sys.argv[1])
