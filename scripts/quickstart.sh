#!/usr/bin/env bash
# The main job, from nothing: set up .venv, then train a teacher and distill a student on the
# embedded digits, printing a table. Usage: bash scripts/quickstart.sh [--workdir=DIR] [--seeds=N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec python scripts/quickstart.py "$@"
