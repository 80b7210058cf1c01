"""Benchmark our ZEO against the real ZEO 6.2, side by side, on this machine.

    python3 benchmarks/run.py [--rounds N] [--quick] [--only WORKLOAD ...] [--json out.json]

Each round starts both servers fresh (``runzeo -C zeo.conf``, FileStorage with its default
fsync, plus a ``<blobstorage>`` for the blob workload) in a temporary directory, then runs every
workload against each side in turn: ``ours, ref`` in even rounds, ``ref, ours`` in odd ones.  The
workloads (``workloads.py``) run in separate client processes.  Both sides run from clean
venvs in ``.cache/``, built when missing: ours has our dependencies and uvloop, with our ``ZEO``
from a snapshot of ``src/``; the reference has ZEO 6.2 and uvloop.
The table shows, per metric, the median over rounds of each side and of the per-round ratio
ours/ref; the JSON file holds every round's raw results.

``--storage relstorage`` measures our server in front of RelStorage on PostgreSQL (a
throw-away cluster started for the run, one fresh database per side and round) against the
alternative users pick today, RelStorage used directly by the same client processes; the
``ref`` column is then ``rs``.

``--self-test`` runs the reference on both sides (a check of the harness and of its noise);
``--client ref`` pairs our server with the reference client (the server alone), ``--server ref``
our client with the reference server.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKLOADS_PY = HERE / "workloads.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _support(name: str):
    """tests/support/<name>.py, loaded by path (refzeo builds and finds the reference venv;
    postgres starts a throw-away PostgreSQL cluster)."""
    spec = importlib.util.spec_from_file_location(
        f"_zeo_bench_{name}", REPO / "tests" / "support" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _refzeo():
    return _support("refzeo")


# --------------------------------------------------------------------------- sides and servers


@dataclass
class Side:
    """One implementation under test: how to start its server and run its client workloads."""

    name: str
    python: str
    server_cmd: list[str]
    env: dict[str, str]  # for the client workloads
    server_env: dict[str, str] | None = None  # None: the same as env
    desc: str = "server ZEO 6.2, client ZEO 6.2"
    #: The server's storage sections for a directory (None: FileStorage, storage_conf).
    conf: Callable[[Path, bool], str] | None = None
    #: No server: the clients use RelStorage directly on a new database from this cluster.
    direct_cluster: Any = None

    def run_env(self, server: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.update(self.env if not server or self.server_env is None else self.server_env)
        return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storage_conf(directory: Path, with_blobs: bool) -> str:
    conf = f"<filestorage 1>\n  path {directory / 'Data.fs'}\n</filestorage>\n"
    if with_blobs:
        conf += (f"<blobstorage blob>\n  blob-dir {directory / 'blobs'}\n"
                 f"  <filestorage>\n    path {directory / 'Blobs.fs'}\n  </filestorage>\n"
                 "</blobstorage>\n")
    return conf


class Server:
    """A ``runzeo -C`` process on 127.0.0.1, with /proc readings of its CPU time and memory."""

    def __init__(self, side: Side, directory: Path, with_blobs: bool = True) -> None:
        self.side = side
        self.directory = directory
        self.with_blobs = with_blobs
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = directory / "zeo.conf"
        self.conf.write_text(f"<zeo>\n  address 127.0.0.1:{self.port}\n</zeo>\n"
                             + (side.conf or storage_conf)(directory, with_blobs))
        self.log_path = directory / "server.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*side.server_cmd, "-C", str(self.conf)], stdout=self._log,
            stderr=subprocess.STDOUT, env=side.run_env(server=True), cwd=directory)
        try:
            self._wait_listening(60)
        except Exception:
            self.stop()
            raise

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.side.name} server exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.side.name} server not listening after {timeout}s")
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_mib(self) -> dict[str, float]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) / 1024
        return out

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:  # ZEO 6.2 now and then ignores SIGTERM
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class DirectRelStorage:
    """A side with no server: its clients open RelStorage on a fresh database themselves."""

    def __init__(self, side: Side, directory: Path) -> None:
        self.side = side
        self.directory = directory
        self.dsn = side.direct_cluster.create_database("rs")
        self.pid = os.getpid()

    @property
    def addr(self) -> str:
        return f"relstorage:{self.dsn}"

    def alive(self) -> bool:
        return True

    def log_tail(self, n: int = 2000) -> str:
        return ""

    def cpu_seconds(self) -> float:
        return 0.0  # no server process (PostgreSQL's CPU is not counted on either side)

    def memory_mib(self) -> dict[str, float]:
        return {}

    def stop(self, timeout: float = 15) -> None:
        pass


# --------------------------------------------------------------------------- worker processes


class WorkerError(Exception):
    pass


class Worker:
    """One ``workloads.py`` client process speaking the READY / GO / RESULT line protocol."""

    def __init__(self, side: Side, workload: str, addr: str, data_dir: Path,
                 params: dict[str, Any], index: int, nprocs: int, log_path: Path) -> None:
        self.label = f"{side.name}:{workload}[{index}]"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [side.python, str(WORKLOADS_PY), workload, "--addr", addr,
             "--data-dir", str(data_dir), "--params", json.dumps(params),
             "--index", str(index), "--nprocs", str(nprocs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env=side.run_env(), cwd=data_dir)
        self._buf = b""

    def read_line(self, deadline: float) -> str:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"{self.label}: timed out")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise WorkerError(f"{self.label}: exited ({self.proc.wait()}) "
                                      f"{self.stderr_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect(self, word: str, deadline: float) -> str:
        while True:
            line = self.read_line(deadline)
            if line.startswith("ERROR "):
                err = json.loads(line[6:])
                raise WorkerError(f"{self.label}: {err['error']}\n{err['traceback']}")
            if line == word or line.startswith(word + " "):
                return line[len(word) + 1:]

    def go(self, start: float, deadline: float) -> None:
        self.proc.stdin.write(f"GO {start} {deadline}\n".encode())
        self.proc.stdin.flush()

    def stderr_tail(self, n: int = 1500) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._log.close()


class Profiler:
    """``py-spy record`` of a server process (all threads), raw collapsed stacks to ``path``."""

    MODES = {
        "gil": ["--gil", "--nonblocking"],  # only the thread holding the GIL: CPU spent in Python
        "active": ["--nonblocking"],  # every thread that is not idle (includes fsync, waits)
        "native": ["--gil", "--native"],  # with C frames (uvloop, syscalls); pauses the target
    }

    def __init__(self, pid: int, path: Path, mode: str = "gil", rate: int = 250) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        self.path = path
        self._log = open(path.with_suffix(".log"), "ab")
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--threads", *self.MODES[mode], "--output", str(path)],
            stdout=self._log, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # let it attach before the timed phase starts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def profile_summary(path: Path, top: int = 25) -> str:
    """Top functions of a py-spy raw profile, by own samples and by samples including callees."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    threads: dict[str, int] = {}
    n = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        n += c
        # "func (file:line)" -> "func (file)": aggregate over lines; shorten site-packages paths
        frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") and ":" in f else f
                  for f in stack.split(";")]
        frames = [f.split("site-packages/")[-1].replace(str(REPO / "src") + "/", "")
                  for f in frames]
        threads[frames[0]] = threads.get(frames[0], 0) + c
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames[1:]):
            total[f] = total.get(f, 0) + c
    if not n:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {n} samples", "  by thread:"]
    lines += [f"    {c / n:6.1%}  {t}" for t, c in sorted(threads.items(), key=lambda x: -x[1])]
    lines.append("  own time:")
    lines += [f"    {c / n:6.1%}  {f}" for f, c in sorted(own.items(), key=lambda x: -x[1])[:top]]
    lines.append("  including callees:")
    boiler = ("(<frozen runpy>)", "(threading.py)", "(ZEO/runzeo.py)", "(concurrent/futures/")
    inclusive = [(f, c) for f, c in total.items() if not any(b in f for b in boiler)]
    lines += [f"    {c / n:6.1%}  {f}" for f, c in sorted(inclusive, key=lambda x: -x[1])[:top]]
    return "\n".join(lines)


