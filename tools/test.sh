#!/usr/bin/env bash
# Install everything and run the whole test suite (the README's second command; CI runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e '.[test]' || exit 1
python3 -m ruff check src tests benchmarks examples || exit 1
# The reference ZEO 6.2 venv (for interoperability tests), built once into .cache/.
python3 -c "import sys; sys.path.insert(0, 'tests'); from support.refzeo import ref_python; ref_python()" || exit 1
python3 -m pytest -n "${ZEO_TEST_WORKERS:-2}" -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
