"""The experiment scripts in experiments/ run end to end (tiny runs) and write their tables.

Each script runs in a subprocess on one CPU device (conftest's 8 fake devices would split every
batch) and with XLA's CPU back end at optimisation level 0: a tiny run is mostly compiling, and
the smoke test checks the pipeline and the table, not speed.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import cli_env

from distill_jax.config import load_config_file, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_TEACHER = os.path.join(ROOT, "experiments", "multi_teacher_digits", "run.py")
ENSEMBLE_CONFIG = os.path.join(ROOT, "configs", "digits_ensemble.py")
TEACHERS = ("cnn", "cnn_deep", "mlp")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.mark.parametrize("role", [*(f"teacher_{t}" for t in TEACHERS), "student",
                                  *(f"kd_{t}" for t in TEACHERS), "kd_ensemble"])
def test_ensemble_config_roles(role):
  """Every role validates; students list the three teachers and KD names its target."""
  config = load_config_file(f"{ENSEMBLE_CONFIG}:{role}",
                            {f"teachers.{t}.checkpoint": "x" for t in TEACHERS}
                            if not role.startswith("teacher_") else {})
  validate(config)
  if role.startswith("teacher_"):
    assert not config.teachers and list(config.losses) == ["ce"]
    return
  assert sorted(config.teachers) == sorted(TEACHERS)
  assert config.student.name == "mlp" and tuple(config.student.kwargs.hidden) == (32,)
  if role.startswith("kd_"):
    assert (config.losses.ce.weight, config.losses.kd.weight) == (0.1, 0.9)
    target = role.removeprefix("kd_")
    assert config.losses.kd.teacher == (None if target == "ensemble" else target)


def _cells(line):
  return [c.strip() for c in line.strip().strip("|").split("|")]


def test_multi_teacher_digits_tiny(tmp_path, data_dir):
  """The multi-teacher experiment, tiny, 1 seed, the 300-label regime, one aggregation (each
  run costs ~3 s here): every row of the table with finite numbers, and the ensemble KD run
  really distilled from the three teachers."""
  workdir = tmp_path / "multi_teacher"
  proc = subprocess.run(
      [sys.executable, MULTI_TEACHER, "--tiny", "--seeds=1", "--regimes=300",
       "--aggregations=mean", f"--workdir={workdir}", f"--data_dir={data_dir}"],
      capture_output=True, text=True, env={**cli_env(), "XLA_FLAGS": FAST_COMPILE}, cwd=ROOT,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (workdir / "table.md").read_text()
  assert table.strip() in proc.stdout
  rows = {_cells(line)[0]: _cells(line)[1:] for line in table.splitlines()
          if line.startswith("| ") and not line.startswith("| model")}
  labels = ["ensemble of the 3 teachers", "student alone",
            *(f"student + KD from {t}" for t in TEACHERS),
            "student + KD from the ensemble (mean)"]
  for label in labels:
    assert label in rows, (label, table)
  teacher_rows = [r for r in rows if r.startswith("teacher ")]
  assert [r.split()[1] for r in teacher_rows] == list(TEACHERS)
  assert sum("the best" in r for r in teacher_rows) == 1
  assert len(rows) == len(labels) + len(TEACHERS)
  for label, (data, top1, agreement) in rows.items():
    assert data == ("300 train images" if label.startswith("student") else
                    "all 1500 train images"), label
    for cell in (top1, agreement) if label.startswith("student") else (top1,):
      value = float(cell)
      assert math.isfinite(value) and 0 <= value <= 100, (label, cell)
  verdicts = [line for line in table.splitlines() if line.startswith("- ")]
  assert len(verdicts) == 2 and all(re.search(r"[+-]\d+\.\d\d points", v) for v in verdicts)

  run = workdir / "kd_ensemble_mean_300_seed0"
  result = json.loads((run / "result.json").read_text())
  assert sorted(result["teachers"]) == sorted(TEACHERS) and "kd" in result["losses"]
  assert "eval/teacher_top1/ensemble" in result["final"]
  config = json.loads((run / "config.json").read_text())
  assert config["losses"]["kd"]["teacher"] is None
  assert config["losses"]["kd"]["aggregation"] == "mean"
  assert config["data"]["train_subset"] == 300
  assert all(config["teachers"][t]["checkpoint"] == str(workdir / f"teacher_{t}")
             for t in TEACHERS)
  single = json.loads((workdir / "kd_cnn_300_seed0" / "config.json").read_text())
  assert single["losses"]["kd"]["teacher"] == "cnn"
