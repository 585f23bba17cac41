"""The CLI-subprocess helpers of conftest run the checkout under test, and their check would
catch a subprocess that imports another copy of distill_jax."""

import os
import shutil

import pytest
from conftest import ROOT, assert_runs_checkout, cli_env, run_cli


def test_cli_subprocess_runs_this_checkout(tmp_path):
  proc = run_cli(["models"], cwd=tmp_path)  # Asserts the checkout itself; from any folder.
  assert "resnet20:" in proc.stdout.split()


def test_the_check_fails_when_another_copy_is_imported(tmp_path):
  """A copy of the package first on PYTHONPATH (as an installed copy would be, were the
  checkout not put first): the subprocess imports the copy, and the check says so."""
  shutil.copytree(os.path.join(ROOT, "distill_jax"), tmp_path / "other" / "distill_jax")
  env = {**cli_env(), "PYTHONPATH": str(tmp_path / "other")}
  with pytest.raises(AssertionError, match="not from the checkout under test"):
    run_cli(["models"], cwd=tmp_path, env=env)
  with pytest.raises(AssertionError, match="did not log where distill_jax came from"):
    assert_runs_checkout("I1202 main.py:1] Training cnn for 6 steps")
