#!/usr/bin/env bash
# Install everything and run the whole test suite (the README's second command; CI runs it).
# Outside a virtualenv it makes one in .cache/venv-test (Debian's own Python refuses pip
# installs outside one); it sees the interpreter's installed packages, so nothing already
# there is downloaded again.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -z "${VIRTUAL_ENV:-}" ]; then
    VENV=.cache/venv-test
    if [ ! -x "$VENV/bin/python" ]; then
        mkdir -p .cache
        if ! python3 -m venv --system-site-packages "$VENV"; then
            # Debian ships venv's pip bootstrap separately.
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                rm -rf "$VENV"
                apt-get update -qq && apt-get install -y -qq python3-venv || exit 1
                python3 -m venv --system-site-packages "$VENV" || exit 1
            else
                echo "python3 -m venv failed: install python3-venv (Debian) and retry" >&2
                exit 1
            fi
        fi
    fi
    PY="$VENV/bin/python"
fi
"$PY" -m pip install -q --disable-pip-version-check -e '.[test,relstorage]' || exit 1
# PostgreSQL's server binaries for the RelStorage tests (tests/support/postgres.py starts a
# throw-away cluster as the 'postgres' user): Debian's package when they are missing.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && ! command -v postgres >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq postgresql-15; } ||
            apt-get install -y -qq postgresql || exit 1
    else
        echo "PostgreSQL's server binaries are missing: RelStorage tests will skip" \
             "(apt-get install postgresql-15)" >&2
    fi
fi
"$PY" -m ruff check src tests benchmarks examples || exit 1
# Type-check src/ (pyproject.toml's [tool.mypy]): every ``type: ignore`` is checked too.
"$PY" -m mypy || exit 1
# The reference ZEO 6.2 venv (for interoperability tests), built once into .cache/.
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from support.refzeo import ref_python; ref_python()" || exit 1
"$PY" -m pytest -n "${ZEO_TEST_WORKERS:-2}" -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