def run_group(side: Side, workload: str, server: Server, data_dir: Path, params: dict[str, Any],
              nprocs: int, duration: float, timeout: float, log_dir: Path,
              profile: Path | None = None, profile_client: bool = False,
              profile_mode: str = "gil") -> tuple[list[dict[str, Any]], float]:
    """Run ``nprocs`` workers together; return their results and the server CPU seconds used.

    With ``profile``, the server is sampled by py-spy during the timed phase into that file,
    and with ``profile_client`` the first worker too (into ``<stem>-client0.txt``).
    """
    workers: list[Worker] = []
    profiler = client_profiler = None
    try:
        for i in range(nprocs):
            workers.append(Worker(side, workload, server.addr, data_dir, params, i, nprocs,
                                  log_dir / f"{side.name}-{workload}-{i}.log"))
        setup_deadline = time.monotonic() + 120
        for w in workers:
            w.expect("READY", setup_deadline)
        # Write back what earlier phases left dirty (the other side's 100 MiB of blobs, say),
        # so that neither side's timed phase pays for the other's disk writes.
        os.sync()
        if profile is not None:
            profiler = Profiler(server.pid, profile, profile_mode)
            if profile_client:
                client_profiler = Profiler(
                    workers[0].proc.pid, profile.with_name(profile.stem + "-client0.txt"),
                    profile_mode)
        cpu0 = server.cpu_seconds()
        start = time.time() + 0.2
        for w in workers:
            w.go(start, start + duration)
        result_deadline = time.monotonic() + 0.2 + timeout
        results = [json.loads(w.expect("RESULT", result_deadline)) for w in workers]
        cpu = server.cpu_seconds() - cpu0
        for w in workers:
            w.proc.wait(30)
        return results, cpu
    finally:
        for prof in (profiler, client_profiler):
            if prof is not None:
                prof.stop()
        for w in workers:
            w.close()


