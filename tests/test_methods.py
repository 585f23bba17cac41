"""Every loss of the library, at once, end to end: through the CLI, and under jit on one
device, jit on an 8-device mesh and pmap on 8 devices (configs/digits.py:all, which also runs
the connector pre-training stage)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import run_digits_cli, tiny

from distill_jax.losses import LOSSES
from distill_jax.train import loop

EVERY_METHOD = ["ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp",
                "nst", "crd", "dkd", "logit_mse", "reverse_kl", "gjsd"]


def final_state(workdir):
  step = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_every_registered_method_is_in_the_smoke_config():
  # ft_paraphraser is FT's reconstruction objective, exercised as 'ft' with mode='reconstruct'.
  # (Other tests register their own losses; only the library's count here.)
  library = {n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("distill_jax.")}
  assert sorted(library - {"ft_paraphraser"}) == sorted(EVERY_METHOD)


def test_every_method_through_the_cli(reference_run):
  workdir = reference_run
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  main = [r for r in rows if "train/loss" in r]
  assert {f"train/loss/{m}" for m in EVERY_METHOD} <= set(main[-1])
  assert all(np.isfinite(v) for r in main for v in r.values())
  assert any("pretrain/loss/ft" in r for r in rows)
  result = json.load(open(os.path.join(workdir, "result.json")))
  assert result["steps"] == 5  # 2 pre-training steps + 3.
  assert result["final"]["eval/top1"] > 0.0
  # FT: the paraphraser trains in the pre-training stage only, the translator in the main one;
  # a frozen part gets no update at all (weight decay included).
  states = {}
  for step in (2, 5):
    with ocp.StandardCheckpointer() as ckptr:
      states[step] = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  ft = {step: state["params"]["objective"]["ft"] for step, state in states.items()}
  for a, b in zip(jax.tree.leaves(ft[2]["paraphraser"]), jax.tree.leaves(ft[5]["paraphraser"]),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(ft[2]["translator"]), jax.tree.leaves(ft[5]["translator"]), strict=True))


@pytest.mark.parametrize("mode, devices", [("jit", 8), ("pmap", 8)])
def test_every_method_matches_one_device_on_8_devices(data_dir, teacher_dir, tmp_path_factory,
                                                       mode, devices, reference):
  workdir = str(tmp_path_factory.mktemp(f"{mode}{devices}"))
  config = tiny("all", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                    "parallel.mode": mode, "parallel.num_devices": devices,
                                    "num_steps": 3})
  loop.train_and_evaluate(config, workdir)
  got, want = final_state(workdir), reference
  assert int(got["step"]) == int(want["step"]) == 5
  for part in ("params", "model_state", "objective_state"):
    flat_got = jax.tree_util.tree_flatten_with_path(got[part])[0]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want[part])[0])
    assert len(flat_got) == len(flat_want)
    for path, value in flat_got:
      np.testing.assert_allclose(value, flat_want[path], atol=2e-5, rtol=1e-4,
                                 err_msg=f"{mode}: {part} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def reference_run(data_dir, teacher_dir, tmp_path_factory):
  """Every method through the CLI, on one device: the reference for the parallel modes."""
  workdir = tmp_path_factory.mktemp("cli")
  run_digits_cli("all,tiny", workdir, data_dir, teacher_dir, "--config.num_steps=3")
  return str(workdir)


@pytest.fixture(scope="module")
def reference(reference_run):
  return final_state(reference_run)
