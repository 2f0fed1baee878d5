#!/usr/bin/env bash
# The whole check CI runs (the README's test command calls it after installing): lint, format, types, then tests.
#   bash scripts/check.sh            everything
#   bash scripts/check.sh -k budget  extra arguments go to pytest
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EDGE_RT_VENV:-$here/.venv}"
cd "$here"
echo "check: ruff check"
"$venv/bin/ruff" check edge_runtime converters
echo "check: ruff format --check"
"$venv/bin/ruff" format --check edge_runtime converters
echo "check: mypy --strict"
"$venv/bin/mypy"
echo "check: pytest"
exec "$venv/bin/python" -m pytest -q "$@"
