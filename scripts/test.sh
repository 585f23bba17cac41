#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the test suite. CI runs exactly this.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec python -m pytest "$@"  # No path given: setup.cfg's testpaths (tests/).
