"""ZEO.address: the one set of address rules of the server, the client and the tools."""

from __future__ import annotations

import io

import pytest

from ZEO import address
from ZEO.scripts import zeopack


@pytest.mark.parametrize("text, addr", [
    ("[::1]:8100", ("::1", 8100)),
    ("localhost:8100", ("localhost", 8100)),
    (":8100", ("127.0.0.1", 8100)),
    ("8100", ("127.0.0.1", 8100)),
    ("/var/run/zeo.sock", "/var/run/zeo.sock"),
    ("./zeo.sock", "./zeo.sock"),
])
def test_parse(text, addr):
    assert address.parse(text) == addr
    assert address.parse(address.format(addr)) == addr or addr[0] == "127.0.0.1"


@pytest.mark.parametrize("text", ["localhost", "zeo.sock", "host:port", "[::1]", "::1:8100",
                                  "h:99999", ""])
def test_parse_refuses_what_it_would_have_to_guess(text):
    with pytest.raises(ValueError, match="use host:port, \\[v6\\]:port, a port, or a Unix"):
        address.parse(text)


def test_a_bare_host_gets_a_hint():
    with pytest.raises(ValueError, match=r"did you mean localhost:PORT\?"):
        address.parse("localhost")


def test_normalize_for_clients_and_servers():
    assert address.normalize(8100) == [("127.0.0.1", 8100)]
    assert address.normalize(("", 8100)) == [("127.0.0.1", 8100)]
    assert address.normalize(("", 8100), binding=True) == [("", 8100)]
    assert address.normalize(["/s", ["h", "9"]]) == ["/s", ("h", 9)]
    for bad in ([], None, True, ("h", 1, 2), (None, 1)):
        with pytest.raises(ValueError):
            address.normalize(bad)


@pytest.mark.parametrize("text, expected", [
    ("zeo.example.com:8100", (("zeo.example.com", 8100), "1")),
    ("h:8100:main", (("h", 8100), "main")),
    ("[::1]:8100:main", (("::1", 8100), "main")),
    ("[::1]:8100", (("::1", 8100), "1")),
    ("8100", (("127.0.0.1", 8100), "1")),
    ("8100:main", (("127.0.0.1", 8100), "main")),
])
def test_zeopack_servers_use_the_same_rules(text, expected):
    assert zeopack.parse_server(text) == expected


@pytest.mark.parametrize("text", ["localhost", "h:x:main", "/a/path"])
def test_zeopack_refuses_other_servers(text):
    with pytest.raises(zeopack.UsageError):
        zeopack.parse_server(text)


def test_every_tool_reads_localhost_alone_the_same_way(capsys):
    from ZEO import cli, nagios

    err = io.StringIO()
    assert cli.run(["localhost"], err=err) == 2
    assert "did you mean localhost:PORT" in err.getvalue()
    with pytest.raises(SystemExit) as exc:
        nagios.main(["localhost"])
    assert exc.value.code == 3 and "did you mean localhost:PORT" in capsys.readouterr().err
    with pytest.raises(zeopack.UsageError):
        zeopack.parse_server("localhost")
