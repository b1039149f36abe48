#!/usr/bin/env bash
# Runs the whole suite: lint (ruff), types (mypy --strict), then pytest (unit + integration, SQLite and PostgreSQL,
# official SDKs against the in-repo fake upstream). Starts PostgreSQL and Redis when they are down; under CI=true a
# missing service fails the run instead of skipping its tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/bootstrap.sh" dev
"$root/scripts/services.sh"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
