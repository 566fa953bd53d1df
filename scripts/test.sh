#!/usr/bin/env bash
# The test command: lint, format check, then the whole test suite. Exit code 5 (no tests) is a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
echo "==> ruff check" && ruff check .
echo "==> ruff format --check" && ruff format --check .
echo "==> pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
