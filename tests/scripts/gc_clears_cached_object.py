"""The cyclic garbage collector empties a persistent object that ZODB still hands out.

No code of zeo-ng is involved: only ``persistent``, ZODB and CPython (and ZEO's ClientStorage
with ``--zeo``, from whichever ZEO is installed).  What it shows:

1. A ghost is held by the connection's pickle cache with a reference that does not count, so
   when the only counted references to it come from cyclic garbage (say, an exception whose
   traceback holds the frame of a function that had the object in a local), the collector
   puts it in its unreachable set.
2. While the collector clears that set, Python code can run: here a weakref callback of an
   object freed by the clearing (``--thread``: another thread, which takes the GIL when a freed
   ``epoll`` object closes its file).  Asking the connection for the object then returns it
   from the cache; loading it makes it up to date.
3. The collector goes on and clears the object: its ``__dict__`` is emptied, its state stays
   "up to date".  The application finds its root without its data: ``KeyError: '_container'``
   for a PersistentMapping.

    python gc_clears_cached_object.py [--zeo] [--thread]

Exit status 1 and "REPRODUCED" when the object ended up up to date with an empty __dict__.
"""

import gc
import select
import sys
import threading

import ZODB
from persistent.mapping import PersistentMapping
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import z64


def open_database():
    if "--zeo" in sys.argv:
        import tempfile

        import ZEO

        addr, stop = ZEO.server(path=tempfile.mkdtemp() + "/Data.fs")
        with ZEO.DB(addr).transaction() as c:  # another client writes: ours starts cold
            c.root()["data"] = 42
            c.root()["other"] = PersistentMapping()
        db = ZEO.DB(addr)
        print("storage:", type(db.storage).__module__, "from", ZEO.__file__)
        return db, db.open(), None
    db = ZODB.DB(MappingStorage())
    with db.transaction() as c:
        c.root()["data"] = 42
        c.root()["other"] = PersistentMapping()
    busy = db.open()  # keeps the pooled connection: the next one starts with an empty cache
    return db, db.open(), busy


class Holder:
    pass


def main() -> int:
    db, conn, _busy = open_database()
    seen = {}

    def use_the_root(*_args):
        root = conn.get(z64)  # the cache still maps oid 0 to the object being collected
        root._p_activate()
        seen["loaded"] = sorted(root.__dict__)
        root["other"]._p_activate()  # another load
        seen["root"] = root

    gc.disable()
    holder = Holder()
    holder.cycle = holder  # cyclic garbage
    if "--thread" in sys.argv:
        holder.freed = select.epoll()  # closing it lets go of the GIL
    else:
        # not tracked by the collector, so it is freed *while* the holder is cleared and its
        # weakref callback runs then, not in the collector's earlier callback phase
        holder.freed = compile("0", "<freed while the collector clears>", "eval")
    root = conn.get(z64)  # allocated after the holder, so cleared after it
    root._p_activate()
    root._p_deactivate()  # a ghost: the cache's reference does not count, the holder's does
    holder.root = root
    del root

    if "--thread" in sys.argv:
        collecting = threading.Event()
        gc.callbacks.append(lambda phase, info: phase == "start" and collecting.set())

        def other_thread():
            while not collecting.is_set():  # runnable: takes the GIL when the collector lets go
                pass
            use_the_root()

        thread = threading.Thread(target=other_thread)
        thread.start()
        del holder
        gc.collect()
        thread.join()
    else:
        import weakref

        callback_ref = weakref.ref(holder.freed, use_the_root)  # noqa: F841 (kept alive)
        del holder
        gc.collect()

    root = seen.pop("root")
    print("right after loading it:", seen["loaded"])
    print("after the collection: state", root._p_state, "(0: up to date), __dict__ keys",
          sorted(root.__dict__))
    db.close()
    if root._p_state == 0 and not root.__dict__:
        print("REPRODUCED")
        return 1
    print("not reproduced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
