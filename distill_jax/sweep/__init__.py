"""Sweeps: a grid of runs from a spec, launched locally or on Slurm, collected into a report.

- `spec.py`: `get_sweep(arg)` specs (points, `product`/`zip`/`seeds`, stages), expansion into
  trials (training runs, or scripts such as generate.py), validation of every trial's
  config before anything runs.
- `launch.py`: the launcher registry; `local.py` (subprocesses) and `slurm.py` (job arrays)
  register themselves there, `trial.py` runs one trial inside a scheduler's job.
- `state.py`: the records a sweep leaves on disk (trials.json, trial.json, trial.log).
- `report.py`: every trial's result.json -> mean ± std tables, paper gaps, figures.
- `cli.py`: the `sweep`, `sweep status` and `report` sub-commands.
"""

from distill_jax.sweep.spec import (
    Point,
    Sweep,
    SweepError,
    Trial,
    args,
    axis,
    expand,
    fixed,
    load_spec,
    load_trials,
    named,
    product,
    script,
    seeds,
    validate_trials,
    with_overrides,
    zip,
)

__all__ = ["Point", "Sweep", "SweepError", "Trial", "args", "axis", "expand", "fixed",
           "load_spec", "load_trials", "named", "product", "script", "seeds", "validate_trials",
           "with_overrides", "zip"]
