#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the tested,
# pinned dependencies from requirements.lock (every file checked against its hash), then
# distill-jax itself (editable). Idempotent: reinstalls only when the lock or setup.cfg changed.
# Usage: source scripts/setup_env.sh   (or bash scripts/setup_env.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DISTILL_JAX_VENV:-$root/.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating virtual environment $venv with $python" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.distill_jax_installed"
want="$(cat "$root/requirements.lock" "$root/setup.cfg" "$root/pyproject.toml" | sha256sum \
        | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing the pinned dependencies (requirements.lock) and distill-jax into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --require-hashes -r "$root/requirements.lock"
  # The build uses the pinned setuptools (no isolated build environment to fetch another);
  # its notice about editable installs is only advice to developers of setuptools' users.
  PYTHONWARNINGS="ignore:Editable installation" \
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
