"""The Sphinx documentation: it builds with warnings as errors, its configuration reference has
every key of the schema, and every code example in it runs (doctest blocks here, included
example files in test_docs_examples.py)."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs_examples import TESTED_EXAMPLES

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.rst"))


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    r = subprocess.run(
        [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=150,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""
    return out


def test_builds_without_warnings(html):
    for page in PAGES:
        assert (html / f"{page.stem}.html").exists(), page.name


def _schema_keys(sectiontype: str, schema_text: str) -> set[str]:
    """Key names ZConfig itself knows for ``sectiontype`` (the reference must list them)."""
    import io

    import ZConfig

    schema = ZConfig.loadSchemaFile(io.StringIO(schema_text))
    return {name for name, info in schema.gettype(sectiontype) if name}


SERVER_SCHEMA = '<schema><import package="ZEO" file="server.xml"/></schema>'
CLIENT_SCHEMA = '<schema><import package="ZEO"/></schema>'


@pytest.mark.parametrize("page,sectiontype,schema", [
    ("configuration", "zeo", SERVER_SCHEMA),
    ("configuration", "ssl", SERVER_SCHEMA),
    ("configuration", "metrics", SERVER_SCHEMA),
    ("security", "authorization", SERVER_SCHEMA),
    ("client", "clientstorage", CLIENT_SCHEMA),
])
def test_reference_lists_every_key(html, page, sectiontype, schema):
    keys = _schema_keys(sectiontype, schema)
    assert keys  # the schema was read
    text = (html / f"{page}.html").read_text()
    missing = [k for k in sorted(keys) if f'<span class="pre">{k}</span>' not in text]
    assert missing == []


def test_code_examples_are_run_by_tests():
    """Python appears only as doctest blocks (run below) or included example files (run by
    test_docs_examples); configuration files only as included examples."""
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"\.\. code(-block)?:: *(python|py|pycon|ini|text)\s*\n\s*\n\s+"
                             r"(import|from|def|class|\[|<|%)", text), page.name
        for target in re.findall(r"\.\. literalinclude:: \.\./examples/(\S+)", text):
            assert target in TESTED_EXAMPLES, f"{page.name} includes untested {target}"


DOCTEST_PAGES = [p for p in PAGES if ">>> " in p.read_text()]


def test_there_are_doctests():
    assert "quickstart.rst" in [p.name for p in DOCTEST_PAGES]


@pytest.mark.parametrize("page", DOCTEST_PAGES, ids=lambda p: p.name)
def test_doctest_blocks(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples create Data.fs in the current directory
    failures, tried = doctest.testfile(
        str(page), module_relative=False, optionflags=doctest.ELLIPSIS,
        raise_on_error=False, verbose=False,
    )
    assert tried > 0 and failures == 0


def test_zeo_commands_in_the_docs_run(tmp_path):
    """Each ``$ zeo ...`` line of the docs, against a live server with data and an admin
    socket standing in for the documented addresses."""
    import shlex

    from support.servers import filestorage_conf, start_server
    from test_cli import make_data

    commands = [line.strip()[2:] for page in PAGES for line in page.read_text().splitlines()
                if line.strip().startswith("$ zeo ")]
    assert len(commands) >= 8
    make_data(tmp_path / "Data.fs")
    admin = str(tmp_path / "admin.sock")
    srv = start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs"),
                       f"  admin-socket {admin}")
    try:
        address = f"{srv.addr[0]}:{srv.addr[1]}"
        for command in commands:
            command = command.replace("127.0.0.1:8100", address)
            command = command.replace("/var/lib/zeo/admin.sock", admin)
            argv = shlex.split(command, comments=True)[1:]
            r = subprocess.run([sys.executable, "-m", "ZEO.cli", *argv], capture_output=True,
                               text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
            assert r.returncode == 0, (command, r.stdout, r.stderr)
    finally:
        srv.stop()
