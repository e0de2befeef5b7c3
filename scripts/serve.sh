#!/usr/bin/env bash
# Set up (idempotent) and serve the embedded default model on HTTP :8000, gRPC :8001, metrics :8002.
# Extra arguments go to `triton-diffusion serve` (e.g. --models stable_diffusion_tiny,sd_turbo).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/triton-diffusion" serve "$@"