# --------------------------------------------------------------------------- workloads and metrics


@dataclass
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    target: float | None = None  # on the ratio ours/ref

    def met(self, ratio: float | None) -> str:
        if self.target is None or ratio is None:
            return ""
        ok = ratio >= self.target if self.higher_is_better else ratio <= self.target
        return "yes" if ok else "NO"

    def target_text(self) -> str:
        if self.target is None:
            return ""
        return (">=" if self.higher_is_better else "<=") + f"{self.target:g}x"


@dataclass
class Workload:
    name: str
    worker: str
    nprocs: int
    params: Callable[[argparse.Namespace], dict[str, Any]]
    duration: Callable[[argparse.Namespace], float]
    extract: Callable[[list[dict[str, Any]]], dict[str, float]]
    metrics: list[Metric]
    cpu_unit: str  # what one "op" of the server CPU metric is
    cpu_ops: Callable[[list[dict[str, Any]]], float] = field(
        default=lambda rs: sum(r["ops"] for r in rs))
    needs_data: bool = True
    timeout: float = 120.0


def _sum(rs: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rs)


def _sizes(a: argparse.Namespace) -> dict[str, Any]:
    if a.quick:
        return {"objects": 5000, "pings": 1500, "record_txns": 3, "blobs": 2,
                "conns_per_proc": 50}
    return {"objects": 20000, "pings": 5000, "record_txns": 10, "blobs": 10,
            "conns_per_proc": 50}


def _dur(a: argparse.Namespace) -> float:
    return 1.0 if a.quick else 3.0


def _probe(rs):
    return next(r for r in rs if r.get("role") == "probe")


def _writers(rs):
    return [r for r in rs if r.get("role") == "writer"]


