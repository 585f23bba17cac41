"""CRD (contrastive representation distillation) against an independent NumPy reference.

The reference below is written from the CRD paper code's formulas (ContrastMemory's scores,
ContrastLoss's NCE, the momentum update), in float64. Also: pmap across 8 devices gives the
single-device result, both at module level and through the whole framework.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny
from jax.test_util import check_grads

from distill_jax import data as data_lib
from distill_jax import losses
from distill_jax.common.outputs import Outputs
from distill_jax.losses import contrastive
from distill_jax.losses.objective import ObjectiveError, build_objective
from distill_jax.train.build import build_run, init_state

CRD = losses.LOSSES.get("crd")


# -- the NumPy reference (float64) ----------------------------------------------------------


def np_normalize(x):
  x = np.float64(x)
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True))


def np_contrast_loss(x, num_examples, eps=1e-7, weights=None):
  """RepDistiller's ContrastLoss on probabilities x [B, 1+K]: -(sum log D1 + sum log D0) / B."""
  x = np.float64(x)
  m = x.shape[1] - 1
  pn = 1.0 / num_examples
  log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + eps))
  log_d0 = np.log((m * pn) / (x[:, 1:] + m * pn + eps))
  per_example = -(log_d1 + log_d0.sum(axis=1))
  w = np.ones(len(x)) if weights is None else np.float64(weights)
  return np.sum(per_example * w) / np.sum(w)


def np_scores(memory, idx, e, temperature):
  """exp(<memory[idx[b, k]], e[b]> / T), [B, 1+K]."""
  return np.exp(np.einsum("bkd,bd->bk", np.float64(memory)[idx], np.float64(e)) / temperature)


def np_momentum_update(memory, ids, e, momentum):
  memory = np.array(memory, np.float64)
  for i, row in zip(ids, np.float64(e), strict=True):
    new = momentum * memory[i] + (1 - momentum) * row
    memory[i] = new / np.linalg.norm(new)
  return memory


def np_crd(params, memory, f_s, f_t, idx, ids, *, temperature, momentum, num_examples,
           log_z=None, weights=None):
  """(loss, new memory, log Z) of one CRD training step, as the paper code computes it."""
  f_s, f_t = np.float64(f_s).reshape(len(f_s), -1), np.float64(f_t).reshape(len(f_t), -1)
  e_s = np_normalize(f_s @ np.float64(params["embed_s"]["kernel"]) + params["embed_s"]["bias"])
  e_t = np_normalize(f_t @ np.float64(params["embed_t"]["kernel"]) + params["embed_t"]["bias"])
  out_s = np_scores(memory["memory_t"], idx, e_s, temperature)  # student vs teacher bank
  out_t = np_scores(memory["memory_s"], idx, e_t, temperature)  # teacher vs student bank
  keep = np.ones(len(ids), bool) if weights is None else np.asarray(weights) > 0
  if log_z is None:
    log_z = (np.log(out_s[keep].mean() * num_examples), np.log(out_t[keep].mean() * num_examples))
  loss = (np_contrast_loss(out_s / np.exp(log_z[0]), num_examples, weights=weights) +
          np_contrast_loss(out_t / np.exp(log_z[1]), num_examples, weights=weights))
  new = {"memory_s": np_momentum_update(memory["memory_s"], ids[keep], e_s[keep], momentum),
         "memory_t": np_momentum_update(memory["memory_t"], ids[keep], e_t[keep], momentum)}
  return loss, new, log_z


# -- helpers --------------------------------------------------------------------------------

# One small setting for the module tests, so they share compiled functions: N = 40 examples,
# a global batch of 16 (2 per device under pmap), features of 6 (student) and 10 (teacher).
N, B, D_S, D_T, K, T = 40, 16, 6, 10, 8, 0.2
SMALL = CRD(feat_dim=4, num_negatives=K, nce_temperature=T, num_examples=N)


def _outputs(features, dtype=jnp.float32):
  features = jnp.asarray(features, dtype)
  return Outputs(jnp.zeros((features.shape[0], 3), dtype), {"pool": features}, {})


def _problem(seed):
  """Features f_s [B, D_S], f_t [B, D_T] and distinct ids [B] in [0, N)."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, D_S)), rng.normal(size=(B, D_T)), rng.permutation(N)[:B]


def _random_params(variables, seed):
  """The module's parameters replaced by random values (so nothing relies on the init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, jnp.float32),
                      variables["params"])


