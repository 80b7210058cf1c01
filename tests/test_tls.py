"""TLS between client and server: our client, our server, and ZEO 6.2 on either side.

Certificates are made at run time with ``trustme``: one CA that signs the server and the
clients, a second CA nobody trusts, and an expired client certificate.  Servers are real
``runzeo -C`` processes with an ``<ssl>`` section; clients are real ClientStorages and DBs.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trustme
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping

from support.refzeo import run_ref
from support.servers import filestorage_conf, start_server
from ZEO.client.connection import SocketTransport
from ZEO.client.tls import TLSError, TLSTransport, open_tls_transport
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """PEM files: ca, server (localhost, 127.0.0.1), alice, bob, expired, stranger (other CA)."""
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    other_ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(d / "other-ca.pem"))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(d / "server.pem"))
    other_ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem \
        .write_to_path(str(d / "fake-server.pem"))
    for name, issuer in (("alice", ca), ("bob", ca), ("stranger", other_ca)):
        leaf = issuer.issue_cert(f"{name}@example.com", common_name=name)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue_cert("expired@example.com", common_name="expired",
                            not_before=now - datetime.timedelta(days=30),
                            not_after=now - datetime.timedelta(days=1))
    expired.private_key_and_cert_chain_pem.write_to_path(str(d / "expired.pem"))
    return d


def server_ssl(certs: Path, cert: str = "server.pem") -> str:
    return (f"<ssl>\n  certificate {certs / cert}\n  authenticate {certs / 'ca.pem'}\n"
            "</ssl>")


def client_context(certs: Path, who: str | None = "alice", ca: str = "ca.pem"
                   ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / ca))
    if who == "expired":
        ctx.load_cert_chain(str(certs / "expired.pem"))
    elif who is not None:
        ctx.load_cert_chain(str(certs / f"{who}.crt"), str(certs / f"{who}.key"))
    return ctx


@pytest.fixture
def make_tls_server(make_server_process, tmp_path):
    """``make_tls_server(certs, kind="ours", unix=False)``: a server with TLS (none when
    ``certs`` is None)."""

    def make(certs: Path | None, kind: str = "ours", unix: bool = False, name: str = "s"):
        addr = str(tmp_path / f"{name}.sock") if unix else None
        return make_server_process(kind, server_ssl(certs) if certs is not None else "",
                                   name=name, addr=addr)

    return make


def commit_and_read(storage_factory, closing) -> None:
    """Commit with one DB, read the object back through a second client."""
    db = closing(ZODB.DB(storage_factory()))
    with db.transaction() as conn:
        conn.root()["x"] = PersistentMapping(value="over TLS")
    db2 = closing(ZODB.DB(storage_factory()))
    with db2.transaction() as conn:
        assert conn.root()["x"]["value"] == "over TLS"


# -- a verified client gets in -----------------------------------------------------------

@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_verified_client_commits_and_loads(certs, make_tls_server, closing, unix):
    srv = make_tls_server(certs, unix=unix)
    commit_and_read(lambda: ClientStorage(
        srv.addr, ssl=client_context(certs), ssl_server_hostname="localhost" if unix else None,
        wait_timeout=30), closing)


def test_client_config_ssl_section(certs, make_tls_server, closing):
    srv = make_tls_server(certs)
    host, port = srv.addr
    conf = f"""
        %import ZEO
        <clientstorage>
          server {host}:{port}
          <ssl>
            certificate {certs / 'bob.crt'}
            key {certs / 'bob.key'}
            authenticate {certs / 'ca.pem'}
            server-hostname localhost
          </ssl>
        </clientstorage>
    """
    commit_and_read(lambda: ZODB.config.storageFromString(conf), closing)


def test_server_hostname_is_checked(certs, make_tls_server, closing):
    srv = make_tls_server(certs)
    with pytest.raises(TLSError, match="did not verify.*(mismatch|match)"):
        closing(ClientStorage(srv.addr, ssl=client_context(certs),
                              ssl_server_hostname="db.example.com"))


def test_unix_socket_needs_a_hostname_to_check(certs, make_tls_server):
    srv = make_tls_server(certs, unix=True)
    with pytest.raises(TLSError, match="ssl_server_hostname"):
        ClientStorage(srv.addr, ssl=client_context(certs))


# -- refused -----------------------------------------------------------------------------

@pytest.mark.parametrize("who, ca", [
    (None, "ca.pem"),            # no client certificate
    ("stranger", "ca.pem"),      # a client certificate from a CA the server does not trust
    ("expired", "ca.pem"),       # a client certificate past its not_after
], ids=["no-cert", "wrong-ca", "expired"])
def test_server_refuses_client(certs, make_tls_server, closing, who, ca):
    srv = make_tls_server(certs)
    # The error is TLSError, not the "timed out waiting for connection" of wait_timeout.
    with pytest.raises(TLSError, match="TLS.*refused|TLS.*closed") as info:
        closing(ClientStorage(srv.addr, ssl=client_context(certs, who, ca),
                              wait_timeout=30))
    assert isinstance(info.value, ClientDisconnected)


def test_client_refuses_untrusted_server(certs, tmp_path, make_tls_server, closing):
    srv = start_server("ours", tmp_path / "fake", filestorage_conf(tmp_path / "fake.fs"),
                       server_ssl(certs, "fake-server.pem"))
    try:
        with pytest.raises(TLSError, match="server certificate .* did not verify"):
            closing(ClientStorage(srv.addr, ssl=client_context(certs), wait_timeout=30))
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["ours", "ref"])
def test_tls_client_against_plain_server_fails_fast(certs, make_tls_server, kind):
    srv = make_tls_server(None, kind=kind)
    with pytest.raises(TLSError, match="plain ZEO greeting.*does not use TLS"):
        ClientStorage(srv.addr, ssl=client_context(certs), wait_timeout=30)


@pytest.mark.parametrize("kind", ["ours", "ref"])
def test_plain_client_against_tls_server_names_tls(certs, make_tls_server, kind):
    srv = make_tls_server(certs, kind=kind)
    # The server waits for a ClientHello and we for its greeting: the greeting wait (10 s)
    # ends it, before wait_timeout, with an error that names TLS.
    with pytest.raises(TLSError, match="no ZEO greeting.*TLS server"):
        ClientStorage(srv.addr, wait_timeout=60)


# -- interop with ZEO 6.2 ----------------------------------------------------------------

REF_TLS_CLIENT = """
import ssl, sys, transaction, ZODB, ZEO
from persistent.mapping import PersistentMapping
host, port, certs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=certs + "/ca.pem")
ctx.load_cert_chain(certs + "/alice.crt", certs + "/alice.key")
db = ZEO.DB((host, port), ssl=ctx, ssl_server_hostname="localhost", wait_timeout=30)
with db.transaction() as conn:
    conn.root()["ref"] = PersistentMapping(value="from ZEO 6.2")