WORKLOADS: list[Workload] = [
    Workload(
        "ping", "ping", 1, _sizes, lambda a: 0,
        lambda rs: {"ping_p50_us": rs[0]["ping_p50_us"], "ping_p99_us": rs[0]["ping_p99_us"]},
        [Metric("ping_p50_us", "us", False, 0.65), Metric("ping_p99_us", "us", False)],
        "ping", needs_data=False),
    Workload(
        "bulk_add", "bulk_add", 1, _sizes, lambda a: 0,
        lambda rs: {"bulk_add_objs_s": rs[0]["objs_per_s"]},
        [Metric("bulk_add_objs_s", "obj/s", True)], "object"),
    Workload(
        "cold_load", "cold_load", 1, _sizes, lambda a: 0,
        lambda rs: {"cold_load_objs_s": rs[0]["objs_per_s"]},
        [Metric("cold_load_objs_s", "obj/s", True, 2.0)], "load"),
    Workload(
        "cold_load_random", "cold_load_random", 1, _sizes, lambda a: 0,
        lambda rs: {"cold_load_random_objs_s": rs[0]["objs_per_s"]},
        [Metric("cold_load_random_objs_s", "obj/s", True)], "load"),
    Workload(
        "cold_traversal", "cold_traversal", 1, _sizes, lambda a: 0,
        lambda rs: {"cold_traversal_objs_s": rs[0]["objs_per_s"]},
        [Metric("cold_traversal_objs_s", "obj/s", True, 3.0)], "object"),
    Workload(
        "commit_1", "commit", 1, _sizes, _dur,
        lambda rs: {"commit_1_txn_s": _sum(rs, "txn_per_s")},
        [Metric("commit_1_txn_s", "txn/s", True, 1.5)], "txn"),
    Workload(
        "commit_4", "commit", 4, _sizes, _dur,
        lambda rs: {"commit_4_txn_s": _sum(rs, "txn_per_s")},
        [Metric("commit_4_txn_s", "txn/s", True, 2.0)], "txn"),
    Workload(
        "mix_90_10", "mix", 4, _sizes, _dur,
        lambda rs: {"mix_ops_s": _sum(rs, "ops_per_s")},
        [Metric("mix_ops_s", "txn/s", True, 1.5)], "txn"),
    Workload(
        "txn_start", "txn_start", 1, _sizes, _dur,
        lambda rs: {"txn_start_txn_s": _sum(rs, "txn_per_s")},
        [Metric("txn_start_txn_s", "txn/s", True)], "txn"),
    Workload(
        "load_under_commit", "load_under_commit", 4, _sizes,
        lambda a: 1.5 if a.quick else 5.0,
        lambda rs: {"luc_load_p50_us": _probe(rs)["load_p50_us"],
                    "luc_load_p99_us": _probe(rs)["load_p99_us"],
                    "luc_writer_mb_s": _sum(_writers(rs), "mb_per_s")},
        [Metric("luc_load_p50_us", "us", False), Metric("luc_load_p99_us", "us", False, 0.5),
         Metric("luc_writer_mb_s", "MiB/s", True)],
        "MiB written", cpu_ops=lambda rs: sum(
            r["mb_per_s"] * r["elapsed"] for r in _writers(rs))),
    Workload(
        "records_1mib", "records", 1, _sizes, lambda a: 0,
        lambda rs: {"rec1m_write_mb_s": rs[0]["write_mb_per_s"],
                    "rec1m_read_mb_s": rs[0]["read_mb_per_s"]},
        [Metric("rec1m_write_mb_s", "MiB/s", True, 5.0),
         Metric("rec1m_read_mb_s", "MiB/s", True, 1.2)],
        "MiB", cpu_ops=lambda rs: rs[0]["mib"] * 2),
    Workload(
        "blobs_10mib", "blobs", 1, _sizes, lambda a: 0,
        lambda rs: {"blob10m_write_mb_s": rs[0]["write_mb_per_s"],
                    "blob10m_read_mb_s": rs[0]["read_mb_per_s"],
                    "blob10m_commit_ms": rs[0]["commit_ms"],
                    "blob10m_local_write_ms": rs[0]["local_write_ms"]},
        [Metric("blob10m_write_mb_s", "MiB/s", True, 1.2),
         Metric("blob10m_read_mb_s", "MiB/s", True, 1.2),
         Metric("blob10m_commit_ms", "ms", False),
         Metric("blob10m_local_write_ms", "ms", False)],
        "MiB", cpu_ops=lambda rs: rs[0]["mib"] * 2, needs_data=False),
    Workload(
        "connections_100", "connections", 2, _sizes, _dur,
        lambda rs: {"conn100_connect_ms": statistics.median(r["connect_p50_ms"] for r in rs),
                    "conn100_all_connected_s": max(r["all_connected_s"] for r in rs),
                    "conn100_pings_s": _sum(rs, "pings_per_s"),
                    "conn100_ping_p99_us": max(r["ping_p99_us"] for r in rs)},
        [Metric("conn100_connect_ms", "ms", False), Metric("conn100_all_connected_s", "s", False),
         Metric("conn100_pings_s", "ping/s", True), Metric("conn100_ping_p99_us", "us", False)],
        "op", needs_data=False),
]
BY_NAME = {w.name: w for w in WORKLOADS}
MEMORY_METRICS = [Metric("server_rss_mib", "MiB", False, 1.0),
                  Metric("server_hwm_mib", "MiB", False, 1.0)]