@functools.partial(jax.jit, static_argnums=0)
def _init(module, f_s, f_t, ids):
  return module.init({"params": jax.random.PRNGKey(0), "loss": jax.random.PRNGKey(1)},
                     _outputs(f_s), {"t": _outputs(f_t)}, {"id": ids})


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(module, train, variables, f_s, f_t, batch, rng):
  """The term's value and, with `train`, its new 'memory' and the sampled indices."""
  return module.apply(variables, _outputs(f_s), {"t": _outputs(f_t)}, batch, rngs={"loss": rng},
                      mutable=["memory", "intermediates"] if train else False)


def _variables(seed=0):
  """SMALL's initial memory with random parameters."""
  f_s, f_t, ids = _problem(seed)
  variables = _init(SMALL, f_s, f_t, ids)
  return {"params": _random_params(variables, seed + 1), "memory": variables["memory"]}


# -- the pure functions ---------------------------------------------------------------------


@pytest.mark.parametrize("shape, num_examples", [((1, 2), 5), ((4, 9), 50), ((16, 65), 5000)])
def test_nce_loss_matches_the_reference_formula(shape, num_examples):
  rng = np.random.default_rng(shape[1])
  log_x = rng.normal(size=shape) * 3 - np.log(num_examples)
  got = contrastive.nce_loss(jnp.asarray(log_x, jnp.float32), num_examples)
  np.testing.assert_allclose(got, np_contrast_loss(np.exp(log_x), num_examples), rtol=1e-5)
  weights = (rng.random(shape[0]) > 0.3).astype(np.float32)
  weights[0] = 1.0
  got = contrastive.nce_loss(jnp.asarray(log_x, jnp.float32), num_examples, jnp.asarray(weights))
  np.testing.assert_allclose(got, np_contrast_loss(np.exp(log_x), num_examples, weights=weights),
                             rtol=1e-5)


def test_nce_loss_is_finite_for_extreme_scores():
  log_x = jnp.asarray([[200.0, -200.0, 300.0], [-1e4, 1e4, 0.0]])
  value, grad = jax.value_and_grad(lambda x: contrastive.nce_loss(x, 100))(log_x)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("num_examples, cols", [(30, 5), (300, 2)])  # dense, then gather
def test_contrast_logits_both_paths_match_numpy(num_examples, cols):
  rng = np.random.default_rng(cols)
  memory, e = rng.normal(size=(num_examples, 7)), rng.normal(size=(4, 7))
  idx = rng.integers(0, num_examples, size=(4, cols))
  got = contrastive.contrast_logits(jnp.asarray(memory, jnp.float32), jnp.asarray(idx),
                                    jnp.asarray(e, jnp.float32), 0.3)
  np.testing.assert_allclose(got, np.log(np_scores(memory, idx, e, 0.3)), rtol=1e-5, atol=1e-5)


def test_log_normalizer_matches_numpy_even_when_exp_overflows():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 5)) * 4
  weights = np.array([1, 1, 0, 1, 1, 0], np.float32)
  got = contrastive.log_normalizer(jnp.asarray(logits, jnp.float32), jnp.asarray(weights), 77)
  want = np.log(np.exp(logits[weights > 0]).mean() * 77)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # exp(logits) overflows float32 here (T = 0.001 on unit vectors); log Z does not.
  got = contrastive.log_normalizer(jnp.asarray(logits * 100, jnp.float32), jnp.ones(6), 77)
  big = logits * 100
  want = big.max() + np.log(np.exp(big - big.max()).mean() * 77)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sampled_indices_are_the_positive_then_uniform_negatives():
  ids = jnp.asarray([5, 0, 9, 3])
  idx = contrastive.sample_contrast_indices(jax.random.PRNGKey(0), ids, 10, 4000)
  assert idx.shape == (4, 4001) and idx.dtype == jnp.int32
  np.testing.assert_array_equal(idx[:, 0], ids)
  negatives = np.asarray(idx[:, 1:])
  assert negatives.min() == 0 and negatives.max() == 9
  counts = np.bincount(negatives.ravel(), minlength=10)
  assert np.all(np.abs(counts - 1600) < 6 * np.sqrt(1600))  # Uniform within 6 sigma.
  # Negatives follow the example, not its position: permuting the batch permutes the rows.
  perm = contrastive.sample_contrast_indices(jax.random.PRNGKey(0), ids[::-1], 10, 4000)
  np.testing.assert_array_equal(perm, idx[::-1])
  other = contrastive.sample_contrast_indices(jax.random.PRNGKey(1), ids, 10, 4000)
  assert np.mean(np.asarray(other[:, 1:]) == negatives) < 0.2