with db.transaction() as conn:
    print(conn.root()["ref"]["value"], sorted(conn.root().keys()))
db.close()
"""


def test_ref_client_against_our_tls_server(certs, make_tls_server, closing):
    srv = make_tls_server(certs)
    host, port = srv.addr
    out = run_ref(REF_TLS_CLIENT, host, str(port), str(certs), timeout=90).stdout
    assert "from ZEO 6.2 ['ref']" in out
    db = closing(ZODB.DB(ClientStorage(srv.addr, ssl=client_context(certs, "bob"))))
    with db.transaction() as conn:
        assert conn.root()["ref"]["value"] == "from ZEO 6.2"


def test_our_client_against_ref_tls_server(certs, make_tls_server, closing):
    srv = make_tls_server(certs, kind="ref")
    commit_and_read(lambda: ClientStorage(srv.addr, ssl=client_context(certs)), closing)


def test_our_client_refused_by_ref_tls_server(certs, make_tls_server):
    srv = make_tls_server(certs, kind="ref")
    with pytest.raises(TLSError, match="TLS"):
        ClientStorage(srv.addr, ssl=client_context(certs, "stranger"), wait_timeout=30)


# -- the transport itself ------------------------------------------------------------------

def _echo_server(certs: Path, listener: socket.socket, done: threading.Event) -> None:
    """Accept one TLS connection and echo everything back until the peer closes."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / "server.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    raw, _ = listener.accept()
    try:
        with ctx.wrap_socket(raw, server_side=True) as s:
            s.settimeout(60)
            while True:
                data = s.recv(1 << 16)
                if not data:
                    break
                s.sendall(data)
    except OSError:
        pass
    finally:
        done.set()


def test_transport_concurrent_send_and_recv(certs):
    """A writer thread and the reading thread share one TLSTransport: every byte sent comes
    back in order, while the server's post-handshake session tickets are read and nothing
    interleaves (an SSLSocket shared this way would corrupt its state)."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()
    t = threading.Thread(target=_echo_server, args=(certs, listener, done), daemon=True)
    t.start()
    sock = socket.create_connection(listener.getsockname(), timeout=30)
    transport = open_tls_transport(sock, sock.getpeername()[:2], client_context(certs),
                                   None, timeout=30)
    assert isinstance(transport, TLSTransport) and isinstance(transport, SocketTransport)
    sock.settimeout(60)
    chunks = [os.urandom(1 + i * 997 % 70000) for i in range(300)] + [os.urandom(3 << 20)]
    expected = b"".join(chunks)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for c in chunks:
                transport.sendall(c)
        except BaseException as e:  # reported below
            errors.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    got = bytearray()
    while len(got) < len(expected):
        data = transport.recv(1 << 18)
        assert data, "the echo server closed early"
        got += data
    writer.join(30)
    assert not errors
    assert bytes(got) == expected
    transport.close()
    assert done.wait(30)
    listener.close()


def test_a_refused_tls_connection_leaves_no_cycle(certs, make_tls_server):
    """The constructor's TLSError, once dropped, frees the caller's frame without the cyclic
    collector (issue 21: docs/client.rst, "The collector and the pickle cache")."""
    import gc
    import weakref

    class Marker:
        pass

    srv = make_tls_server(certs)

    def application() -> weakref.ref:
        marker = Marker()
        with pytest.raises(TLSError):
            ClientStorage(srv.addr, ssl=client_context(certs),
                          ssl_server_hostname="db.example.com")
        return weakref.ref(marker)

    gc.collect()
    gc.disable()
    try:
        assert application()() is None
    finally:
        gc.enable()
