"""Micro-benchmark of the client cache: ours (``ZEO.client.cache``) or ZEO 6.2's (``ZEO.cache``).

    python3 benchmarks/cache_micro.py [--records N] [--impl ours|ref]
    .cache/zeo-ref/bin/python benchmarks/cache_micro.py --impl ref

Prints one JSON object: microseconds per operation for the hot paths, in memory and on a file,
and the seconds to reopen a file cache of N records after a clean close.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def p64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def per_op(fn, n: int) -> float:
    t = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t) / n * 1e6


def run(ClientCache, path, records: int, size: int) -> dict:
    c = ClientCache(path, size=size)
    data = bytes(100)
    oids = [p64(i) for i in range(1, records + 1)]
    t1, t2, t3 = p64(1), p64(2), p64(3)
    out = {}

    def store(n):
        for i in range(n):
            c.store(oids[i], t1, None, data)

    def load_hit(n):
        ld = c.load
        for i in range(n):
            ld(oids[i % records])

    def load_miss(n):
        ld = c.load
        for i in range(n):
            ld(p64(records + 1 + i))

    def invalidate(n):
        inv = c.invalidate
        for i in range(n):
            inv(oids[i], t2)

    def load_before_noncurrent(n):
        lb = c.loadBefore
        for i in range(n):
            lb(oids[i % records], t2)

    out["store_us"] = per_op(store, records)
    c.setLastTid(t1)
    out["load_hit_us"] = per_op(load_hit, records)
    out["load_miss_us"] = per_op(load_miss, records)
    out["invalidate_us"] = per_op(invalidate, records)
    c.setLastTid(t2)
    out["loadBefore_hit_us"] = per_op(load_before_noncurrent, records)
    for i in range(records):
        c.store(oids[i], t2, None, data)
    c.setLastTid(t3)
    c.close()
    if path is not None:
        t = time.perf_counter()
        c = ClientCache(path, size=size)
        out["reopen_s"] = time.perf_counter() - t
        out["reopened_records"] = len(c)
        c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--impl", choices=["ours", "ref"], default="ours")
    args = ap.parse_args()
    if args.impl == "ours":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "src"))
        from ZEO.client.cache import ClientCache
    else:
        from ZEO.cache import ClientCache
    size = 64 << 20
    res = {"impl": args.impl, "records": args.records}
    res["memory"] = run(ClientCache, None, args.records, size)
    with tempfile.TemporaryDirectory() as d:
        res["file"] = run(ClientCache, os.path.join(d, "c.zec"), args.records, size)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