def test_momentum_update_matches_numpy_and_leaves_other_rows():
  rng = np.random.default_rng(4)
  memory = np_normalize(rng.normal(size=(12, 5)))
  ids, e = np.array([7, 2, 11]), np_normalize(rng.normal(size=(3, 5)))
  got = np.asarray(contrastive.momentum_update(jnp.asarray(memory, jnp.float32), jnp.asarray(ids),
                                               jnp.asarray(e, jnp.float32), 0.5))
  want = np_momentum_update(memory, ids, e, 0.5)
  np.testing.assert_allclose(got, want, atol=1e-6)
  others = np.setdiff1d(np.arange(12), ids)
  np.testing.assert_array_equal(got[others], np.float32(memory[others]))
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  # Padding rows (weight 0, id -1 or a real row's id) change nothing.
  pad_ids, pad_w = np.array([7, -1, 2]), np.array([1.0, 0.0, 0.0], np.float32)
  got = np.asarray(contrastive.momentum_update(
      jnp.asarray(memory, jnp.float32), jnp.asarray(pad_ids), jnp.asarray(e, jnp.float32), 0.5,
      jnp.asarray(pad_w)))
  np.testing.assert_allclose(got, np_momentum_update(memory, ids[:1], e[:1], 0.5), atol=1e-6)


# -- the module -----------------------------------------------------------------------------


def test_crd_module_matches_numpy_over_two_steps():
  f_s, f_t, ids = _problem(0)
  memory = _init(SMALL, f_s, f_t, ids)["memory"]
  assert memory["memory_s"].shape == (N, 4) and memory["memory_t"].shape == (N, 4)
  stdv = 1 / np.sqrt(4 / 3)  # Uniform in [-stdv, stdv], stdv = 1 / sqrt(feat_dim / 3).
  assert stdv / 2 < np.abs(memory["memory_s"]).max() <= stdv
  assert not np.allclose(memory["memory_s"], memory["memory_t"])
  assert not bool(memory["z_is_set"])  # Init neither sets Z nor updates the banks.
  variables = _variables()
  np_memory = jax.tree.map(np.asarray, dict(variables["memory"]))
  log_z = None
  for step in range(2):  # Step 0 sets Z from its batch, step 1 uses the stored Z.
    f_s, f_t, ids = _problem(10 + step)
    loss, state = _apply(SMALL, True, variables, f_s, f_t, {"id": jnp.asarray(ids)},
                         jax.random.PRNGKey(step))
    idx = np.asarray(state["intermediates"]["contrast_idx"][0])
    assert idx.shape == (B, K + 1)
    np.testing.assert_array_equal(idx[:, 0], ids)
    want, np_memory, log_z = np_crd(variables["params"], np_memory, f_s, f_t, idx, ids,
                                    temperature=T, momentum=0.5, num_examples=N, log_z=log_z)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    new = state["memory"]
    assert bool(new["z_is_set"])
    np.testing.assert_allclose([new["log_z_s"], new["log_z_t"]], log_z, rtol=1e-5)
    for bank in ("memory_s", "memory_t"):
      np.testing.assert_allclose(new[bank], np_memory[bank], atol=1e-6)
      np.testing.assert_allclose(np.linalg.norm(new[bank][ids], axis=1), 1.0, atol=1e-6)
      untouched = np.setdiff1d(np.arange(N), ids)
      np.testing.assert_array_equal(new[bank][untouched], variables["memory"][bank][untouched])
    variables = {"params": variables["params"], "memory": new}


