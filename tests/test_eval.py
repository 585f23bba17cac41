"""Evaluation: the sums of `eval_step` against NumPy on a padded batch, and the same numbers on
one device, on an 8-device mesh and under pmap (two teachers, so the ensemble is reported too).
"""

import jax
import numpy as np
import pytest
import scipy.special
from conftest import run_steps, tiny, untrained_teacher

from distill_jax import data as data_lib
from distill_jax.train import loop
from distill_jax.train.build import build_run

MODES = [("jit", 1), ("jit", 8), ("pmap", 8)]


@pytest.fixture(scope="module")
def config(data_dir, teacher_dir, tmp_path_factory):
  """digits KD with the session's CNN teacher and a second, untrained MLP teacher (its
  predictions differ from the CNN's, so per-teacher and ensemble numbers differ)."""
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "parallel.num_devices": 1, "eval_batch_size": 64})
  with config.unlocked():
    config.teachers.mlp = untrained_teacher(tmp_path_factory.mktemp("mlp_teacher"))
  return config


@pytest.fixture(scope="module")
def state(config):
  """The student after 2 KD steps (not its initialisation), on the host."""
  return run_steps(config, 2)[0]


def with_mode(config, mode, devices):
  config = config.copy_and_resolve_references()
  config.parallel.mode, config.parallel.num_devices = mode, devices
  return config


def numpy_sums(logits, teacher_logits, labels):
  """What eval_step must return for the rows given (the real ones), in float64."""
  logp = scipy.special.log_softmax(np.float64(logits), -1)
  pred = logp.argmax(-1)
  top5 = np.argsort(-logits, -1)[:, :5]
  sums = {"count": len(labels), "top1": np.sum(pred == labels),
          "top5": np.sum((top5 == labels[:, None]).any(-1)),
          "ce": -np.sum(logp[np.arange(len(labels)), labels])}
  t_logps = {n: scipy.special.log_softmax(np.float64(t), -1) for n, t in teacher_logits.items()}
  t_logps["ensemble"] = np.log(np.mean([np.exp(v) for v in t_logps.values()], axis=0))
  for name, t_logp in t_logps.items():
    t_pred = t_logp.argmax(-1)
    sums[f"teacher_top1/{name}"] = np.sum(t_pred == labels)
    sums[f"agreement/{name}"] = np.sum(t_pred == pred)
    sums[f"kl/{name}"] = np.sum(np.exp(t_logp) * (t_logp - logp))
  return sums


def test_eval_sums_against_numpy_on_a_padded_batch(config, state):
  """The last eval batch (297 = 4 x 64 + 41: 23 padded rows), its padded rows filled with
  real-looking images and labels: they must not count in any sum."""
  run = build_run(config)
  *_, batch = data_lib.eval_batches(config.data, global_batch_size=64)
  real = batch["mask"].astype(bool)
  assert real.sum() == 41
  rng = np.random.default_rng(0)
  batch = dict(batch, image=np.where(real[:, None, None, None], batch["image"],
                                     rng.normal(size=batch["image"].shape).astype(np.float32)),
               label=np.where(real, batch["label"], rng.integers(0, 10, size=64)))
  logits = np.asarray(run.student_apply(state.student_variables(), batch, False).logits)
  teacher_logits = {n: np.asarray(apply(run.teacher_vars[n], batch, False).logits)
                    for n, apply in run.teacher_applies.items()}
  want = numpy_sums(logits[real], {n: t[real] for n, t in teacher_logits.items()},
                    batch["label"][real])
  assert 0 < want["agreement/mlp"] < want["count"]  # Teachers that disagree: a real check.
  assert want["kl/ensemble"] < max(want["kl/teacher"], want["kl/mlp"])
  for mode, devices in [("jit", 1), ("pmap", 8)]:
    mode_run = run if mode == "jit" else build_run(with_mode(config, mode, devices))
    parallel = mode_run.parallel
    got = jax.device_get(parallel.get(mode_run.eval_step(
        parallel.put_replicated(state), parallel.put_replicated(mode_run.teacher_vars),
        parallel.put_batch(batch))))
    assert sorted(got) == sorted(want), mode
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-4, err_msg=f"{mode} {key}")


@pytest.fixture(scope="module")
def totals(config, state):
  """For each mode: the eval sums over the whole eval split, and `loop.evaluate`'s means."""
  out = {}
  for mode, devices in MODES:
    run = build_run(with_mode(config, mode, devices))
    parallel = run.parallel
    args = (parallel.put_replicated(state), parallel.put_replicated(run.teacher_vars))
    sums = {}
    for batch in data_lib.eval_batches(config.data, global_batch_size=64):
      for k, v in jax.device_get(parallel.get(run.eval_step(
          *args, parallel.put_batch(batch)))).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    means = loop.evaluate(parallel, run.eval_step, *args, config.data, 64, task=run.task)
    out[(mode, devices)] = (sums, means)
  return out


@pytest.mark.parametrize("mode, devices", MODES[1:])
def test_eval_on_8_devices_equals_one_device(totals, mode, devices):
  ref_sums, ref_means = totals[("jit", 1)]
  sums, means = totals[(mode, devices)]
  assert ref_sums["count"] == sums["count"] == 297
  expected = {"top1", "top5", "ce", *(f"{m}/{t}" for m in ("teacher_top1", "agreement", "kl")
                                      for t in ("teacher", "mlp", "ensemble"))}
  assert set(means) == {f"eval/{k}" for k in expected}
  for key in expected:
    np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-5, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(means[f"eval/{key}"], ref_sums[key] / 297, rtol=1e-5,
                               atol=1e-6, err_msg=key)
  assert 0 < ref_means["eval/top1"] <= ref_means["eval/top5"] <= 1
  assert ref_means["eval/teacher_top1/teacher"] > 0.5  # The trained CNN teacher.


def test_eval_sums_drop_nonfinite_logits_of_padded_rows():
  """A NaN or inf in the student's or a teacher's logits of a padded row (mask 0) leaves every
  sum as NumPy computes it over the real rows (a `mask * x` sum would be NaN)."""
  from distill_jax.common.outputs import Outputs
  from distill_jax.tasks.classification import Classification

  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 10)).astype(np.float32)
  teacher = {"teacher": rng.normal(size=(6, 10)).astype(np.float32),
             "mlp": rng.normal(size=(6, 10)).astype(np.float32)}
  labels = rng.integers(0, 10, size=6)
  real = np.array([1, 1, 0, 1, 0, 1], bool)
  want = numpy_sums(logits[real], {n: t[real] for n, t in teacher.items()}, labels[real])
  for bad in (np.nan, np.inf):
    poisoned = lambda x: np.where(real[:, None], x, bad).astype(np.float32)  # noqa: B023
    got = jax.jit(Classification().eval_sums)(
        Outputs(poisoned(logits), {}, {}),
        {n: Outputs(poisoned(t), {}, {}) for n, t in teacher.items()},
        {"label": labels, "mask": real.astype(np.float32)})
    assert sorted(got) == sorted(want)
    for key, value in want.items():
      np.testing.assert_allclose(float(got[key]), value, rtol=2e-5, atol=1e-5,
                                 err_msg=f"{bad} {key}")
