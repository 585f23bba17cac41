#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the test suite. CI runs exactly this.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
# Test files run in parallel worker processes (pytest-xdist), each file whole on one worker so
# its module-scoped fixtures (compiled steps, trained teachers) are built once: about half the
# wall time on 2 cores. DISTILL_JAX_TEST_WORKERS=0 runs everything in this process.
workers="${DISTILL_JAX_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadfile); fi
exec python -m pytest "${parallel[@]}" "$@"  # No path given: setup.cfg's testpaths (tests/).
