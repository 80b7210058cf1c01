"""Recovery after server restarts: how long until every client commits again (issue 21).

4 client processes (benchmarks/restart_worker.py) commit in a loop on one contended list;
the server is SIGKILLed 0.5-2 s after every client has committed on it and restarted on the
same files and port, ``--restarts`` times.  Per restart: the seconds from the new server
listening until all clients committed again, and per client until its first commit and the
conflicts it retried meanwhile.  Any pair of client and server implementations can run:
``--pairs ours/ours,ref/ref,ref/ours,ours/ref`` (client/server; ``ref`` is ZEO 6.2 from
``.cache/zeo-ref``).

The run also checks what the tests assert (tests/test_restart_recovery.py): every client
recovers after every restart, nothing acknowledged is lost, the storage checks clean, and no
transaction begun on a reconnected client reads another client's counter older than one that
client had acknowledged before the restart.

    python3 benchmarks/restart.py --pairs ours/ours,ref/ref --restarts 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "restart_worker.py"

sys.path.insert(0, str(HERE))
from run import _refzeo  # noqa: E402  (builds and finds the reference venv)


def _env(ours: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if ours:
        env["PYTHONPATH"] = str(REPO / "src")
    return env


def client_side(kind: str) -> tuple[list[str], dict[str, str]]:
    """(python command, environment) of the client processes of ``kind`` ours/ref."""
    if kind == "ours":
        return [sys.executable], _env(True)
    return [str(_refzeo().ref_python())], _env(False)


def server_side(kind: str) -> tuple[list[str], dict[str, str]]:
    if kind == "ours":
        return [sys.executable, "-m", "ZEO.runzeo"], _env(True)
    return [str(_refzeo().ref_bin("runzeo"))], _env(False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``runzeo -C`` on a fixed port and files, killed and restarted by the run."""

    def __init__(self, cmd: list[str], env: dict[str, str], directory: Path) -> None:
        self.cmd, self.env, self.directory = cmd, env, directory
        self.port = _free_port()
        self.conf = directory / "zeo.conf"
        self.conf.write_text(
            f"<zeo>\n  address 127.0.0.1:{self.port}\n</zeo>\n"
            f"<blobstorage 1>\n  blob-dir {directory / 'blobs'}\n"
            f"  <filestorage>\n    path {directory / 'Data.fs'}\n  </filestorage>\n"
            "</blobstorage>\n")
        self.proc: subprocess.Popen | None = None
        self.log = open(directory / "server.log", "ab")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> float:
        """Start and return the time it listens."""
        self.proc = subprocess.Popen([*self.cmd, "-C", str(self.conf)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.directory)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return time.time()
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("server not listening")
                time.sleep(0.01)

    def kill(self) -> float:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        return time.time()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:  # ZEO 6.2 now and then ignores SIGTERM
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass
class Restart:
    killed: float
    up: float
    first_commit: dict[int, float] = field(default_factory=dict)  # worker -> time
    conflicts: dict[int, int] = field(default_factory=dict)  # retried until then

    @property
    def all_back(self) -> float | None:
        if not self.first_commit:
            return None
        return max(self.first_commit.values()) - self.up


@dataclass
class Result:
    pair: str
    restarts: list[Restart]
    workers: int
    events: list[dict]
    problems: list[str]

    def summary(self) -> dict[str, Any]:
        alls = [r.all_back for r in self.restarts if r.all_back is not None]
        per = [t - r.up for r in self.restarts for t in r.first_commit.values()]
        worst = max(((t - r.up, r.conflicts.get(w, 0)) for r in self.restarts
                     for w, t in r.first_commit.items()), default=(None, None))
        return {
            "pair": self.pair,
            "restarts": len(self.restarts),
            "all_back_median_s": statistics.median(alls) if alls else None,
            "all_back_max_s": max(alls) if alls else None,
            "all_back_s": [round(a, 2) for a in alls],
            "per_client_median_s": statistics.median(per) if per else None,
            "per_client_worst_s": worst[0],
            "worst_conflicts": worst[1],
            "conflicts_after_restarts": sum(sum(r.conflicts.values()) for r in self.restarts),
            "commits": sum(1 for e in self.events if e["ev"] == "commit"),
            # what a transaction that lost spent reading (its loads after the invalidations),
            # against one that committed (its reads served by the caches)
            "read_ms_median_conflicted": _median_ms(
                e["t_read"] - e["t0"] for e in self.events if e["ev"] == "conflict"),
            "read_ms_median_committed": _median_ms(
                e["t_read"] - e["t0"] for e in self.events if e["ev"] == "commit"),
            "most_conflicts_in_a_row": max(
                (e["conflicts"] for e in self.events if e["ev"] == "commit"), default=None),
            "problems": len(self.problems),
        }


def _median_ms(seconds: Any) -> float | None:
    values = list(seconds)
    return round(1000 * statistics.median(values), 2) if values else None


def _read_events(paths: list[Path]) -> list[dict]:
    events = []
    for p in paths:
        if p.exists():
            for line in p.read_text().splitlines():
                if line.strip():
                    events.append(json.loads(line))
    events.sort(key=lambda e: e["t"])
    return events


def _all_committed_since(paths: list[Path], since: float, workers: int) -> bool:
    done = set()
    for e in _read_events(paths):
        if e["ev"] == "commit" and e["t"] > since:
            done.add(e["w"])
    return len(done) == workers


def run(client: str, server: str, directory: Path, restarts: int = 10, workers: int = 4,
        seed: int = 1, settle_timeout: float = 120) -> Result:
    """Run one client/server pair; see the module docstring."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    py, cenv = client_side(client)
    scmd, senv = server_side(server)
    srv = Server(scmd, senv, directory)
    stop_file = directory / "stop"
    outs = [directory / f"worker{w}.jsonl" for w in range(workers)]
    procs: list[subprocess.Popen] = []
    timeline: list[tuple[float, float]] = []  # (killed, up)
    problems: list[str] = []
    try:
        up = srv.start()
        subprocess.run([*py, str(WORKER), "--init", srv.addr, str(workers),
                        str(directory / "blobs-init")], env=cenv, check=True, timeout=120)
        for w in range(workers):
            procs.append(subprocess.Popen(
                [*py, str(WORKER), srv.addr, str(w), str(workers), str(stop_file),
                 str(outs[w]), str(directory / f"blobs{w}")],
                env=cenv, cwd=directory, stdout=subprocess.DEVNULL,
                stderr=open(directory / f"worker{w}.err", "ab")))
        for _k in range(restarts + 1):
            deadline = time.monotonic() + settle_timeout
            while not _all_committed_since(outs, up, workers):
                if time.monotonic() > deadline:
                    problems.append(f"not every client committed within {settle_timeout}s "
                                    f"after the server came up at {up:.3f}")
                    break
                if any(p.poll() is not None for p in procs):
                    problems.append("a client process died")
                    break
                time.sleep(0.05)
            if problems or _k == restarts:
                break
            time.sleep(rng.uniform(0.5, 2.0))
            killed = srv.kill()
            up = srv.start()
            timeline.append((killed, up))
    finally:
        stop_file.touch()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        srv.stop()
    events = _read_events(outs)
    result = Result(f"{client}/{server}", [], workers, events, problems)
    _analyse(result, timeline, directory)
    return result


def _analyse(result: Result, timeline: list[tuple[float, float]], directory: Path) -> None:
    events = result.events
    problems = result.problems
    commits = [e for e in events if e["ev"] == "commit"]
    for killed, up in timeline:
        r = Restart(killed, up)
        for e in events:
            w = e["w"]
            if e["t"] <= up or w in r.first_commit:
                continue
            if e["ev"] == "commit":
                r.first_commit[w] = e["t"]
            elif e["ev"] == "conflict":
                r.conflicts[w] = r.conflicts.get(w, 0) + 1
        for w in range(result.workers):
            if w not in r.first_commit:
                problems.append(f"client {w} did not commit after the restart at {up:.3f}")
        result.restarts.append(r)
        # No stale reads on a reconnected client: a transaction begun after this client's
        # first commit on the new server sees every counter acknowledged before the kill.
        acked = {}
        for e in commits:
            if e["t"] < killed:
                acked[e["w"]] = max(acked.get(e["w"], 0), e["n"])
        for e in commits:
            back = r.first_commit.get(e["w"])
            if back is None or e["t0"] <= back:
                continue
            for other, n in e["seen"].items():
                if n < acked.get(int(other), 0):
                    problems.append(
                        f"client {e['w']} read client {other}'s counter {n} at {e['t0']:.3f}, "
                        f"after {acked[int(other)]} was acknowledged before the restart")
    # Nothing acknowledged lost: the final counters and the shared list hold every commit.
    final = _final_state(directory, result.workers)
    for w in range(result.workers):
        mine = [e["n"] for e in commits if e["w"] == w]
        if mine and final["counters"][w] < max(mine):
            problems.append(f"client {w}'s counter is {final['counters'][w]} at the end, "
                            f"{max(mine)} was acknowledged")
        missing = set(mine) - set(final["shared"].get(w, ()))
        if missing:
            problems.append(f"client {w}'s acknowledged appends missing: {sorted(missing)[:5]}")
    if final["fsck"]:
        problems.append(f"fstest: {final['fsck']}")


def _final_state(directory: Path, workers: int) -> dict[str, Any]:
    """Read the storage file directly (the server is stopped): counters, appends, fstest."""
    from ZODB.DB import DB
    from ZODB.FileStorage import FileStorage
    from ZODB.scripts import fstest

    path = str(directory / "Data.fs")
    fsck = ""
    try:
        fstest.check(path)
    except Exception as e:  # noqa: BLE001 - reported as a problem
        fsck = str(e)
    db = DB(FileStorage(path, read_only=True))
    try:
        root = db.open().root()
        counters = [root[f"c{w}"]["n"] for w in range(workers)]
        shared: dict[int, list[int]] = {}
        for w, n in root["shared"]:
            shared.setdefault(w, []).append(n)
    finally:
        db.close()
    return {"counters": counters, "shared": shared, "fsck": fsck}


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="ours/ours,ref/ref,ref/ours,ours/ref",
                   help="client/server pairs, ours or ref (ZEO 6.2)")
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    a = p.parse_args(argv)
    rows = []
    base = Path(tempfile.mkdtemp(prefix="zeo-restart-"))
    for pair in a.pairs.split(","):
        client, server = pair.split("/")
        result = run(client, server, base / pair.replace("/", "-"), a.restarts, a.workers,
                     a.seed)
        s = result.summary()
        rows.append(s)
        print(json.dumps(s), flush=True)
        for problem in result.problems[:20]:
            print(f"  PROBLEM {pair}: {problem}", flush=True)
    print()
    print("| client / server | all committing again: median, max (s) | per client: median, "
          "worst (s) (conflicts retried meanwhile) | problems |")
    print("|---|---|---|---|")
    for s in rows:
        print(f"| {s['pair']} | {_fmt(s['all_back_median_s'])}, {_fmt(s['all_back_max_s'])} | "
              f"{_fmt(s['per_client_median_s'])}, {_fmt(s['per_client_worst_s'])} "
              f"({_fmt(s['worst_conflicts'])}) | {s['problems']} |")
    if not a.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"kept {base}")
    return 1 if any(s["problems"] for s in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
