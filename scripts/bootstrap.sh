#!/usr/bin/env bash
# Creates .venv (if missing) and installs trioproxy into it. Usage: bootstrap.sh [EXTRAS]; EXTRAS is "dev" for
# the test suite (official SDKs, pytest, ruff, mypy, ...), empty to run the gateway only. Safe to run again: it
# reinstalls only when pyproject.toml changed since the last install of those extras.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
stamp="$root/.venv/.trioproxy-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$root/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$root/.venv/bin/python" -m pip install --quiet -e "$root${extras:+[$extras]}"
    touch "$stamp"
fi
