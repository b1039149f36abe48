#!/usr/bin/env bash
# Starts the gateway on its embedded default: SQLite in ./data, no Redis. Proxy on :8080, admin on 127.0.0.1:9090.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/trioproxy" serve "$@"
