#!/usr/bin/env bash
# Write the keys docker compose mounts as secrets (once; existing keys are kept):
#   secrets/admin_key         Triton's model-repository, shared-memory, trace and logging APIs
#                             (HTTP header 'admin-key', gRPC metadata 'triton-grpc-protocol-admin-key')
#   secrets/gateway_api_keys  the OpenAI gateway's callers ('Authorization: Bearer <key>'; one per line)
# Random (32 bytes, URL-safe), mode 0600, in a 0700 folder that git and docker build ignore.
set -euo pipefail
DIR=${1:-"$(cd "$(dirname "$0")/.." && pwd)/secrets"}
umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"
for name in admin_key gateway_api_keys; do
  if [ ! -s "$DIR/$name" ]; then
    python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "$DIR/$name"
    echo "wrote $DIR/$name"
  else
    echo "kept $DIR/$name"
  fi
done
