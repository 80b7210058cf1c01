"""ZConfig: the server schema (runzeo -C), zeoctl's schema, <ssl>, runzeo's option parsing.

Everything here parses configuration only; tests that run servers are in test_runzeo.py.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import subprocess
import sys
import textwrap

import pytest
import ZConfig

from support.refzeo import ref_python
from ZEO import runzeo, zconfig


def parse(text: str, overrides=(), schema=zconfig.SCHEMA_PATH):
    return runzeo.load_config(io.StringIO(textwrap.dedent(text)), list(overrides), schema)


def options(text: str) -> runzeo.ServerOptions:
    return runzeo.options_from_config(parse(text))


def test_minimal_config_defaults(monkeypatch):
    monkeypatch.delenv("ZEO_MSGPACK", raising=False)
    o = options("""
        <zeo>
          address 8100
        </zeo>
        <mappingstorage/>
    """)
    assert o.addresses == [("", 8100)]
    assert [s.storage_id for s in o.storages] == ["1"]
    assert (o.read_only, o.invalidation_queue_size, o.invalidation_age) == (False, 100, None)
    assert (o.transaction_timeout, o.pid_filename, o.client_conflict_resolution) == (
        30.0, None, False)  # ZEO has no timeout by default; a silent voter would block all
    assert o.msgpack is False and o.ssl_context is None and o.eventlog is None


def test_every_zeo_key(tmp_path):
    o = options(f"""
        <zeo>
          address 127.0.0.1:0
          read-only true
          invalidation-queue-size 7
          invalidation-age 3.5
          transaction-timeout 12
          pid-filename {tmp_path}/zeo.pid
          client-conflict-resolution yes
          msgpack on
        </zeo>
        <mappingstorage main/>
    """)
    assert o.addresses == [("127.0.0.1", 0)]
    assert o.read_only is True
    assert o.invalidation_queue_size == 7
    assert o.invalidation_age == 3.5
    assert o.transaction_timeout == 12
    assert o.pid_filename == f"{tmp_path}/zeo.pid"
    assert o.client_conflict_resolution is True
    assert o.msgpack is True
    assert [s.storage_id for s in o.storages] == ["main"]


@pytest.mark.parametrize("env, expected", [("1", True), ("", False)])
def test_msgpack_defaults_to_environment(monkeypatch, env, expected):
    monkeypatch.setenv("ZEO_MSGPACK", env)
    o = options("<zeo>\naddress 1\n</zeo>\n<mappingstorage/>\n")
    assert o.msgpack is expected
    o = options("<zeo>\naddress 1\nmsgpack false\n</zeo>\n<mappingstorage/>\n")
    assert o.msgpack is False


def test_address_forms_and_several_addresses(tmp_path):
    sock = f"{tmp_path}/zeo.sock"
    o = options(f"""
        <zeo>
          address localhost:9000
          address [::1]:9001
          address {sock}
        </zeo>
        <mappingstorage/>
    """)
    assert o.addresses == [("localhost", 9000), ("::1", 9001), sock]


def test_every_storage_type_with_names(tmp_path):
    o = options(f"""
        <zeo>
          address 1
        </zeo>
        <filestorage>
          path {tmp_path}/Data.fs
        </filestorage>
        <blobstorage blobs>
          blob-dir {tmp_path}/blobs
          <filestorage>
            path {tmp_path}/b.fs
          </filestorage>
        </blobstorage>
        <mappingstorage m/>
        <demostorage d>
          <filestorage base>
            path {tmp_path}/base.fs
          </filestorage>
        </demostorage>
        <zeoclient fan>
          server 127.0.0.1:9
        </zeoclient>
    """)
    specs = {s.storage_id: s for s in o.storages}
    assert list(specs) == ["1", "blobs", "m", "d", "fan"]
    assert specs["1"].paths == [f"{tmp_path}/Data.fs"]
    assert specs["blobs"].paths == [f"{tmp_path}/b.fs"]
    assert specs["m"].paths == []
    assert specs["d"].paths == [f"{tmp_path}/base.fs"]
    assert specs["fan"].paths == []
    assert type(specs["fan"].opener).__name__ == "ZEOClient"
    storage = specs["m"].opener.open()
    try:
        assert type(storage).__name__ == "MappingStorage"
    finally:
        storage.close()


@pytest.mark.parametrize("text, message", [
    ("<zeo>\naddress 1\n</zeo>\n<mappingstorage/>\n<mappingstorage 1/>\n",
     "two storages named '1'"),
    ("<zeo>\naddress 1\n</zeo>\n<mappingstorage a/>\n<mappingstorage a/>\n", "'a'"),
    ("<zeo>\naddress 1\n</zeo>\n", "storage"),
    ("<mappingstorage/>\n", "zeo"),
    ("<zeo>\n</zeo>\n<mappingstorage/>\n", "address"),
    ("<zeo>\naddress 1\nread-only maybe\n</zeo>\n<mappingstorage/>\n", "maybe"),
    ("<zeo>\naddress 1\nno-such-key 1\n</zeo>\n<mappingstorage/>\n", "no-such-key"),
    ("<zeo>\naddress 1\npid-filename /no/such/dir/zeo.pid\n</zeo>\n<mappingstorage/>\n",
     "/no/such/dir"),
])
def test_bad_configurations_are_usage_errors(text, message):
    with pytest.raises(runzeo.UsageError) as info:
        options(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides():
    o = runzeo.options_from_config(parse(
        "<zeo>\naddress 1\n</zeo>\n<mappingstorage/>\n",
        ["zeo/read-only=true", "zeo/transaction-timeout=2.5"]))
    assert o.read_only is True and o.transaction_timeout == 2.5


def test_eventlog_and_runner(tmp_path):
    root = parse(f"""
        <zeo>
          address 1
        </zeo>
        <mappingstorage/>
        <eventlog>
          level WARNING
          <logfile>
            path {tmp_path}/zeo.log
          </logfile>
        </eventlog>
        <runner>
          program runzeo -C zeo.conf
          socket-name {tmp_path}/zdsock
        </runner>
    """)
    assert root.runner.program == ["runzeo", "-C", "zeo.conf"]
    assert root.eventlog is not None


def test_zeoctl_schema_requires_runner_and_names():
    base = "<zeo>\naddress 1\n</zeo>\n"
    runner = "<runner>\nprogram runzeo\n</runner>\n"
    schema = zconfig.ZEOCTL_SCHEMA_PATH
    parse(base + runner + "<mappingstorage main/>\n", schema=schema)
    with pytest.raises(runzeo.UsageError, match="runner"):
        parse(base + "<mappingstorage main/>\n", schema=schema)
    with pytest.raises(runzeo.UsageError):
        parse(base + runner + "<mappingstorage/>\n", schema=schema)


def test_import_zeo_in_a_server_config_is_harmless():
    o = options("%import ZEO\n<zeo>\naddress 1\n</zeo>\n<mappingstorage/>\n")
    assert [s.storage_id for s in o.storages] == ["1"]


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("client@example.com")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(d / "client_cert.pem"))
    client_cert.private_key_pem.write_to_path(str(d / "client_key.pem"))
    return d


def test_server_ssl_section(certs):
    o = options(f"""
        <zeo>
          address 1
          <ssl>
            certificate {certs}/server.pem
            authenticate {certs}/ca.pem
          </ssl>
        </zeo>
        <mappingstorage/>
    """)
    ctx = o.ssl_context
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert ctx.check_hostname is False
    assert ctx.cert_store_stats()["x509_ca"] == 1


def test_server_ssl_needs_authenticate(certs):
    with pytest.raises(runzeo.UsageError, match="authenticate"):
        options(f"""
            <zeo>
              address 1
              <ssl>
                certificate {certs}/server.pem
              </ssl>
            </zeo>
            <mappingstorage/>
        """)


# --- client sections ----------------------------------------------------------------------------


def client_config(text: str):
    return ZODB_config_storage(textwrap.dedent(text))


def ZODB_config_storage(text: str):
    """The factory ZODB.config builds for one storage section (not opened)."""
    import ZODB.config

    schema = ZODB.config.getStorageSchema()
    root, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    return root.storage


def test_clientstorage_every_key(tmp_path, certs):
    factory = client_config(f"""
        %import ZEO
        <clientstorage>
          server 127.0.0.1:8100
          server 8101
          server {tmp_path}/zeo.sock
          storage main
          cache-size 5MB
          cache-path {tmp_path}/cache
          blob-dir {tmp_path}/blobs
          shared-blob-dir true
          blob-cache-size 1GB
          blob-cache-size-check 20
          read-only false
          read-only-fallback true
          server-sync true
          wait-timeout 7
          client-label app1
          name the-name
          address-policy random
          <ssl>
            certificate {certs}/client_cert.pem
            key {certs}/client_key.pem
            authenticate {certs}/ca.pem
            check-hostname false
            server-hostname zeo.example.com
          </ssl>
        </clientstorage>
    """)
    assert isinstance(factory, zconfig.ClientStorageConfig)
    addresses, kw = factory.client_arguments()
    assert addresses == [("127.0.0.1", 8100), ("127.0.0.1", 8101), f"{tmp_path}/zeo.sock"]
    ctx = kw.pop("ssl")
    assert kw == dict(
        storage="main", cache_size=5 * 1024 * 1024, cache=f"{tmp_path}/cache",
        blob_dir=f"{tmp_path}/blobs", shared_blob_dir=True, blob_cache_size=1 << 30,
        blob_cache_size_check=20, read_only=False, read_only_fallback=True,
        server_sync=True, wait_timeout=7, client_label="app1", name="the-name",
        ssl_server_hostname="zeo.example.com", address_policy="random",
    )
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is False


def test_clientstorage_defaults():
    factory = client_config("%import ZEO\n<clientstorage>\nserver 8100\n</clientstorage>\n")
    addresses, kw = factory.client_arguments()
    assert addresses == [("127.0.0.1", 8100)]
    assert kw == dict(storage="1", cache_size=20 * 1024 * 1024, name="", blob_dir=None,
                      shared_blob_dir=False, read_only=False, read_only_fallback=False,
                      server_sync=False, wait_timeout=30, address_policy="fastest")


def test_client_ssl_checks_hostname_by_default(certs):
    factory = client_config(f"""
        %import ZEO
        <clientstorage>
          server 8100
          <ssl>
            certificate {certs}/client_cert.pem
            key {certs}/client_key.pem
            authenticate {certs}/ca.pem
          </ssl>
        </clientstorage>
    """)
    _, kw = factory.client_arguments()
    assert kw["ssl"].check_hostname is True
    assert kw["ssl_server_hostname"] is None


def test_clientstorage_needs_server():
    with pytest.raises(ZConfig.ConfigurationError, match="server"):
        client_config("%import ZEO\n<clientstorage>\n</clientstorage>\n")


# --- runzeo's command line ----------------------------------------------------------------------


def test_command_line_without_config(tmp_path, monkeypatch):
    monkeypatch.delenv("INSTANCE_HOME", raising=False)
    o = runzeo.parse_options([
        "-a", "127.0.0.1:0", "--address", f"{tmp_path}/s", "-f", f"{tmp_path}/a.fs",
        "--filename", f"{tmp_path}/b.fs", "-t", "2.5", "--pid-file", f"{tmp_path}/p"])
    assert o.addresses == [("127.0.0.1", 0), f"{tmp_path}/s"]
    assert [(s.storage_id, s.paths) for s in o.storages] == [
        ("1", [f"{tmp_path}/a.fs"]), ("2", [f"{tmp_path}/b.fs"])]
    assert o.transaction_timeout == 2.5
    assert o.pid_filename == f"{tmp_path}/p"


def test_command_line_overrides_config(tmp_path):
    conf = tmp_path / "zeo.conf"
    conf.write_text(f"<zeo>\naddress 1\npid-filename {tmp_path}/x.pid\n</zeo>\n"
                    "<mappingstorage/>\n")
    o = runzeo.parse_options(["-C", str(conf), "-a", "2", "-t", "3", "-X",
                              "zeo/read-only=true"])
    assert o.addresses == [("", 2)]
    assert o.transaction_timeout == 3.0
    assert o.read_only is True
    assert o.pid_filename == f"{tmp_path}/x.pid"


def test_instance_home_pid_file(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANCE_HOME", str(tmp_path))
    o = runzeo.parse_options(["-a", "1", "-f", f"{tmp_path}/a.fs"])
    assert o.pid_filename == os.path.join(str(tmp_path), "var", "ZEO.pid")


def run_runzeo(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ZEO.runzeo", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    ([], "no server address specified; use -a or -C"),
    (["-a", "1"], "no storages specified; use -f or -C"),
    (["-f", "x.fs"], "no server address specified"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["-C", "/no/such/zeo.conf"], "/no/such/zeo.conf"),
    (["-t", "soon", "-a", "1", "-f", "x.fs"], "invalid float value"),
    (["-a", "1", "-f", "x.fs", "-X", "zeo/read-only=true"], "-X needs"),
    (["-a", "host:notaport", "-f", "x.fs"], "notaport"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    result = run_runzeo(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_config_error_exit_2(tmp_path):
    conf = tmp_path / "zeo.conf"
    conf.write_text("<zeo>\n  address 1\n  read-only perhaps\n</zeo>\n<mappingstorage/>\n")
    result = run_runzeo("-C", str(conf))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "perhaps" in result.stderr and "line 3" in result.stderr


def test_help_and_version():
    result = run_runzeo("-h")
    assert result.returncode == 0
    for option in ("--configure", "--address", "--filename", "--timeout", "--pid-file",
                   "--test", "--version", "-X"):
        assert option in result.stdout
    result = run_runzeo("--version")
    assert result.returncode == 0 and "zeo-ng" in result.stdout


# --- same acceptance as the real ZEO ------------------------------------------------------------

REF_CHECK = """
import io, json, sys, ZConfig, ZEO, os
schema = ZConfig.loadSchema(os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))
out = []
for text in json.loads(sys.stdin.read()):
    try:
        ZConfig.loadConfigFile(schema, io.StringIO(text))
        out.append(None)
    except ZConfig.ConfigurationError as e:
        out.append(str(e))