def test_crd_module_takes_given_indices_and_mask_and_is_read_only_in_eval():
  variables = _variables(2)
  f_s, f_t, ids = _problem(5)
  idx = np.random.default_rng(6).integers(0, N, size=(B, 5))  # 4 negatives, given.
  idx[:, 0] = ids
  mask = np.float32(np.random.default_rng(7).random(B) > 0.4)
  batch = {"id": jnp.asarray(ids), "contrast_idx": jnp.asarray(idx), "mask": jnp.asarray(mask)}
  loss, state = _apply(SMALL, True, variables, f_s, f_t, batch, jax.random.PRNGKey(0))
  np_memory = jax.tree.map(np.asarray, dict(variables["memory"]))
  want, want_memory, _ = np_crd(variables["params"], np_memory, f_s, f_t, idx, ids,
                                temperature=T, momentum=0.5, num_examples=N, weights=mask)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for bank in ("memory_s", "memory_t"):  # Masked rows leave their memory rows alone.
    np.testing.assert_allclose(state["memory"][bank], want_memory[bank], atol=1e-6)
  # Eval mode (nothing mutable): the same value, and no state comes back.
  value = _apply(SMALL, False, variables, f_s, f_t, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(value, loss, rtol=1e-6)


def test_gradients_reach_the_student_and_heads_not_the_teacher():
  f_s, f_t, ids = _problem(7)
  variables = _variables(3)
  idx = np.random.default_rng(8).integers(0, N, size=(B, K + 1))
  idx[:, 0] = ids
  # Given indices: no sampling in the graph (which would only cost compile time here).
  batch, rng = {"id": jnp.asarray(ids), "contrast_idx": jnp.asarray(idx)}, jax.random.PRNGKey(3)
  with jax.enable_x64(True):  # Finite differences in float64.
    as64 = lambda tree: jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float64) if x.dtype == jnp.float32 else x, tree)
    # Z is a constant once set (as in the reference), so differentiate at a set Z: before it
    # is set, Z is taken from the batch under stop_gradient, which finite differences see.
    memory = as64(variables["memory"]) | {
        "log_z_s": jnp.asarray(4.0), "log_z_t": jnp.asarray(3.0), "z_is_set": jnp.asarray(True)}
    params, fs, ft = as64(variables["params"]), as64(f_s), as64(f_t)

    @jax.jit
    def loss(params, fs, ft):
      return SMALL.apply({"params": params, "memory": memory}, _outputs(fs, fs.dtype),
                         {"t": _outputs(ft, ft.dtype)}, batch, rngs={"loss": rng})

    # The teacher's feature is under stop_gradient: check the student's side and the heads.
    check_grads(lambda p, x: loss(p, x, ft), (params, fs), order=1, modes=["rev"], atol=1e-5,
                rtol=1e-5)
    grads = jax.grad(loss, argnums=(0, 1, 2))(params, fs, ft)
  assert np.all(np.asarray(grads[2]) == 0)  # The teacher's feature gets none.
  assert np.any(np.asarray(grads[1]) != 0)
  for leaf in jax.tree.leaves(grads[0]):  # Both heads (the teacher's head is trained).
    assert np.any(np.asarray(leaf) != 0)


def test_objective_gives_the_direct_call_and_keeps_the_memory_state():
  objective = build_objective(
      {"crd": {"weight": 0.8, "num_negatives": K, "feat_dim": 4, "nce_temperature": T}}, ["t"],
      context={"num_examples": N})
  assert objective.terms[0].fn == SMALL
  f_s, f_t, ids = _problem(8)
  batch = {"id": jnp.asarray(ids)}
  init = jax.jit(lambda s, t: objective.init(jax.random.PRNGKey(0), _outputs(s),
                                             {"t": _outputs(t)}, batch))
  params, state = init(f_s, f_t)
  assert set(params["crd"]) == {"embed_s", "embed_t"}
  assert set(state["crd"]["memory"]) == {"memory_s", "memory_t", "log_z_s", "log_z_t", "z_is_set"}
  rng = jax.random.PRNGKey(5)
  total, values, new_state = jax.jit(lambda p, st, s, t: objective(
      p, st, _outputs(s), {"t": _outputs(t)}, batch, jnp.asarray(0), rng))(
          params, state, f_s, f_t)
  direct, direct_state = _apply(SMALL, True, {"params": params["crd"], **state["crd"]}, f_s, f_t,
                                batch, jax.random.fold_in(rng, 0))
  np.testing.assert_allclose(values["crd"], direct, rtol=1e-6)
  np.testing.assert_allclose(total, 0.8 * direct, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new_state["crd"]["memory"],
               dict(direct_state["memory"]))
  assert bool(new_state["crd"]["memory"]["z_is_set"])


