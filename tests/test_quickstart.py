"""The README's quickstart table is what `scripts/quickstart.py` prints, in this environment.

The test reruns the main job exactly as `bash scripts/quickstart.sh` does (a subprocess with
XLA_FLAGS unset, the default devices, 3 seeds) and compares its table.md with the README's
section between the quickstart-table markers. The text must be identical once numbers are
masked (same rows, models, regimes and verdicts), and every number must agree within
TOLERANCE points. Why not exactly: on one machine and one environment the job is
deterministic, but XLA:CPU may vectorise reductions differently on another CPU model, which
flips the odd borderline prediction; one flip moves a seed's top-1 by 100/297 = 0.34 points, a
3-seed mean by 0.11. 0.5 points allows about one flip per seed in a mean (or a std), and still
catches an environment that moves the results: the drift that made this test (a dependency
update) moved the all-label KD std by 1.04 points and the 300-label KD mean by 0.67.
Regenerate the README's table with `bash scripts/quickstart.sh --update_readme`.
"""

import os
import re
import subprocess
import sys

from conftest import ROOT

TOLERANCE = 0.5
START, END = "<!-- quickstart-table:start -->", "<!-- quickstart-table:end -->"
NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def test_readme_table_is_what_quickstart_writes(tmp_path, data_dir):
  # The markers of scripts/quickstart.py (not imported: its absl flags would clash with others).
  readme = open(os.path.join(ROOT, "README.md")).read()
  readme = readme.split(START)[1].split(END)[0].strip("\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "quickstart.py"),
                         f"--workdir={tmp_path}", f"--data_dir={data_dir}"], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = open(tmp_path / "table.md").read().strip("\n")
  assert written in proc.stdout  # The file holds what the job printed.
  assert os.path.exists(tmp_path / "curves.png")

  assert NUMBER.sub("#", written) == NUMBER.sub("#", readme), (written, readme)
  ours, theirs = NUMBER.findall(written), NUMBER.findall(readme)
  diffs = [(a, b) for a, b in zip(ours, theirs, strict=True)
           if abs(float(a) - float(b)) > TOLERANCE]
  assert not diffs, f"README table differs from this run's (printed, README):\n{written}"
