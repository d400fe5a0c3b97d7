#!/usr/bin/env bash
# Install everything needed (idempotent) and run the lint and the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-k spatial`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu"; fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
