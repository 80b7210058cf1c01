"""The import rules of docs/design.rst, checked on the source: the protocol core does no I/O
and knows neither side; the server and the client never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ZEO"
IO_MODULES = {"socket", "asyncio", "selectors", "ssl", "threading", "uvloop", "select"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def _under(names: set[str], prefix: str) -> list[str]:
    return sorted(n for n in names if n == prefix or n.startswith(prefix + "."))


@pytest.mark.parametrize("path", modules("protocol"), ids=lambda p: p.name)
def test_protocol_core_does_no_io_and_knows_no_side(path):
    names = imported(path)
    assert not {n.split(".")[0] for n in names} & IO_MODULES, names
    assert not _under(names, "ZEO.server") and not _under(names, "ZEO.client")


@pytest.mark.parametrize("path", modules("server"), ids=lambda p: p.name)
def test_server_never_imports_the_client(path):
    assert not _under(imported(path), "ZEO.client")


@pytest.mark.parametrize("path", modules("client"), ids=lambda p: p.name)
def test_client_never_imports_the_server(path):
    assert not _under(imported(path), "ZEO.server")


def test_the_check_sees_relative_imports():
    names = imported(PACKAGE / "server" / "session.py")
    assert "ZEO.protocol" in names and "ZEO.server.commit" in names
