#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs distill-jax
# with its test and plot extras. Idempotent: reinstalls only when setup.cfg changed.
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
want="$(cat "$root/setup.cfg" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing distill-jax and its dependencies into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$root[test,plots]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
