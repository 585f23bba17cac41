"""The launcher registry: `local` and `slurm` are built in; another scheduler is one file.

A launcher is a class registered with `@LAUNCHERS.register('name')` that has
- `add_flags(parser)`: its own command-line flags (an argparse parser; may add none);
- `launch(root, trials, args) -> int`: runs (or submits) the trials that are not done, in stage
  order, in `ROOT/<trial>`; returns the exit code for the `sweep` command;
- `states(root, trials) -> {name: state}`: every trial's state (see `state.STATES`), for
  `distill-jax sweep status`;
- optionally `unavailable(args) -> str | None`: why it cannot launch on this machine (e.g. no
  `sbatch` on PATH), checked before anything is validated or written.
Trials' records on disk (`state.py`) are shared, so `report` reads any launcher's sweep.
"""

from __future__ import annotations

import importlib

from distill_jax.common.registry import Registry

LAUNCHERS = Registry("launcher")
BUILT_IN = ("distill_jax.sweep.local", "distill_jax.sweep.slurm")


def load_launchers() -> Registry:
  """Imports the built-in launchers (each registers itself) and returns the registry."""
  for module in BUILT_IN:
    importlib.import_module(module)
  return LAUNCHERS
