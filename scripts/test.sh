#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python -m pytest -q "$@"
