#!/usr/bin/env bash
# Set up (idempotent) and run the test suite; the tests start and stop real tritonservers themselves.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -ra "$@"
