#!/usr/bin/env bash
# Creates .venv (if missing) and installs trioproxy into it with its development extras. Sourced by the other
# scripts; safe to run again (pip skips what is already installed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
stamp="$root/.venv/.trioproxy-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$root/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$root/.venv/bin/python" -m pip install --quiet -e "$root[dev]"
    touch "$stamp"
fi