def test_misuse_fails_clearly():
  f_s, f_t, ids = _problem(9)
  student, teachers = _outputs(f_s), {"t": _outputs(f_t)}
  objective = build_objective({"crd": {}}, ["t"])  # No num_examples from the run.
  with pytest.raises(ObjectiveError, match="num_examples"):
    objective.init(jax.random.PRNGKey(0), student, teachers, {"id": jnp.asarray(ids)})
  objective = build_objective({"crd": {"num_negatives": 4}}, ["t"], context={"num_examples": N})
  with pytest.raises(ObjectiveError, match=r"batch\['id'\]"):
    objective.init(jax.random.PRNGKey(0), student, teachers, {"label": jnp.asarray(ids)})
  with pytest.raises(ObjectiveError, match="num_negativs"):
    build_objective({"crd": {"num_negativs": 4}}, ["t"])


# -- end to end through the framework -------------------------------------------------------


def crd_config(data_dir, teacher_dir, mode, num_devices):
  config = tiny("kd", data_dir, **{"teachers.teacher.checkpoint": teacher_dir,
                                   "parallel.mode": mode, "parallel.num_devices": num_devices})
  with config.unlocked():
    config.losses = ml_collections.ConfigDict(
        {"ce": {"weight": 1.0}, "crd": {"weight": 0.8, "num_negatives": 64}})
  return config


def run_steps(config, num_steps, init=None):
  """(initial state, final state as on the devices, metrics, the batches' ids).

  `init` (a host state) replaces `init_state`: the initial state depends on the seed
  only, so the modes can start from one, computed once.
  """
  run = build_run(config)
  parallel = run.parallel
  if init is None:
    init = jax.device_get(init_state(config, run))  # A host copy: the step donates.
  state = parallel.put_replicated(init)
  teacher_vars = parallel.put_replicated(run.teacher_vars)
  batches = data_lib.train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed)
  ids = []
  for _ in range(num_steps):
    batch = next(batches)
    ids.append(np.asarray(batch["id"]))
    state, metrics = run.train_step(state, teacher_vars, parallel.put_batch(batch))
  return (init, jax.device_get(state), jax.device_get(parallel.get(metrics)),
          np.concatenate(ids))


def test_jit_mesh_and_pmap_train_crd_like_one_device(data_dir, teacher_dir):
  assert jax.device_count() == 8
  results = {("jit", 1): run_steps(crd_config(data_dir, teacher_dir, "jit", 1), 3)}
  init, ref, ref_metrics, ids = results[("jit", 1)]
  for key in [("jit", 8), ("pmap", 8)]:
    results[key] = run_steps(crd_config(data_dir, teacher_dir, *key), 3, init)
  memory = ref.objective_state["crd"]["memory"]
  # The batches' ids reach the term: exactly their rows moved, to unit norm.
  num_train = memory["memory_s"].shape[0]
  assert num_train == 1500
  untouched = np.setdiff1d(np.arange(num_train), ids)
  for bank in ("memory_s", "memory_t"):
    start = init.objective_state["crd"]["memory"][bank]
    np.testing.assert_array_equal(memory[bank][untouched], start[untouched])
    assert np.all(np.any(memory[bank][ids] != start[ids], axis=1))
    np.testing.assert_allclose(np.linalg.norm(memory[bank][ids], axis=1), 1.0, atol=1e-5)
  assert bool(memory["z_is_set"]) and np.isfinite(ref_metrics["loss/crd"])
  for key, (_, state, metrics, _) in results.items():
    pmap = key[0] == "pmap"
    params = jax.tree.map(lambda x: x[0], state.params) if pmap else state.params
    assert jax.tree.structure(params) == jax.tree.structure(ref.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref.params), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=str(key))
    np.testing.assert_allclose(metrics["loss/crd"], ref_metrics["loss/crd"], rtol=1e-5)
    for name, value in memory.items():
      got = state.objective_state["crd"]["memory"][name]
      for copy in (got if pmap else [got]):  # Every device's copy under pmap.
        np.testing.assert_allclose(copy, value, atol=1e-5, rtol=0, err_msg=f"{key} {name}")