def cpu_metric(w: Workload) -> Metric:
    return Metric(f"cpu_{w.name}", f"us/{w.cpu_unit}", False)


def all_metrics(selected: list[Workload]) -> list[Metric]:
    out = [m for w in selected for m in w.metrics]
    out += MEMORY_METRICS
    out += [cpu_metric(w) for w in selected]
    return out


# --------------------------------------------------------------------------- the run


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK  # minus idle and iowait


def own_cpu_seconds() -> float:
    """CPU time of this runner plus its waited-for children (servers and workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_side_workload(side: Side, server: Server, w: Workload, a: argparse.Namespace,
                      data_dir: Path, log_dir: Path) -> dict[str, Any]:
    """One workload against one side; never raises (errors become the ``error`` entry)."""
    t0 = time.monotonic()
    params = w.params(a)
    try:
        if not server.alive():
            raise WorkerError(f"server is not running: {server.log_tail(500)}")
        profile = None
        if a.profile is not None and side.name in a.profile_sides:
            profile = a.profile / f"r{a.current_round}-{side.name}-{w.name}.txt"
        results, cpu = run_group(side, w.worker, server, data_dir, params, w.nprocs,
                                 w.duration(a), w.timeout, log_dir, profile, a.profile_clients,
                                 a.profile_mode)
        metrics = w.extract(results)
        ops = w.cpu_ops(results)
        metrics[cpu_metric(w).name] = cpu / ops * 1e6 if ops else None
        out = {"metrics": metrics, "raw": results, "server_cpu_s": cpu}
        log(f"  {side.name:5} {w.name:18} {time.monotonic() - t0:5.1f}s  "
            + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None))
    except Exception as e:
        out = {"metrics": {}, "error": str(e)}
        log(f"  {side.name:5} {w.name:18} FAILED: {str(e).splitlines()[0][:200]}")
    return out


def start_server(side: Side, directory: Path) -> Server | DirectRelStorage:
    if side.direct_cluster is not None:
        return DirectRelStorage(side, directory)
    try:
        return Server(side, directory, with_blobs=True)
    except Exception as e:
        log(f"  {side.name}: server failed with a blob storage ({e}); retrying without one")
        return Server(side, directory / "noblobs", with_blobs=False)


def run_round(r: int, sides: list[Side], selected: list[Workload], a: argparse.Namespace,
              tmp: Path) -> dict[str, Any]:
    order = sides if r % 2 == 0 else sides[::-1]
    a.current_round = r + 1
    log(f"round {r + 1}: order {' -> '.join(s.name for s in order)}")
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    servers: dict[str, Any] = {}
    down: dict[str, str] = {}  # side -> why its server is not running
    out: dict[str, Any] = {"round": r + 1, "order": [s.name for s in order],
                           "sides": {s.name: {"workloads": {}, "metrics": {}} for s in sides}}

    def start(s: Side, directory: Path) -> None:
        try:
            servers[s.name] = start_server(s, directory)
            down.pop(s.name, None)
        except Exception as e:  # a side that cannot start must not sink the other one
            down[s.name] = f"server did not start: {e}"
            log(f"  {s.name}: {down[s.name][:300]}")

    try:
        for s in order:
            d = tmp / f"round{r + 1}" / s.name
            (d / "client").mkdir(parents=True, exist_ok=True)
            start(s, d / "server")
        for w in selected:
            for s in order:
                server = servers.get(s.name)
                client_dir = tmp / f"round{r + 1}" / s.name / "client"
                if server is not None and not server.alive():  # restart after a crash
                    log(f"  {s.name}: server died, restarting it: {server.log_tail(300)}")
                    server.stop()
                    del servers[s.name]
                    start(s, server.directory)
                    server = servers.get(s.name)
                if server is None:
                    res = {"metrics": {}, "error": down[s.name]}
                else:
                    res = run_side_workload(s, server, w, a, client_dir, client_dir)
                side_out = out["sides"][s.name]
                side_out["workloads"][w.name] = res
                side_out["metrics"].update(res["metrics"])
        for s in order:
            server = servers.get(s.name)
            if server is not None and server.alive():
                mem = server.memory_mib()
                out["sides"][s.name]["metrics"].update(
                    {"server_rss_mib": mem.get("VmRSS"), "server_hwm_mib": mem.get("VmHWM")})
    finally:
        for server in servers.values():
            server.stop()
    # Other processes' CPU during the round, as a share of the machine: they skew every number.
    foreign = (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)
    out["foreign_cpu_share"] = max(0.0, foreign) / ((time.monotonic() - wall0) * os.cpu_count())
    log(f"  other processes used {out['foreign_cpu_share']:.0%} of the machine's CPU")
    ratios = {}
    a_m, b_m = (out["sides"][s.name]["metrics"] for s in sides)
    for k, v in a_m.items():
        if v is not None and b_m.get(k):
            ratios[k] = v / b_m[k]
    out["ratios"] = ratios
    return out


def summarise(rounds: list[dict[str, Any]], sides: list[Side],
              metrics: list[Metric]) -> dict[str, Any]:
    summary = {}
    for m in metrics:
        vals = {s.name: [rd["sides"][s.name]["metrics"].get(m.name) for rd in rounds]
                for s in sides}
        ratios = [rd["ratios"].get(m.name) for rd in rounds]
        good = [x for x in ratios if x is not None]
        med = statistics.median(good) if good else None
        entry = {"unit": m.unit, "higher_is_better": m.higher_is_better, "target": m.target,
                 "ratios": ratios, "ratio_median": med, "met": m.met(med)}
        for s in sides:
            v = [x for x in vals[s.name] if x is not None]
            entry[f"{s.name}_median"] = statistics.median(v) if v else None
            entry[f"{s.name}_values"] = vals[s.name]
        summary[m.name] = entry
    return summary


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table(summary: dict[str, Any], sides: list[Side]) -> str:
    a, b = sides[0].name, sides[1].name
    head = ["metric", "unit", f"{a} (median)", f"{b} (median)", "ratio per round",
            f"ratio {a}/{b}", "target", "met"]
    rows = [head]
    for name, e in summary.items():
        rows.append([name, e["unit"], fmt(e[f"{a}_median"]), fmt(e[f"{b}_median"]),
                     " ".join(f"{x:.2f}" if x is not None else "n/a" for x in e["ratios"]),
                     f"{e['ratio_median']:.2f}x" if e["ratio_median"] is not None else "n/a",
                     (">=" if e["higher_is_better"] else "<=") + f"{e['target']:g}x"
                     if e["target"] is not None else "", e["met"]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine(infos: dict[str, Any]) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "runner_python": platform.python_version(), "sides": infos}


def git_state() -> dict[str, Any]:
    """The commit the run measured, and whether src/ had uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"head": git("rev-parse", "HEAD"),
            "src_changes": git("status", "--porcelain", "--", "src").splitlines()}


