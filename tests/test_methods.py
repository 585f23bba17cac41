"""Every loss of the library, at once, end to end: through the CLI, and under jit on one
device, jit on an 8-device mesh and pmap on 8 devices (configs/digits.py:all, which also runs
the connector pre-training stage)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import run_digits_cli, tiny

from distill_jax import data as data_lib
from distill_jax.losses import LOSSES
from distill_jax.train import loop
from distill_jax.train import step as step_lib
from distill_jax.train.build import build_run

EVERY_METHOD = ["ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp",
                "nst", "crd", "dkd", "logit_mse", "reverse_kl", "gjsd"]


def final_state(workdir):
  step = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_every_registered_method_is_in_the_smoke_config():
  # ft_paraphraser is FT's reconstruction objective, exercised as 'ft' with mode='reconstruct'.
  # (Other tests register their own losses; only the library's count here.)
  # The token-level (language-model) losses run in configs/lm.py's tests (tests/test_lm_*.py,
  # test_cross_tokenizer.py, test_minillm.py).
  token_modules = {f"distill_jax.losses.{m}" for m in ("tokens", "token_topk", "token_layers",
                                                       "cross_tokenizer", "minillm")}
  library = {n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("distill_jax.")
             and LOSSES.get(n).__module__ not in token_modules}
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


# Terms whose value cannot be negative (VID's is a Gaussian negative log-likelihood with a
# learned variance, which can be).
NON_NEGATIVE = set(EVERY_METHOD) - {"vid"}


def test_every_logged_loss_is_the_weighted_sum_of_its_terms(reference_run):
  """Each logged step's loss against the sum of its terms' logged (unweighted) values times
  the config's weights, DKD's weight ramped linearly over its warm-up from the start of the
  stage; every non-negative term is, and the step's top-1 and agreement are fractions of the
  64-example batch."""
  config = json.load(open(os.path.join(reference_run, "config.json")))
  rows = [json.loads(line) for line in open(os.path.join(reference_run, "metrics.jsonl"))]
  steps_per_epoch = 1500 // config["batch_size"]
  stages = [("pretrain", config["stages"]["pretrain"]["losses"], 0),
            ("train", config["losses"], 2)]
  for prefix, losses, start in stages:
    logged = [r for r in rows if f"{prefix}/loss" in r]
    assert [r["step"] for r in logged] == list(range(start + 1, start + len(logged) + 1))
    for row in logged:
      stage_step = row["step"] - 1 - start  # The state's step when the loss was computed.
      want = 0.0
      for name, settings in losses.items():
        warmup = settings.get("warmup_epochs", 0.0) * steps_per_epoch
        ramp = min(1.0, stage_step / warmup) if warmup else 1.0
        want += settings["weight"] * ramp * row[f"{prefix}/loss/{name}"]
        if name in NON_NEGATIVE:
          assert row[f"{prefix}/loss/{name}"] >= 0, (row["step"], name)
      np.testing.assert_allclose(row[f"{prefix}/loss"], want, rtol=1e-5,
                                 err_msg=f"{prefix} step {row['step']}")
      for key in ("top1", "agreement"):
        fraction = row[f"{prefix}/{key}"] * config["batch_size"]
        assert 0 <= fraction <= 64 and abs(fraction - round(fraction)) < 1e-4, (key, row)


def test_every_term_moves_the_student(data_dir, teacher_dir, reference):
  """Each term's value has a non-zero, finite gradient with respect to the student's params
  (so adding it changes the CE-only update): no term is silently detached. One compiled
  function of the 18 term values of the main stage, at the CLI run's last state."""
  config = tiny("all", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                    "parallel.num_devices": 1})
  run = build_run(config)
  objective = run.stages[-1].objective
  names = [t.name for t in objective.terms]
  assert sorted(names) == sorted(EVERY_METHOD)
  batch = next(data_lib.train_iterator(config.data, global_batch_size=config.batch_size,
                                       seed=0))
  rng = jax.random.PRNGKey(1)

  def term_values(student_params):
    teachers = step_lib.teacher_forward(run.teacher_applies, run.teacher_vars, batch)
    student = run.student_apply({"params": student_params, **reference["model_state"]},
                                   batch, True, rng)
    # A step past DKD's warm-up (the weight ramp does not enter the unweighted values).
    _, values, _ = objective(reference["params"]["objective"], reference["objective_state"],
                             student, teachers, batch, jnp.asarray(200), rng)
    return jnp.stack([values[name] for name in names])

  # Each term's derivative along one random direction of the student's params: 0 exactly for
  # a term with no gradient, non-zero almost surely otherwise (one forward-mode pass).
  params = reference["params"]["student"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves,
                                                                               strict=True)])
  _, derivatives = jax.jit(lambda p, d: jax.jvp(term_values, (p,), (d,)))(params, direction)
  derivatives = dict(zip(names, np.asarray(derivatives).tolist(), strict=True))
  assert all(np.isfinite(v) and abs(v) > 1e-8 for v in derivatives.values()), derivatives


# pmap only: jit on a mesh, with every method, is tests/test_parallel.py's data x fsdp run.
@pytest.mark.parametrize("mode, devices", [("pmap", 8)])
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
