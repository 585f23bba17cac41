"""Golden numbers: fixed-seed tiny digits runs must reproduce the values stored in
`tests/golden.json` (the last step's loss and loss terms and its learning rate, and the final
eval CE and KL to each teacher).

Every other end-to-end test compares a run with another run of the same code; these catch a
change in what the code computes (a schedule that does not decay, a dropped or re-weighted loss
term, a different optimizer step). The tolerance (`RTOL`) allows float noise between machines
of the same kind, not a changed computation. Eval top-1 is left out: on 297 images it moves in
steps of 1/297.

When a change is meant to alter these numbers, regenerate them and commit the new file with the
change (the diff shows what moved):

    DISTILL_JAX_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py

With the variable set every test rewrites its entry and then fails on purpose, so a run with it
can never pass silently.
"""

import json
import math
import os

import pytest
from conftest import run_digits_cli, tiny, untrained_teacher

from distill_jax.train import loop

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
REGENERATE = os.environ.get("DISTILL_JAX_REGENERATE_GOLDEN") == "1"
RTOL = 2e-4


def run_values(workdir):
  """The numbers a run is pinned by: its last train row's loss, loss terms and lr, and the
  final eval's CE and KLs."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  last = [r for r in rows if "train/loss" in r][-1]
  final = json.load(open(os.path.join(workdir, "result.json")))["final"]
  values = {k: v for k, v in last.items() if k.startswith("train/loss") or k == "train/lr"}
  values.update({k: v for k, v in final.items() if k == "eval/ce" or k.startswith("eval/kl/")})
  return {"step": last["step"], **values}


def check_golden(name, values):
  if REGENERATE:
    stored = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
    stored[name] = values
    with open(GOLDEN, "w") as f:
      json.dump(stored, f, indent=2, sort_keys=True)
      f.write("\n")
    pytest.fail(f"Regenerated {name!r} in {GOLDEN}; review `git diff tests/golden.json`, then "
                "rerun without DISTILL_JAX_REGENERATE_GOLDEN.")
  want = json.load(open(GOLDEN))[name]
  assert sorted(values) == sorted(want), name
  moved = {k: (values[k], want[k]) for k in want
           if not math.isclose(values[k], want[k], rel_tol=RTOL, abs_tol=1e-7)}
  assert not moved, (
      f"{name}: (got, stored) {moved}. If the change is meant to alter these numbers, "
      "regenerate them (see this file's docstring) and commit tests/golden.json with it.")


def run_in_process(name, config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(name))
  loop.train_and_evaluate(config, workdir)
  return run_values(workdir)


def test_kd_through_the_cli(data_dir, teacher_dir, tmp_path):
  """Hinton KD from the CNN teacher (CE 0.1 + KD 0.9, T = 4, cosine lr), 6 steps, via the CLI."""
  run_digits_cli("kd,tiny", tmp_path, data_dir, teacher_dir, "--config.checkpoint_every_steps=0",
                 timeout=300)
  check_golden("kd_cli", run_values(tmp_path))


@pytest.mark.parametrize("method, overrides", [
    # AT with a step schedule decaying at steps 2 and 5 (epochs 0.1, 0.2 of 23 steps).
    ("at", {"optim.schedule": "step", "optim.decay_epochs": (0.1, 0.2)}),
    ("crd", {}),
])
def test_feature_and_contrastive_methods(data_dir, teacher_dir, tmp_path_factory, method,
                                         overrides):
  config = tiny(method, data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                     "parallel.num_devices": 1, "checkpoint_every_steps": 0,
                                     **overrides})
  check_golden(method, run_in_process(method, config, tmp_path_factory))


def test_two_teacher_ensemble(data_dir, teacher_dir, tmp_path_factory):
  """KD from the mixture of the CNN teacher and an untrained MLP teacher; eval reports the KL
  to each teacher and to their ensemble."""
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "parallel.num_devices": 1, "checkpoint_every_steps": 0})
  with config.unlocked():
    config.teachers.mlp = untrained_teacher(tmp_path_factory.mktemp("mlp_teacher"))
  values = run_in_process("ensemble", config, tmp_path_factory)
  assert {"eval/kl/teacher", "eval/kl/mlp", "eval/kl/ensemble"} <= set(values)
  check_golden("ensemble", values)
