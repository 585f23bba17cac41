"""Mixed precision, gradient accumulation and remat: same step, less memory, known numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from distill_jax import data as data_lib
from distill_jax.config import ConfigError
from distill_jax.train.build import build_run, init_state

CNN_STUDENT = {"student.name": "cnn", "student.kwargs": {"widths": (8, 16)},
               "parallel.num_devices": 1}


def train(config, num_steps, init=None, keep=()):
  """(host init, host state, per-step losses, the run) after `num_steps` compiled steps;
  with `keep`, the state is instead {step: host state} at those steps."""
  run = build_run(config)
  parallel = run.parallel
  if init is None:
    init = jax.device_get(init_state(config, run))
  state = parallel.put_state(init)
  teacher_vars = parallel.put_teachers(run.teacher_vars)
  batches = data_lib.train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed)
  losses, kept = [], {}
  for step in range(1, num_steps + 1):
    state, metrics = run.train_step(state, teacher_vars, parallel.put_batch(next(batches)))
    losses.append(float(parallel.get(metrics)["loss"]))
    if step in keep:
      kept[step] = parallel.to_host(state)
  return init, kept if keep else parallel.to_host(state), np.asarray(losses), run


@pytest.fixture(scope="module")
def cnn_kd(data_dir, teacher_dir):
  """The float32 reference: 30 KD steps of a CNN student (BatchNorm), states at steps 1, 3."""
  overrides = {"teachers.teacher.checkpoint": teacher_dir, **CNN_STUDENT, "num_steps": 30}
  config = lambda **more: tiny("kd", data_dir, **overrides, **more)
  init, states, losses, _ = train(config(), 30, keep=(1, 3))
  return config, init, states, losses


def assert_trees_close(got, want, atol):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_accumulating_4_micro_batches_is_the_4x_batch_step(data_dir, teacher_dir):
  """KD into the BatchNorm-free MLP student: k micro-batches of 16 == one batch of 64."""
  base = {"teachers.teacher.checkpoint": teacher_dir, "parallel.num_devices": 1}
  init, big, big_losses, _ = train(tiny("kd", data_dir, **base), 3)
  _, acc, acc_losses, _ = train(tiny("kd", data_dir, **base, **{"optim.accumulate_steps": 4}),
                                3, init)
  assert not np.allclose(big.params["student"]["head"]["kernel"],
                         init.params["student"]["head"]["kernel"])
  assert_trees_close(acc.params, big.params, 1e-5)
  assert_trees_close(acc.opt_state, big.opt_state, 1e-5)
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)


def test_accumulation_with_batchnorm_updates_running_stats_per_micro_batch(cnn_kd):
  """BN normalises each micro-batch by its own statistics: close to, not equal to, the big
  batch; the running averages take k momentum updates per step."""
  config, init, states, _ = cnn_kd
  _, acc, losses, _ = train(config(**{"optim.accumulate_steps": 2}), 1, init)
  assert np.isfinite(losses).all()
  stats = lambda s: s.model_state["batch_stats"]["stem_bn"]["mean"]
  # From zeros, one update (momentum 0.9) moves the mean 10% of the way, two 19%.
  assert np.allclose(stats(init), 0.0)
  ratio = np.linalg.norm(stats(acc)) / np.linalg.norm(stats(states[1]))
  assert 1.6 < ratio < 2.2, ratio


def test_bfloat16_student_and_teacher_train_like_float32(cnn_kd):
  """30 KD steps of a CNN student (bf16 forward/backward, fp32 master weights): the final loss
  is within 5% (+0.02) of float32's; the state stays float32; the convolutions really run in
  bfloat16; the logits reaching the loss are float32."""
  config, init, _, fp32_losses = cnn_kd
  _, bf16, bf16_losses, run = train(config(**{
      "dtype": "bfloat16", "teachers.teacher.dtype": "bfloat16"}), 30, init)
  floats = [x for x in jax.tree.leaves((bf16.params, bf16.opt_state, bf16.model_state))
            if np.issubdtype(x.dtype, np.floating)]
  assert floats and all(x.dtype == np.float32 for x in floats)
  tail32, tail16 = fp32_losses[-5:].mean(), bf16_losses[-5:].mean()
  assert tail32 < 0.95 * fp32_losses[:5].mean() and tail16 < 0.95 * bf16_losses[:5].mean()
  assert abs(tail16 - tail32) < 0.05 * tail32 + 0.02, (tail16, tail32)
  assert not np.allclose(bf16_losses, fp32_losses, rtol=1e-6)  # bf16 did change the numbers.

  batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.zeros((4,), jnp.int32)}
  jaxpr = str(jax.make_jaxpr(lambda v: run.student_apply(v, batch, True, None))(
      {"params": init.params["student"], **init.model_state}))
  assert "conv_general_dilated" in jaxpr and "bf16[4,8,8,8]" in jaxpr
  out = run.teacher_applies["teacher"](run.teacher_vars["teacher"], batch, False)
  assert out.logits.dtype == jnp.float32


def test_remat_student_gives_the_same_params(cnn_kd):
  config, init, states, _ = cnn_kd
  _, remat, _, run = train(config(**{"student.remat": True}), 3, init)
  assert run.student.remat
  assert_trees_close(remat.params, states[3].params, 1e-6)
  assert_trees_close(remat.model_state, states[3].model_state, 1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"dtype": "bf16"}, r"config.dtype is 'bf16'; choose one of \['float32', 'bfloat16'"),
    ({"teachers.teacher.dtype": "half"}, "teachers.teacher.dtype"),
    ({"optim.accumulate_steps": 3}, "accumulate_steps is 3; give a positive integer that "
                                    "divides batch_size 64"),
])
def test_bad_precision_settings_are_named(data_dir, teacher_dir, overrides, message):
  with pytest.raises(ConfigError, match=message):
    build_run(tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                      **overrides}))
