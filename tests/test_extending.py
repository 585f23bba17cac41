"""Runs docs/extending.md exactly: its code blocks become files in a temporary folder, then the
installed `distill-jax` console script lists and trains with them, run from that folder."""

import json
import os
import re
import sys

import conftest
import numpy as np
import orbax.checkpoint as ocp
from conftest import ROOT

DOC = os.path.join(ROOT, "docs", "extending.md")


def doc_files(tmp_path):
  """The doc's python blocks: the ones headed `# my_losses.py` or `# (continued)
  my_losses.py` make my_losses.py, the one headed `# my_config.py` makes my_config.py."""
  blocks = re.findall(r"```python\n(.*?)```", open(DOC).read(), re.S)
  files = {}
  for block in blocks:
    name = re.match(r"# (?:\(continued\) )?(\S+\.py)\n", block).group(1)
    files[name] = files.get(name, "") + block
  assert sorted(files) == ["my_config.py", "my_losses.py"]
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  return tmp_path


# The `distill-jax` console script of the environment running the tests, as a user runs it.
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "distill-jax")


def run_cli(args, tmp_path):
  """`distill-jax ARGS` (the console script) from the folder holding the doc's files, which is
  not on PYTHONPATH: the CLI itself makes the working directory importable. The checkout under
  test is first on PYTHONPATH, asserted from the run's log."""
  return conftest.run_cli(args, cwd=tmp_path, timeout=300, check=False,
                          program=[CONSOLE_SCRIPT])


def restore_state(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_walkthrough_runs_end_to_end(tmp_path, data_dir, teacher_dir):
  doc_files(tmp_path)
  listing = run_cli(["losses", "--imports=my_losses"], tmp_path)
  assert listing.returncode == 0, listing.stderr[-2000:]
  assert "cosine_logits (function)" in listing.stdout
  assert "pool_regression (module)" in listing.stdout
  assert "student_layer='pool'" in listing.stdout

  workdir = tmp_path / "run"
  proc = run_cli(["--config=my_config.py", f"--workdir={workdir}",
                  f"--config.teachers.teacher.checkpoint={teacher_dir}",
                  f"--config.data.data_dir={data_dir}", "--config.progress_bar=False",
                  "--config.keep_checkpoints=10"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(workdir / "result.json"))
  assert result["steps"] == 10  # 4 hint steps, then 6 of the main stage.
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert any("hint/loss/pool_regression" in r for r in rows)
  main = [r for r in rows if "train/loss/cosine_logits" in r]
  assert main and all(np.isfinite(r["train/loss"]) for r in main)

  # The hint stage trains the connector only; the main stage trains the student too.
  at3, at4, at10 = (restore_state(workdir, s) for s in (3, 4, 10))
  student = lambda s: np.concatenate([np.ravel(x) for x in _leaves(s["params"]["student"])])
  connector = lambda s: np.concatenate([np.ravel(x) for x in _leaves(
      s["params"]["objective"]["pool_regression"])])
  np.testing.assert_array_equal(student(at3), student(at4))
  assert not np.allclose(connector(at3), connector(at4))
  assert not np.allclose(student(at4), student(at10))
  # The export holds the student alone: no connector.
  with ocp.StandardCheckpointer() as ckptr:
    exported = ckptr.restore(os.path.join(workdir, "model", "variables"))
  assert set(exported) == {"params"} and "pool_regression" not in str(exported.keys())


def test_resume_across_a_stage_boundary(tmp_path, data_dir, teacher_dir):
  """Killed right after the hint stage's last checkpoint, the run resumes in the main stage
  with a fresh optimizer and ends where an uninterrupted run ends."""
  from distill_jax.config import load_config_file
  from distill_jax.train import loop

  doc_files(tmp_path)
  sys.path.insert(0, str(tmp_path))
  try:
    config = load_config_file(str(tmp_path / "my_config.py"), {
        "teachers.teacher.checkpoint": teacher_dir, "data.data_dir": data_dir,
        "progress_bar": False})

    def crash(step, metrics):
      if step == 5:
        raise KeyboardInterrupt

    loop.train_and_evaluate(config, str(tmp_path / "straight"))
    try:
      loop.train_and_evaluate(config, str(tmp_path / "crashed"), step_callback=crash)
    except KeyboardInterrupt:
      pass
    assert sorted(os.listdir(tmp_path / "crashed" / "checkpoints")) == ["3", "4"]
    loop.train_and_evaluate(config, str(tmp_path / "crashed"))
  finally:
    sys.path.remove(str(tmp_path))
  a, b = restore_state(tmp_path / "straight", 10), restore_state(tmp_path / "crashed", 10)
  for x, y in zip(_leaves(a["params"]), _leaves(b["params"]), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_a_user_losss_declared_range_is_enforced(tmp_path):
  """The doc's cosine_logits declares `eps > 0` beside itself: validation refuses eps = 0 for
  that term (in `losses` and in a stage), naming the setting and the range, before any build;
  `distill-jax losses` lists the range beside the default."""
  import pytest

  from distill_jax.commands import describe_losses
  from distill_jax.config import ConfigError, load_config_file, validate

  doc_files(tmp_path)
  sys.path.insert(0, str(tmp_path))
  try:
    config = load_config_file(str(tmp_path / "my_config.py"))
    validate(config)
    with config.unlocked():
      config.losses.cosine_logits.eps = 0.0
    with pytest.raises(ConfigError) as info:
      validate(config)
    assert str(info.value) == ("config.losses.cosine_logits.eps is 0.0; it must be a number "
                               "> 0 (the norms' floor).")
    with config.unlocked():
      config.losses.cosine_logits.eps = 1e-6
      config.stages.hint.losses.cos = {"loss": "cosine_logits", "eps": -1.0}
    with pytest.raises(ConfigError, match=r"^config.stages.hint.losses.cos.eps is -1.0; it "
                       r"must be a number > 0 \(the norms' floor\)\.$"):
      validate(config)
    assert "eps=1e-08 (a number > 0)" in describe_losses()
  finally:
    sys.path.remove(str(tmp_path))


def _leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def test_the_readme_imports_example_runs_as_written(tmp_path):
  """README's `--imports=my_losses` example, exactly: its my_losses.py written to a temporary
  folder, and its command line run there (the console script, from that folder)."""
  import shlex

  readme = open(os.path.join(ROOT, "README.md")).read()
  module = re.search(r"```python\n(# my_losses.py, in the folder you run distill-jax from\n"
                     r".*?)```", readme, re.S).group(1)
  line = re.search(r"```bash\n(distill-jax losses --imports=my_losses[^\n]*)\n```", readme)
  (tmp_path / "my_losses.py").write_text(module)
  args = shlex.split(line.group(1), comments=True)
  assert args[:2] == ["distill-jax", "losses"]
  listing = run_cli(args[1:], tmp_path)
  assert listing.returncode == 0, listing.stderr[-2000:]
  assert ("logit_l1 (function): Mean absolute difference between the student's and the "
          "teacher's logits.\n    teacher=None") in listing.stdout
  assert "kd (function)" in listing.stdout