def info(side: Side, tmp: Path) -> dict[str, Any]:
    """Versions seen by a side's client interpreter (runs the ``info`` workload, no server)."""
    d = tmp / f"info-{side.name}"
    d.mkdir(parents=True, exist_ok=True)
    w = Worker(side, "info", "127.0.0.1:0", d, {}, 0, 1, d / "info.log")
    try:
        w.expect("READY", time.monotonic() + 60)
        w.go(time.time(), time.time())
        return json.loads(w.expect("RESULT", time.monotonic() + 60))
    finally:
        w.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default 5, or 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and 1 s phases (~1 min)")
    p.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="WORKLOAD",
                   help="run only these workloads (bulk_add is added when one needs its data): "
                   + ", ".join(BY_NAME))
    p.add_argument("--json", type=Path, default=None,
                   help="write results here (default benchmarks/results/<timestamp>.json)")
    p.add_argument("--storage", choices=["filestorage", "relstorage"], default="filestorage",
                   help="relstorage: our server on RelStorage/PostgreSQL against RelStorage "
                   "used directly by the same clients")
    p.add_argument("--self-test", action="store_true",
                   help="run the reference ZEO on both sides (checks the harness and its noise)")
    p.add_argument("--server", choices=["ours", "ref"], default="ours",
                   help="server of the first side (e.g. ours with --client ref: server only)")
    p.add_argument("--client", choices=["ours", "ref"], default="ours",
                   help="client library of the first side's workloads")
    p.add_argument("--ours-python", default=None,
                   help="interpreter for our server and client workloads, run with a snapshot "
                   "of src/ (default: the clean venv .cache/zeo-ours, built if missing with "
                   "pyproject's dependencies and uvloop, as the reference venv is)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample the first side's server with py-spy during each workload; write "
                   "raw stacks and a top-functions summary to DIR (slows that server: do not "
                   "quote the ratios of a profiled run)")
    p.add_argument("--profile-both", action="store_true",
                   help="with --profile, sample the reference side too")
    p.add_argument("--profile-mode", choices=list(Profiler.MODES), default="gil",
                   help="gil: where the CPU goes (the GIL holder); active: every busy thread, "
                   "blocking calls included; native: gil with C frames (default gil)")
    p.add_argument("--profile-clients", action="store_true",
                   help="with --profile, also sample the first client process of each workload")
    a = p.parse_args(argv)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 5)

    ref_python = str(_refzeo().ref_python())
    if a.ours_python is None:
        a.ours_python = str(_refzeo().ours_python())
    ref_runzeo = str(Path(ref_python).parent / "runzeo")
    ref = Side("ref", ref_python, [ref_runzeo], {})
    if a.self_test:
        a.server = a.client = "ref"
    # A snapshot of src/, so edits made in the working tree during the run do not leak into it.
    tmp = Path(tempfile.mkdtemp(prefix="zeo-bench-"))
    shutil.copytree(REPO / "src", tmp / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    src = {"PYTHONPATH": str(tmp / "src")}
    name = {("ours", "ours"): "ours", ("ours", "ref"): "oursrv", ("ref", "ours"): "ourcli",
            ("ref", "ref"): "ref2"}[a.server, a.client]
    ours = Side(
        name,
        a.ours_python if a.client == "ours" else ref_python,
        [a.ours_python, "-m", "ZEO.runzeo"] if a.server == "ours" else [ref_runzeo],
        src if a.client == "ours" else {},
        server_env=src if a.server == "ours" else {},
        desc=f"server {'ours' if a.server == 'ours' else 'ZEO 6.2'}, "
             f"client {'ours' if a.client == 'ours' else 'ZEO 6.2'}",
    )
    sides = [ours, ref]
    cluster = None
    if a.storage == "relstorage":
        pg = _support("postgres")
        cluster = pg.Cluster("bench")

        def relstorage_conf(directory: Path, with_blobs: bool) -> str:
            return pg.relstorage_section(cluster.create_database("zeo"),
                                         blob_dir=str(directory / "blobs"),
                                         shared_blob_dir=False)

        ours.conf = relstorage_conf
        ours.desc = "server ours on RelStorage/PostgreSQL, client ours"
        sides = [ours, Side("rs", a.ours_python, [], src, direct_cluster=cluster,
                            desc="RelStorage used directly by the clients (no ZEO server)")]
        if not a.only:
            a.only = ["cold_load", "commit_1", "commit_4", "mix_90_10", "txn_start"]
    a.profile_sides = {s.name for s in (sides if a.profile_both else sides[:1])}
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)

    if a.only:
        names = set(a.only)
        if any(BY_NAME[n].needs_data for n in names):
            names.add("bulk_add")
        selected = [w for w in WORKLOADS if w.name in names]
    else:
        selected = list(WORKLOADS)

    started = datetime.datetime.now()
    try:
        infos = {s.name: info(s, tmp) for s in sides}
        for s in sides:
            i = infos[s.name]
            log(f"{s.name}: {s.desc}; python {i['python']}, ZEO {i['zeo_version']} "
                f"({i['zeo_file']}), ZODB {i['zodb_version']}, uvloop {i['uvloop']}")
        results = []
        t0 = time.monotonic()
        for r in range(rounds):
            results.append(run_round(r, sides, selected, a, tmp))
            log(f"round {r + 1} done, {time.monotonic() - t0:.0f}s elapsed")
        metrics = all_metrics(selected)
        summary = summarise(results, sides, metrics)
        mach = machine(infos)
        doc = {"started": started.isoformat(timespec="seconds"),
               "elapsed_s": time.monotonic() - t0, "argv": sys.argv[1:], "rounds": rounds,
               "quick": a.quick, "self_test": a.self_test, "machine": mach, "git": git_state(),
               "summary": summary, "results": results}
        out = a.json or HERE / "results" / f"{started:%Y%m%d-%H%M%S}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        print(f"machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['platform']}")
        for s in sides:
            i = infos[s.name]
            print(f"{s.name}: {s.desc}; client python {i['python']}, uvloop {i['uvloop']}, "
                  f"ZEO from {i['zeo_file']}")
        foreign = [rd["foreign_cpu_share"] for rd in results]
        print("CPU used by other processes during the rounds: "
              + " ".join(f"{x:.0%}" for x in foreign)
              + ("  (WARNING: the machine was not idle; numbers are noisy)"
                 if max(foreign) > 0.1 else ""))
        print(f"{rounds} interleaved round(s){' (quick)' if a.quick else ''}, "
              f"{doc['elapsed_s']:.0f}s; ratio = {sides[0].name}/{sides[1].name} of the metric "
              "(us, ms, s and MiB: lower is better; /s: higher is better)")
        print(table(summary, sides))
        print(f"JSON: {out}")
        failed = [(rd["round"], s, wn, res["error"].splitlines()[0][:160])
                  for rd in results for s, so in rd["sides"].items()
                  for wn, res in so["workloads"].items() if "error" in res]
        for rnd, s, wn, err in failed:
            print(f"n/a: round {rnd} {s} {wn}: {err}")
        if a.profile is not None:
            parts = [profile_summary(f) for f in sorted(a.profile.glob("r*-*.txt"))]
            (a.profile / "summary.txt").write_text("\n\n".join(parts) + "\n")
            print(f"profiles (PROFILED RUN: ratios are skewed): {a.profile / 'summary.txt'}")
    finally:
        if cluster is not None:
            cluster.stop()
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
