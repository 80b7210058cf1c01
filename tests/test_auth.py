"""Authorization of TLS client certificates per storage (ZEO.server.auth), end to end.

One ``runzeo -C`` server with ``<ssl>`` and ``<authorization>`` serves two FileStorages,
``main`` and ``archive``; clients present certificates made at run time with ``trustme``.
"""

from __future__ import annotations

import hashlib
import io
import ssl
import textwrap
import time
from pathlib import Path

import pytest
import trustme
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.POSException import ReadOnlyError

from support.servers import start_server
from ZEO import runzeo
from ZEO.client.connection import Connection
from ZEO.ClientStorage import ClientStorage
from ZEO.server.auth import Authorization, Identity, parse_rule

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """ca.pem, server.pem and alice/bob/carol/dave .crt + .key, all signed by one CA."""
    d = tmp_path_factory.mktemp("auth")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(d / "server.pem"))
    for name in ("alice", "bob", "carol", "dave"):
        leaf = ca.issue_cert(f"{name}@example.com", common_name=name)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    return d


def fingerprint(cert: Path) -> str:
    """``AB:CD:...``, as ``openssl x509 -noout -fingerprint -sha256`` prints it."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, 64, 2))


def context(certs: Path, who: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / f"{who}.crt"), str(certs / f"{who}.key"))
    return ctx


def storages(tmp_path: Path) -> str:
    return "\n".join(f"<filestorage {sid}>\n  path {tmp_path / sid}.fs\n</filestorage>"
                     for sid in ("main", "archive"))


def zeo_extra(certs: Path, rules: str) -> str:
    return (f"<ssl>\n  certificate {certs / 'server.pem'}\n  authenticate {certs / 'ca.pem'}\n"
            f"</ssl>\n<authorization>\n{rules}\n</authorization>")


@pytest.fixture
def server(certs, tmp_path):
    """alice: rw everywhere; bob: ro on main; carol (by fingerprint): rw on archive;
    dave: no rule (default none)."""
    rules = (f"  allow cn:alice * rw\n  allow cn:bob main ro\n"
             f"  allow sha256:{fingerprint(certs / 'carol.crt')} archive rw")
    srv = start_server("ours", tmp_path / "srv", storages(tmp_path), zeo_extra(certs, rules))
    yield srv
    srv.stop()


class _Handler:
    def server_call(self, connection, name, args):
        pass

    def connection_lost(self, connection):
        pass


@pytest.fixture
def connect(certs, server):
    """``connect(who)`` → a handshaken raw Connection to the server, closed at teardown."""
    conns = []

    def make(who: str) -> Connection:
        conn = Connection.open(server.addr, _Handler(), timeout=30,
                               ssl_context=context(certs, who))
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        conn.close()


def unknown_storage_error(conn: Connection, storage_id: str) -> str:
    """The error a register of ``storage_id`` gets, as ``Type: message``."""
    with pytest.raises(Exception) as info:
        conn.call_sync("register", storage_id, True, timeout=30)
    text = f"{type(info.value).__name__}: {info.value}"
    assert f"unknown storage: {storage_id}" in text
    return text


def test_rw_certificate_commits_and_ro_certificate_reads(certs, server):
    db = ZODB.DB(ClientStorage(server.addr, storage="main", ssl=context(certs, "alice")))
    try:
        with db.transaction() as conn:
            conn.root()["by"] = PersistentMapping(who="alice")
    finally:
        db.close()
    # bob may only read main: read-only-fallback lands on a read-only connection.
    storage = ClientStorage(server.addr, storage="main", ssl=context(certs, "bob"),
                            read_only_fallback=True)
    db = ZODB.DB(storage)
    try:
        assert storage.isReadOnly()
        with db.transaction() as conn:
            assert conn.root()["by"]["who"] == "alice"
            conn.root()["by"]["who"] = "bob"
            with pytest.raises(ReadOnlyError):
                conn.transaction_manager.commit()
            conn.transaction_manager.abort()
    finally:
        db.close()


def test_read_write_register_from_ro_certificate_gets_read_only_error(connect):
    conn = connect("bob")
    with pytest.raises(ReadOnlyError):
        conn.call_sync("register", "main", False, timeout=30)
    # The same connection may then register read-only (what read_only_fallback does)...
    assert conn.call_sync("register", "main", True, timeout=30) is not None
    # ...and still not pack, unlike a connection that merely registered read-only.
    with pytest.raises(ReadOnlyError):
        conn.call_sync("pack", time.time(), timeout=30)


def test_storage_without_a_rule_looks_unknown(connect):
    bob = connect("bob")
    refused = unknown_storage_error(bob, "archive")
    missing = unknown_storage_error(connect("bob"), "no-such-storage")
    assert refused == missing.replace("no-such-storage", "archive")
    # dave has no rule at all, and the default is none.
    unknown_storage_error(connect("dave"), "main")


def test_fingerprint_rule(connect):
    carol = connect("carol")
    assert carol.call_sync("register", "archive", False, timeout=30) is not None
    unknown_storage_error(connect("carol"), "main")


def test_rw_certificate_on_every_storage_and_pack(connect):
    for sid in ("main", "archive"):
        alice = connect("alice")
        alice.call_sync("register", sid, False, timeout=30)
        alice.call_sync("pack", time.time(), timeout=60)


def test_default_access_for_verified_clients(certs, tmp_path):
    srv = start_server("ours", tmp_path / "srv", storages(tmp_path),
                       zeo_extra(certs, "  default ro\n  allow cn:alice main rw"))
    try:
        dave = Connection.open(srv.addr, _Handler(), timeout=30,
                               ssl_context=context(certs, "dave"))
        try:
            with pytest.raises(ReadOnlyError):
                dave.call_sync("register", "archive", False, timeout=30)
            dave.call_sync("register", "archive", True, timeout=30)
        finally:
            dave.close()
        alice = Connection.open(srv.addr, _Handler(), timeout=30,
                                ssl_context=context(certs, "alice"))
        try:
            alice.call_sync("register", "main", False, timeout=30)
        finally:
            alice.close()
    finally:
        srv.stop()


# -- configuration ---------------------------------------------------------------------------

def options(text: str) -> runzeo.ServerOptions:
    root = runzeo.load_config(io.StringIO(textwrap.dedent(text)))
    return runzeo.options_from_config(root)


def test_config_parses_rules(certs):
    rules = "allow cn:alice * rw\nallow sha256:" + "Ab" * 32 + " 1 ro"
    o = options(f"""
        <zeo>
          address 127.0.0.1:0
          {zeo_extra(certs, rules)}
        </zeo>
        <mappingstorage/>
    """)
    auth = o.authorization
    assert isinstance(auth, Authorization) and auth.default == "none"
    alice = Identity(("alice",), "0" * 64)
    other = Identity(("eve",), "ab" * 32)
    assert auth.access(alice, "1") == "rw"
    assert auth.access(other, "1") == "ro"
    assert auth.access(other, "2") == "none"
    assert auth.access(None, "1") == "none"


def test_config_needs_ssl():
    with pytest.raises(runzeo.UsageError, match="authorization.*ssl"):
        options("""
            <zeo>
              address 127.0.0.1:0
              <authorization>
                allow * * rw
              </authorization>
            </zeo>
            <mappingstorage/>
        """)


@pytest.mark.parametrize("rule, reason", [
    ("cn:alice main", "WHO STORAGE"),
    ("cn:alice main write", "ro or rw"),
    ("alice main rw", "cn:NAME"),
    ("sha256:abcd main rw", "64 hex"),
])
def test_bad_rules_are_refused(rule, reason, certs):
    with pytest.raises(ValueError, match=reason):
        parse_rule(rule)
    with pytest.raises(runzeo.UsageError, match=reason):
        options(f"""
            <zeo>
              address 127.0.0.1:0
              {zeo_extra(certs, "allow " + rule)}
            </zeo>
            <mappingstorage/>
        """)


def test_highest_matching_rule_wins():
    auth = Authorization([parse_rule("* * ro"), parse_rule("cn:a s rw")], default="none")
    assert auth.access(Identity(("a",), "0" * 64), "s") == "rw"
    assert auth.access(Identity(("a",), "0" * 64), "t") == "ro"
