"""The optimizers and learning-rate schedules against values computed by hand (NumPy here).

Every other test compares a run with another run of the same code, so a schedule that never
decays or a weight decay that is silently 0 would pass them all; these pin the numbers.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from distill_jax import optim


def optim_config(**overrides):
  return ml_collections.ConfigDict({
      "name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
      "schedule": "constant", "decay_epochs": (), "decay_factor": 0.1, "warmup_epochs": 0.0,
      **overrides})


def lrs(schedule, steps):
  return [float(schedule(s)) for s in steps]


# 10 steps per epoch throughout: epoch e starts at step 10 e. The step `s` is the number of
# updates done before this one (optax's count): the first update uses lr(0).
@pytest.mark.parametrize("overrides, total, want", [
    ({}, 100, {0: 0.1, 57: 0.1, 99: 0.1}),
    # Decays at epochs 2 and 3.5 (steps 20 and 35): x0.1 from that step on.
    ({"schedule": "step", "decay_epochs": (2, 3.5)}, 50,
     {0: 0.1, 19: 0.1, 20: 0.01, 34: 0.01, 35: 0.001, 49: 0.001}),
    ({"schedule": "step", "decay_epochs": (1,), "decay_factor": 0.5}, 30,
     {0: 0.1, 9: 0.1, 10: 0.05, 29: 0.05}),
    # Cosine to 0 at the last step: lr/2 (1 + cos(pi s / total)).
    ({"schedule": "cosine"}, 100,
     {0: 0.1, 25: 0.05 * (1 + np.cos(np.pi / 4)), 50: 0.05, 90: 0.05 * (1 + np.cos(0.9 * np.pi)),
      100: 0.0}),
    # A linear warm-up over 1 epoch from 0, then the schedule on its own clock...
    ({"warmup_epochs": 1.0}, 100, {0: 0.0, 5: 0.05, 9: 0.09, 10: 0.1, 60: 0.1}),
    # ... the step boundaries staying at their epochs ...
    ({"schedule": "step", "decay_epochs": (2, 3), "warmup_epochs": 1.0}, 50,
     {0: 0.0, 5: 0.05, 10: 0.1, 19: 0.1, 20: 0.01, 29: 0.01, 30: 0.001}),
    # ... and the cosine spanning what is left after the warm-up (90 steps here).
    ({"schedule": "cosine", "warmup_epochs": 1.0}, 100,
     {0: 0.0, 4: 0.04, 10: 0.1, 55: 0.05, 100: 0.0}),
], ids=["constant", "step", "step_by_half", "cosine", "warmup_constant", "warmup_step",
        "warmup_cosine"])
def test_schedules_against_hand_computed_values(overrides, total, want):
  schedule = optim.make_schedule(optim_config(**overrides), steps_per_epoch=10,
                                 total_steps=total)
  np.testing.assert_allclose(lrs(schedule, want), list(want.values()), rtol=1e-5, atol=1e-8,
                             err_msg=str(overrides))


def test_unknown_schedule_and_optimizer_are_named():
  with pytest.raises(ValueError, match="'linear'.*constant"):
    optim.make_schedule(optim_config(schedule="linear"), 10, 100)
  with pytest.raises(ValueError, match="'adam'.*sgd"):
    optim.make_optimizer(optim_config(name="adam"), optax.constant_schedule(0.1))


# Two parameters of the train state's layout, and the gradients of three updates.
P0 = {"student": {"w": np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)},
      "objective": {"term": {"b": np.array([1.0, -3.0, 0.5], np.float32)}}}
RNG = np.random.default_rng(0)
GRADS = [jax.tree.map(lambda p: RNG.normal(size=p.shape).astype(np.float32), P0)
         for _ in range(3)]


def run_updates(tx, params=P0, grads=GRADS):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, params)


def numpy_sgd(p, grads, lrs, momentum, nesterov, weight_decay):
  """PyTorch's SGD: d = g + wd p (coupled L2); buf = mu buf + d (buf = d at first);
  p -= lr (d + mu buf) with Nesterov, else p -= lr buf."""
  p, buf = np.float64(p), None
  for g, lr in zip(grads, lrs, strict=True):
    d = g + weight_decay * p
    buf = d if buf is None else momentum * buf + d
    p = p - lr * ((d + momentum * buf) if nesterov else buf)
  return p


def numpy_adamw(p, grads, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
  """Loshchilov & Hutter's AdamW: Adam's bias-corrected step plus the decoupled lr wd p."""
  p, m, v = np.float64(p), 0.0, 0.0
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    p = p - lr * (step + weight_decay * p)
  return p


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [
    (0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0), (0.9, False, 0.05),
    (0.9, True, 0.05), (0.0, False, 0.05)])
def test_sgd_steps_against_numpy(momentum, nesterov, weight_decay):
  config = optim_config(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
  got = run_updates(optim.make_optimizer(config, optax.constant_schedule(0.1)))
  for path, want_p in jax.tree_util.tree_flatten_with_path(P0)[0]:
    grads = [dict(jax.tree_util.tree_flatten_with_path(g)[0])[path] for g in GRADS]
    want = numpy_sgd(want_p, grads, [0.1] * 3, momentum, nesterov, weight_decay)
    np.testing.assert_allclose(dict(jax.tree_util.tree_flatten_with_path(got)[0])[path], want,
                               rtol=1e-5, atol=1e-6)


def test_sgd_follows_the_schedule_step_by_step():
  """The lr of update k is schedule(k): a step decay at epoch 0.2 (step 2 of 10 per epoch)
  changes the third update, with momentum and weight decay on."""
  config = optim_config(momentum=0.9, weight_decay=0.05, schedule="step", decay_epochs=(0.2,),
                        decay_factor=0.1)
  schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=3)
  got = run_updates(optim.make_optimizer(config, schedule))
  w = numpy_sgd(P0["student"]["w"], [g["student"]["w"] for g in GRADS], [0.1, 0.1, 0.01], 0.9,
                False, 0.05)
  np.testing.assert_allclose(got["student"]["w"], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_steps_against_numpy(weight_decay):
  config = optim_config(name="adamw", lr=0.01, weight_decay=weight_decay)
  got = run_updates(optim.make_optimizer(config, optax.constant_schedule(0.01)))
  want = numpy_adamw(P0["objective"]["term"]["b"], [g["objective"]["term"]["b"] for g in GRADS],
                     0.01, weight_decay)
  np.testing.assert_allclose(got["objective"]["term"]["b"], want, rtol=1e-5, atol=1e-7)


def test_frozen_parameters_get_exactly_zero_updates():
  """Weight decay and momentum included: a frozen parameter does not move at all, while
  the trained ones get the plain optimizer's update."""
  params = {"student": P0["student"],
            "objective": {"ft": {"paraphraser": {"k": np.ones((2, 2), np.float32)},
                                 "translator": {"k": np.full((3,), 2.0, np.float32)}},
                          "other": {"k": np.full((2,), -1.0, np.float32)}}}
  grads = [jax.tree.map(lambda p: RNG.normal(size=p.shape).astype(np.float32), params)
           for _ in range(2)]
  config = optim_config(momentum=0.9, weight_decay=0.1)
  base = optim.make_optimizer(config, optax.constant_schedule(0.1))
  frozen = run_updates(optim.freeze_all_but(base, train_student=False,
                                            train_terms={"ft": ("paraphraser",)}),
                       params, grads)
  free = run_updates(base, params, grads)
  np.testing.assert_array_equal(frozen["student"]["w"], params["student"]["w"])
  np.testing.assert_array_equal(frozen["objective"]["ft"]["paraphraser"]["k"], 1.0)
  np.testing.assert_array_equal(frozen["objective"]["other"]["k"], -1.0)
  np.testing.assert_allclose(frozen["objective"]["ft"]["translator"]["k"],
                             free["objective"]["ft"]["translator"]["k"], rtol=1e-6)
  assert not np.allclose(frozen["objective"]["ft"]["translator"]["k"], 2.0)
  # The student trains when asked, exactly as without freezing.
  student_on = run_updates(optim.freeze_all_but(base, train_student=True, train_terms={}),
                           params, grads)
  np.testing.assert_allclose(student_on["student"]["w"], free["student"]["w"], rtol=1e-6)
  np.testing.assert_array_equal(student_on["objective"]["ft"]["translator"]["k"], 2.0)