print(json.dumps(out))
"""


def test_configs_accepted_by_real_zeo_are_accepted(tmp_path):
    """Run a set of config files through the real ZEO 6.2 schema and ours: same verdicts."""
    (tmp_path / "blobs").mkdir()
    configs = [
        "<zeo>\naddress 8100\n</zeo>\n<mappingstorage/>\n",
        f"<zeo>\naddress {tmp_path}/sock\nread-only on\n</zeo>\n<mappingstorage 1/>\n",
        f"<zeo>\naddress [::1]:0\ninvalidation-queue-size 5\ninvalidation-age 9\n"
        f"transaction-timeout 30\npid-filename {tmp_path}/pid\nmsgpack true\n"
        f"client-conflict-resolution true\n</zeo>\n"
        f"<filestorage a>\npath {tmp_path}/a.fs\n</filestorage>\n"
        f"<blobstorage b>\nblob-dir {tmp_path}/blobs\n<filestorage>\npath {tmp_path}/b.fs\n"
        f"</filestorage>\n</blobstorage>\n<zeoclient c>\nserver 9\n</zeoclient>\n",
        f"<zeo>\naddress 1\n</zeo>\n<mappingstorage/>\n<eventlog>\nlevel INFO\n<logfile>\n"
        f"path {tmp_path}/log\n</logfile>\n</eventlog>\n<runner>\nprogram runzeo\n</runner>\n",
        # rejected by both
        "<zeo>\naddress 1\nread-only maybe\n</zeo>\n<mappingstorage/>\n",
        "<zeo>\naddress 1\nfoo 2\n</zeo>\n<mappingstorage/>\n",
        "<mappingstorage/>\n",
        "<zeo>\naddress 1\n</zeo>\n",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(ref_python()), "-c", REF_CHECK], input=json.dumps(configs),
                    capture_output=True, text=True, timeout=120, env=env, check=True)
    ref_verdicts = json.loads(result.stdout)
    ours = []
    for text in configs:
        try:
            parse(text)
            ours.append(True)
        except runzeo.UsageError:
            ours.append(False)
    assert ours == [v is None for v in ref_verdicts], ref_verdicts
    assert ours[:4] == [True] * 4 and ours[4:] == [False] * 4
