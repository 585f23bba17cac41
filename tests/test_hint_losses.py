"""FitNet, VID, AB, FT and CC (module loss terms) against independent float64 NumPy references.

Each reference reads the module's own initialised (then randomly perturbed) parameters and
batch statistics from its variables and recomputes the loss from the papers' formulas.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from distill_jax.common.outputs import Outputs
from distill_jax.losses import LOSSES, hints, loss_hparams, relations
from distill_jax.losses.base import l2_normalize, layer_tuple
from distill_jax.losses.factor_transfer import ft_distance, ft_factor
from distill_jax.losses.objective import ObjectiveError, build_objective

FITNET, VID, AB, FT, FT_PARA, CC = (LOSSES.get(n) for n in (
    "fitnet", "vid", "ab", "ft", "ft_paraphraser", "cc"))
BN_EPS = 1e-5
# Tiny programs, compiled once each: XLA's backend optimisations cost more than they save.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ------------------------------------------------------------------------------------- helpers


def _outs(features, batch_size=None):
  features = {k: jnp.asarray(v, jnp.float32) for k, v in features.items()}
  b = batch_size or next(iter(features.values())).shape[0]
  return Outputs(jnp.zeros((b, 3), jnp.float32), features, {})


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _key(seed=0):
  """A PRNG key of the 'rbg' kind: it compiles in a fraction of a second on CPU, where the
  default (partitionable threefry) takes several seconds per program."""
  return jax.random.key(seed, impl="rbg")


def _variables(module, s_feats, t_feats, batch, rng):
  """The module's variable tree (shapes from its init), filled with random values from `rng`,
  so the references use the very parameters and statistics the module is applied with."""
  shapes = jax.eval_shape(module.init, {"params": _key(0), "loss": _key(1)}, _outs(s_feats),
                          {"t": _outs(t_feats)}, batch)

  def fill(path, leaf):
    noise = rng.normal(size=leaf.shape)
    name = path[-1].key
    value = (1.0 + 0.3 * noise if name == "scale" else np.exp(0.3 * noise) if name == "var"
             else 0.5 * noise)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def _apply(module, variables, s_feats, t_feats, batch, train, jit=True):
  """(value, updated collections); train=True makes batch_stats mutable, as the train step."""
  args = (_outs(s_feats), {"t": _outs(t_feats)}, batch)
  wrap = _jit if jit else (lambda f: f)
  if train:
    return wrap(functools.partial(module.apply, mutable=["batch_stats"]))(variables, *args)
  return wrap(module.apply)(variables, *args), {}


def _init(module, student, teachers, batch, seed=0):
  """The module's own initial variables (init under jit)."""
  return _jit(module.init)({"params": _key(seed), "loss": _key(seed + 1)}, student, teachers,
                              batch)


def np_bn(x, p, stats, train):
  """BatchNorm over all axes but the last; batch statistics (biased variance) when training."""
  axes = tuple(range(x.ndim - 1))
  mean, var = (x.mean(axes), x.var(axes)) if train else (stats["mean"], stats["var"])
  return (x - mean) / np.sqrt(var + BN_EPS) * p["scale"] + p["bias"], (mean, var)


def np_conv3x3(x, p):
  """3x3 cross-correlation, zero padding 1, plus bias: [B, H, W, C] -> [B, H, W, K]."""
  k, b = p["kernel"], p["bias"]
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros(x.shape[:3] + (k.shape[-1],))
  for dy in range(3):
    for dx in range(3):
      out += np.einsum("bhwc,ck->bhwk", xp[:, dy:dy + h, dx:dx + w, :], k[dy, dx])
  return out + b


def np_pool(x, h, w):
  """Window averages of [B, H, W, C] onto an h x w grid (H, W multiples of h, w)."""
  kh, kw = x.shape[1] // h, x.shape[2] // w
  out = np.zeros((x.shape[0], h, w, x.shape[3]))
  for i in range(h):
    for j in range(w):
      out[:, i, j] = x[:, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(1, 2))
  return out


def leaky(x, slope=0.1):
  return np.where(x >= 0, x, slope * x)


def masked_mean(per_example, mask):
  w = np.ones(len(per_example)) if mask is None else np.float64(mask)
  return np.sum(per_example * w) / np.sum(w)


def _mask(rng, b):
  mask = (rng.random(b) > 0.35).astype(np.float32)
  mask[0] = 1.0
  return mask


def _stats_update(old, batch_mean, batch_var):
  return 0.9 * old["mean"] + 0.1 * batch_mean, 0.9 * old["var"] + 0.1 * batch_var


def _check_gradients(loss, s, params, t):
  """check_grads of `loss(s, params, t)` w.r.t. the student features and the parameters, then
  the gradients w.r.t. (s, params, t), all from one compiled gradient. (check_grads nests the
  function in its own transformations, so it gets a plain jit.)"""
  check_grads(jax.jit(lambda s, params: loss(s, params, t)), (s, params), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)
  return _jit(jax.grad(loss, argnums=(0, 1, 2)))(s, params, t)


def _assert_tree_zero(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.asarray(leaf) == 0)


def _assert_tree_nonzero(tree):
  assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(tree))


# -------------------------------------------------------------------------------------- FitNet


def fitnet_reference(s, t, variables, connector, train, mask):
  p = _np(variables.get("params", {})).get("connector")
  stats = _np(variables.get("batch_stats", {})).get("connector", {}).get("bn")
  new_stats = None
  if connector == "identity":
    y = s
  else:
    if connector == "conv1x1_bn":
      y = np.einsum("...c,ck->...k", s, p["conv"]["kernel"][0, 0])
      y, (m, v) = np_bn(y, p["bn"], stats, train)
      new_stats = _stats_update(stats, m, v)
    else:  # linear
      y = s @ p["dense"]["kernel"] + p["dense"]["bias"]
    y = np.maximum(y, 0.0)
  per = ((y - t) ** 2).reshape(len(s), -1).mean(axis=1)
  return masked_mean(per, mask), new_stats


@pytest.mark.parametrize("s_shape, t_shape, connector", [
    ((2, 4, 4, 3), (2, 4, 4, 5), "conv1x1_bn"),
    ((5, 2, 3, 4), (5, 2, 3, 4), "conv1x1_bn"),
    ((6, 7), (6, 3), "linear"),
    ((3, 2, 2, 4), (3, 2, 2, 4), "identity"),
])
@pytest.mark.parametrize("train", [False, True])
def test_fitnet_matches_numpy(s_shape, t_shape, connector, train):
  rng = np.random.default_rng(len(s_shape) * 10 + s_shape[-1] + train)
  s, t = rng.normal(size=s_shape), np.abs(rng.normal(size=t_shape))
  mask = _mask(rng, s_shape[0])
  module = FITNET(student_layer="h", teacher_layer="g", connector=connector)
  variables = _variables(module, {"h": s}, {"g": t}, {}, rng)
  value, updated = _apply(module, variables, {"h": s}, {"g": t}, {"mask": mask}, train)
  ref, new_stats = fitnet_reference(s, t, variables, connector, train, mask)
  np.testing.assert_allclose(value, ref, rtol=2e-5, atol=1e-6)
  if train and connector == "conv1x1_bn":
    got = updated["batch_stats"]["connector"]["bn"]
    np.testing.assert_allclose(got["mean"], new_stats[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], new_stats[1], rtol=1e-4, atol=1e-5)


def test_fitnet_is_zero_for_equal_features_with_identity():
  x = np.random.default_rng(0).normal(size=(3, 4, 4, 5))
  module = FITNET(student_layer="h", teacher_layer="g", connector="identity")
  value, _ = _apply(module, {}, {"h": x}, {"g": x}, {}, False)
  assert float(value) == 0.0
  assert float(_apply(module, {}, {"h": x}, {"g": -x}, {}, False)[0]) > 1.0


def test_fitnet_batch_stats_update_only_when_mutable():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(4, 2, 2, 3)), rng.normal(size=(4, 2, 2, 6))
  module = FITNET(student_layer="h", teacher_layer="g")
  variables = _variables(module, {"h": s}, {"g": t}, {}, rng)
  eval_value, none = _apply(module, variables, {"h": s}, {"g": t}, {}, False)
  train_value, updated = _apply(module, variables, {"h": s}, {"g": t}, {}, True)
  assert none == {}
  old = variables["batch_stats"]["connector"]["bn"]
  new = updated["batch_stats"]["connector"]["bn"]
  assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
  assert not np.isclose(float(eval_value), float(train_value))
  # Eval mode reads the running statistics: the reference with them agrees.
  np.testing.assert_allclose(
      eval_value, fitnet_reference(s, t, variables, "conv1x1_bn", False, None)[0], rtol=2e-5)


@pytest.mark.parametrize("train", [False, True])
def test_fitnet_gradients_match_finite_differences_and_skip_the_teacher(train):
  rng = np.random.default_rng(2)
  s = jnp.asarray(rng.normal(size=(3, 2, 2, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
  module = FITNET(student_layer="h", teacher_layer="g")
  variables = _variables(module, {"h": s}, {"g": t}, {}, rng)

  def loss(s, params, t):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    return _apply(module, v, {"h": s}, {"g": t}, {}, train, jit=False)[0]

  g_s, g_params, g_t = _check_gradients(loss, s, variables["params"], t)
  _assert_tree_nonzero(g_s)
  _assert_tree_nonzero(g_params)
  _assert_tree_zero(g_t)


# ----------------------------------------------------------------------------------------- VID


def vid_reference(pairs, variables, mask, eps=1e-5):
  params = _np(variables["params"])
  total = 0.0
  for i, (s, t) in enumerate(pairs):
    if s.ndim == 4 and s.shape[1] > t.shape[1]:
      s = np_pool(s, *t.shape[1:3])
    elif s.ndim == 4 and s.shape[1] < t.shape[1]:
      t = np_pool(t, *s.shape[1:3])
    r = params[f"regressor{i}"]
    h = np.maximum(s @ r["conv0"]["kernel"], 0)
    h = np.maximum(h @ r["conv1"]["kernel"], 0)
    mu = h @ r["conv2"]["kernel"]
    var = np.log1p(np.exp(params[f"alpha{i}"])) + eps
    nll = 0.5 * (np.log(var) + (t - mu) ** 2 / var)
    total += masked_mean(nll.reshape(len(s), -1).mean(axis=1), mask)
  return total


@pytest.mark.parametrize("shapes", [
    [((2, 4, 4, 3), (2, 4, 4, 5))],
    [((3, 4, 4, 3), (3, 2, 2, 6)), ((3, 2, 2, 4), (3, 4, 4, 2)), ((3, 2, 2, 5), (3, 2, 2, 5))],
    [((4, 6), (4, 3))],
])
def test_vid_matches_numpy(shapes):
  rng = np.random.default_rng(len(shapes) + shapes[0][0][-1])
  pairs = [(rng.normal(size=a), rng.normal(size=b)) for a, b in shapes]
  names = tuple(f"l{i}" for i in range(len(pairs)))
  s_feats = {n: p[0] for n, p in zip(names, pairs, strict=True)}
  t_feats = {n: p[1] for n, p in zip(names, pairs, strict=True)}
  mask = _mask(rng, shapes[0][0][0])
  module = VID(student_layers=names, teacher_layers=names)
  variables = _variables(module, s_feats, t_feats, {}, rng)
  value, _ = _apply(module, variables, s_feats, t_feats, {"mask": mask}, True)
  np.testing.assert_allclose(value, vid_reference(pairs, variables, mask), rtol=2e-5, atol=1e-6)


def test_vid_initial_variance_and_regressor_widths():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(2, 2, 2, 3)), rng.normal(size=(2, 2, 2, 7))
  args = (_outs({"h": s}), {"t": _outs({"g": t})}, {})
  module = VID(student_layers=("h",), teacher_layers=("g",))
  params = _init(module, *args)["params"]
  var = np.log1p(np.exp(np.float64(params["alpha0"]))) + 1e-5
  np.testing.assert_allclose(var, 5.0, rtol=1e-6)
  for value in (0.1, 5.0, 50.0, 1000.0):
    alpha = hints.softplus_inverse(value - 1e-5)
    np.testing.assert_allclose(np.logaddexp(0.0, alpha) + 1e-5, value, rtol=1e-12)
  for mid in (0, 4):
    module = VID(student_layers=("h",), teacher_layers=("g",), mid_channels=mid)
    shapes = jax.eval_shape(module.init, {"params": _key()}, *args)["params"]
    assert shapes["regressor0"]["conv0"]["kernel"].shape == (3, mid or 7)
    assert shapes["regressor0"]["conv1"]["kernel"].shape == (mid or 7, mid or 7)
    assert shapes["regressor0"]["conv2"]["kernel"].shape == (mid or 7, 7)


def test_vid_gradients_match_finite_differences_and_skip_the_teacher():
  rng = np.random.default_rng(4)
  s = {"a": rng.normal(size=(3, 2, 2, 3)), "b": rng.normal(size=(3, 4, 4, 2))}
  t = {"a": rng.normal(size=(3, 2, 2, 4)), "b": rng.normal(size=(3, 2, 2, 3))}
  module = VID(student_layers=("a", "b"), teacher_layers=("a", "b"))
  variables = _variables(module, s, t, {}, rng)
  s = {k: jnp.asarray(v, jnp.float32) for k, v in s.items()}
  t = {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}

  def loss(s, params, t):
    return _apply(module, {"params": params}, s, t, {}, False, jit=False)[0]

  g_s, g_params, g_t = _check_gradients(loss, s, variables["params"], t)
  _assert_tree_nonzero(g_s)
  _assert_tree_nonzero(g_params)
  _assert_tree_zero(g_t)


# ------------------------------------------------------------------------------------------ AB


def ab_reference(pairs, variables, connectors, train, margin, weights, scale, mask):
  params = _np(variables["params"])
  stats = _np(variables.get("batch_stats", {}))
  total = 0.0
  for i, ((s, t), kind) in enumerate(zip(pairs, connectors, strict=True)):
    if kind == "identity":
      src = s
    else:
      p = params[f"connector{i}"]
      src = np.einsum("...c,ck->...k", s, p["conv"]["kernel"][0, 0])
      src = np_bn(src, p["bn"], stats[f"connector{i}"]["bn"], train)[0]
    value = ((src + margin) ** 2 * ((src > -margin) & (t <= 0))
             + (src - margin) ** 2 * ((src <= margin) & (t > 0)))
    total += weights[i] * scale * masked_mean(value.reshape(len(s), -1).sum(axis=1), mask)
  return total


@pytest.mark.parametrize("train, connector", [(False, "auto"), (True, "conv1x1_bn")])
@pytest.mark.parametrize("margin, weights, scale", [
    (1.0, (0.25, 0.5, 1.0), 0.003), (0.5, (1.0, 2.0, 0.5), 1.0)])
def test_ab_matches_numpy(train, connector, margin, weights, scale):
  rng = np.random.default_rng(int(margin * 10) + train)
  shapes = [((4, 4, 4, 3), (4, 4, 4, 3)), ((4, 2, 2, 3), (4, 2, 2, 5)),
            ((4, 2, 2, 6), (4, 2, 2, 4))]
  pairs = [(rng.normal(size=a) * 2, rng.normal(size=b)) for a, b in shapes]
  names = ("x", "y", "z")
  s_feats = {n: p[0] for n, p in zip(names, pairs, strict=True)}
  t_feats = {n: p[1] for n, p in zip(names, pairs, strict=True)}
  mask = _mask(rng, 4)
  module = AB(student_layers=names, teacher_layers=names, margin=margin, layer_weights=weights,
              scale=scale, connector=connector)
  variables = _variables(module, s_feats, t_feats, {}, rng)
  # 'auto' (the CRD code): identity for the pair of equal channels, 1x1 conv + BN otherwise.
  kinds = ("identity" if connector == "auto" else "bn", "bn", "bn")
  assert ("connector0" in variables["params"]) == (connector != "auto")
  value, _ = _apply(module, variables, s_feats, t_feats, {"mask": mask}, train)
  ref = ab_reference(pairs, variables, kinds, train, margin, weights, scale, mask)
  np.testing.assert_allclose(value, ref, rtol=2e-5, atol=1e-7)


def test_ab_is_zero_when_signs_agree_beyond_the_margin():
  rng = np.random.default_rng(5)
  t = rng.choice([-1.0, 1.0], size=(3, 4, 4, 2)) * rng.uniform(1.5, 3.0, size=(3, 4, 4, 2))
  module = AB(student_layers=("h",), teacher_layers=("g",), layer_weights=(1.0,),
              connector="identity")
  assert float(_apply(module, {}, {"h": t}, {"g": t}, {}, False)[0]) == 0.0
  # Inside the margin, or of the wrong sign, the criterion is positive.
  assert float(_apply(module, {}, {"h": 0.5 * t / 3}, {"g": t}, {}, False)[0]) > 0.0
  assert float(_apply(module, {}, {"h": -t}, {"g": t}, {}, False)[0]) > 0.0
  np.testing.assert_allclose(
      _apply(module, {}, {"h": -t}, {"g": t}, {}, False)[0],
      ab_reference([(-t, t)], {"params": {}}, ("identity",), False, 1.0, (1.0,), 0.003, None),
      rtol=1e-5)


def test_ab_gradients_and_teacher():
  rng = np.random.default_rng(6)
  s = jnp.asarray(rng.normal(size=(3, 2, 2, 3)) * 2, jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
  module = AB(student_layers=("h",), teacher_layers=("g",), layer_weights=(1.0,), scale=1.0)
  variables = _variables(module, {"h": s}, {"g": t}, {}, rng)

  def loss(s, params, t):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    return _apply(module, v, {"h": s}, {"g": t}, {}, False, jit=False)[0]

  g_s, _, g_t = _check_gradients(loss, s, variables["params"], t)
  _assert_tree_nonzero(g_s)
  _assert_tree_zero(g_t)


# ------------------------------------------------------------------------------------------ FT


def translator_reference(s, p, stats, train, slope=0.1):
  x = s
  for i in range(3):
    x = np_conv3x3(x, p[f"conv{i}"])
    x = np_bn(x, p[f"conv{i}_bn"], stats[f"conv{i}_bn"], train)[0]
    x = leaky(x, slope)
  return x


def paraphraser_reference(t, p, decode, slope=0.1):
  x = t
  for i in range(3):
    x = leaky(np_conv3x3(x, p[f"enc{i}"]), slope)
  factor = x
  if decode:
    for i in range(3):
      x = leaky(np_conv3x3(x, p[f"dec{i}"]), slope)
  return factor, x


def ft_reference(s, t, variables, train, form, p, mask):
  params, stats = _np(variables["params"]), _np(variables["batch_stats"])
  f_s = translator_reference(s, params["translator"], stats["translator"], train)
  f_t, _ = paraphraser_reference(t, params["paraphraser"], decode=False)
  if f_s.shape[1] > f_t.shape[1]:
    f_s = np_pool(f_s, *f_t.shape[1:3])
  elif f_s.shape[1] < f_t.shape[1]:
    f_t = np_pool(f_t, *f_s.shape[1:3])

  def unit(f):
    v = f.reshape(len(f), -1) if form == "paper" else (f**2).mean(axis=-1).reshape(len(f), -1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)

  d = np.abs(unit(f_s) - unit(f_t))
  per = np.sum(d**p, axis=1) ** (1.0 / p) if form == "paper" else np.mean(d**p, axis=1)
  return masked_mean(per, mask)


@pytest.mark.parametrize("s_shape, t_shape, form, p, train", [
    ((3, 2, 2, 3), (3, 2, 2, 4), "paper", 1.0, True),
    ((2, 4, 4, 2), (2, 2, 2, 6), "paper", 2.0, False),
    ((2, 2, 2, 4), (2, 4, 4, 2), "repdistiller", 1.0, True),
    ((3, 2, 2, 3), (3, 2, 2, 4), "repdistiller", 2.0, False),
])
def test_ft_transfer_matches_numpy(s_shape, t_shape, form, p, train):
  rng = np.random.default_rng(s_shape[1] * 7 + t_shape[-1] + int(p) + train)
  s, t = rng.normal(size=s_shape), rng.normal(size=t_shape)
  mask = _mask(rng, s_shape[0])
  module = FT(student_layer="h", teacher_layer="g", form=form, p=p)
  variables = _variables(module, {"h": s}, {"g": t}, {}, rng)
  value, _ = _apply(module, variables, {"h": s}, {"g": t}, {"mask": mask}, train)
  np.testing.assert_allclose(value, ft_reference(s, t, variables, train, form, p, mask),
                             rtol=5e-5, atol=1e-6)


def test_ft_paraphraser_reconstruction_matches_numpy_and_shares_the_tree():
  rng = np.random.default_rng(7)
  s, t = rng.normal(size=(3, 2, 2, 5)), rng.normal(size=(3, 4, 4, 4))
  mask = _mask(rng, 3)
  module = FT_PARA(student_layer="h", teacher_layer="g", rate=0.75)
  variables = _variables(module, {"h": s}, {"g": t}, {}, rng)
  value, _ = _apply(module, variables, {"h": s}, {"g": t}, {"mask": mask}, True)
  _, rec = paraphraser_reference(t, _np(variables["params"])["paraphraser"], decode=True)
  ref = masked_mean(((rec - t) ** 2).reshape(3, -1).mean(axis=1), mask)
  np.testing.assert_allclose(value, ref, rtol=2e-5)
  assert variables["params"]["paraphraser"]["enc2"]["kernel"].shape[-1] == 3  # int(0.75 * 4)
  # `ft` in reconstruct mode is the same loss; both modes create the same parameter tree.
  same = FT(student_layer="h", teacher_layer="g", rate=0.75, mode="reconstruct")
  np.testing.assert_allclose(_apply(same, variables, {"h": s}, {"g": t}, {"mask": mask},
                                    True)[0], value, rtol=1e-6)
  transfer = FT(student_layer="h", teacher_layer="g", rate=0.75)
  other = jax.eval_shape(transfer.init, {"params": _key()}, _outs({"h": s}),
                         {"t": _outs({"g": t})}, {})
  assert jax.tree.map(jnp.shape, dict(other)) == jax.tree.map(jnp.shape, dict(variables))


def test_ft_trains_only_the_translator_or_only_the_paraphraser():
  rng = np.random.default_rng(8)
  s, t = rng.normal(size=(3, 2, 2, 3)), rng.normal(size=(3, 2, 2, 4))
  for mode, trained, frozen in [("transfer", "translator", "paraphraser"),
                                ("reconstruct", "paraphraser", "translator")]:
    module = FT(student_layer="h", teacher_layer="g", mode=mode)
    assert module.frozen_params == (frozen,)
    variables = _variables(module, {"h": s}, {"g": t}, {}, rng)

    def loss(params, t, module=module, variables=variables):
      v = {"params": params, "batch_stats": variables["batch_stats"]}
      return _apply(module, v, {"h": s}, {"g": t}, {}, True, jit=False)[0]

    grads, g_t = _jit(jax.grad(loss, argnums=(0, 1)))(variables["params"],
                                                          jnp.asarray(t, jnp.float32))
    _assert_tree_nonzero(grads[trained])
    _assert_tree_zero(grads[frozen])
    _assert_tree_zero(g_t)


def test_ft_pure_functions():
  rng = np.random.default_rng(9)
  f = jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)

  @_jit
  def parts(f):
    out = {}
    for form in ("paper", "repdistiller"):
      u = ft_factor(f, form)
      out[form] = (u, ft_factor(3.0 * f, form), ft_distance(u, u, form, 2.0),
                   jax.grad(lambda x, form=form: ft_distance(x, x, form, 2.0).sum())(u))
    out["zero"] = jax.grad(lambda x: l2_normalize(x).sum())(jnp.zeros((2, 5)))
    return out

  out = parts(f)
  for form in ("paper", "repdistiller"):
    u, u3, dist, grad = out[form]
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(u3, u, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(dist) == 0) and np.all(np.isfinite(grad))
  assert np.all(np.isfinite(out["zero"]))


# ------------------------------------------------------------------------------------------ CC


def cc_reference(s, t, variables, gamma, order, form, mask):
  p = _np(variables["params"])
  e_s = s.reshape(len(s), -1) @ p["embed_s"]["dense"]["kernel"] + p["embed_s"]["dense"]["bias"]
  e_t = t.reshape(len(t), -1) @ p["embed_t"]["dense"]["kernel"] + p["embed_t"]["dense"]["bias"]
  w = np.ones(len(s)) if mask is None else np.float64(mask)
  if form == "repdistiller":
    delta = np.abs(e_s - e_t)
    pairs = [(np.sum(delta[i] * delta[i + 1]), w[i] * w[i + 1]) for i in range(len(s) - 1)]
    return sum(v * pw for v, pw in pairs) / sum(pw for _, pw in pairs)

  def corr(e):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    k = np.zeros((len(e), len(e)))
    for i in range(len(e)):
      for j in range(len(e)):
        x = float(e[i] @ e[j])
        k[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** q / math.factorial(q) * x**q
                      for q in range(order + 1))
    return k

  diff2 = (corr(e_s) - corr(e_t)) ** 2
  return np.sum(w[:, None] * w[None, :] * diff2) / np.sum(w) ** 2


@pytest.mark.parametrize("s_shape, t_shape, gamma, order, form", [
    ((6, 5), (6, 7), 0.4, 2, "paper"), ((4, 3), (4, 3), 1.0, 4, "paper"),
    ((5, 2, 2, 3), (5, 6), 0.4, 2, "paper"), ((6, 5), (6, 7), 0.4, 2, "repdistiller")])
def test_cc_matches_numpy(s_shape, t_shape, gamma, order, form):
  rng = np.random.default_rng(s_shape[0] + order)
  s, t = rng.normal(size=s_shape), rng.normal(size=t_shape)
  some = _mask(rng, s_shape[0])
  some[:2] = 1.0  # At least one consecutive pair of kept examples (the 'repdistiller' form).
  for mask in (None, some):
    batch = {} if mask is None else {"mask": mask}
    module = CC(student_layer="h", teacher_layer="g", embed_dim=4, gamma=gamma, order=order,
                form=form)
    variables = _variables(module, {"h": s}, {"g": t}, {}, rng)
    value, _ = _apply(module, variables, {"h": s}, {"g": t}, batch, True)
    ref = cc_reference(s, t, variables, gamma, order, form, mask)
    np.testing.assert_allclose(value, ref, rtol=5e-5, atol=1e-7)


def test_cc_taylor_kernel_approaches_the_gaussian_rbf():
  rng = np.random.default_rng(10)
  e = rng.normal(size=(5, 4))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  exact = np.exp(-0.4 * np.sum((e[:, None] - e[None]) ** 2, axis=-1))
  approx = relations.rbf_taylor_kernel(jnp.asarray(e, jnp.float32), 0.4, 12)
  np.testing.assert_allclose(approx, exact, rtol=1e-5)


def test_cc_is_zero_when_student_path_equals_teacher_path():
  rng = np.random.default_rng(11)
  x = rng.normal(size=(5, 6))
  module = CC(student_layer="h", teacher_layer="g", embed_dim=8)
  variables = _variables(module, {"h": x}, {"g": x}, {}, rng)
  params = dict(variables["params"])
  params["embed_t"] = params["embed_s"]
  for form in ("paper", "repdistiller"):
    module = CC(student_layer="h", teacher_layer="g", embed_dim=8, form=form)
    value, _ = _apply(module, {"params": params}, {"h": x}, {"g": x}, {}, False)
    assert abs(float(value)) < 1e-7
    assert float(_apply(module, variables, {"h": x}, {"g": x}, {}, False)[0]) > 1e-6


def test_cc_gradients_reach_both_embeddings_but_not_the_teacher():
  rng = np.random.default_rng(12)
  s = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  module = CC(student_layer="h", teacher_layer="g", embed_dim=3)
  variables = _variables(module, {"h": s}, {"g": t}, {}, rng)

  def loss(s, params, t):
    return _apply(module, {"params": params}, {"h": s}, {"g": t}, {}, False, jit=False)[0]

  g_s, g_params, g_t = _check_gradients(loss, s, variables["params"], t)
  _assert_tree_nonzero(g_s)
  _assert_tree_nonzero(g_params["embed_s"])
  _assert_tree_nonzero(g_params["embed_t"])
  _assert_tree_zero(g_t)


# ------------------------------------------------------------------- registry, errors, objective


def test_registered_names_and_defaults():
  expected = {
      "fitnet": {"student_layer": "stage2", "teacher_layer": "stage2",
                 "connector": "conv1x1_bn", "relu": True},
      "vid": {"student_layers": ("stage1", "stage2", "stage3"), "init_pred_var": 5.0,
              "eps": 1e-5, "mid_channels": 0},
      "ab": {"teacher_layers": ("stage1", "stage2", "stage3"), "margin": 1.0,
             "layer_weights": (0.25, 0.5, 1.0), "scale": 0.003, "connector": "conv1x1_bn"},
      "ft": {"student_layer": "stage3", "rate": 0.5, "p": 1.0, "mode": "transfer",
             "form": "paper"},
      "ft_paraphraser": {"teacher_layer": "stage3", "mode": "reconstruct"},
      "cc": {"student_layer": "pool", "embed_dim": 128, "gamma": 0.4, "order": 2},
  }
  for name, defaults in expected.items():
    hparams = loss_hparams(LOSSES.get(name))
    assert "axis_name" not in hparams and hparams["teacher"] is None
    for key, value in defaults.items():
      assert hparams[key] == value, (name, key)


S_FEATS = {"stage1": (4, 4, 4, 3), "stage2": (4, 2, 2, 4), "stage3": (4, 2, 2, 5),
           "pool": (4, 5)}
T_FEATS = {"stage1": (4, 4, 4, 4), "stage2": (4, 2, 2, 6), "stage3": (4, 2, 2, 6),
           "pool": (4, 6)}


def _fake_outputs(rng, shapes):
  return _outs({k: rng.normal(size=v) for k, v in shapes.items()})


@pytest.mark.parametrize("name, settings", [
    ("fitnet", {}), ("vid", {}), ("ab", {}), ("ft", {}), ("cc", {"embed_dim": 16})])
def test_objective_end_to_end(name, settings):
  rng = np.random.default_rng(13)
  student, teachers = _fake_outputs(rng, S_FEATS), {"t": _fake_outputs(rng, T_FEATS)}
  batch = {"mask": _mask(rng, 4)}
  objective = build_objective({name: {"weight": 2.0, **settings}}, ["t"])
  module = LOSSES.get(name)(**settings)
  hp = loss_hparams(LOSSES.get(name))
  for key in ("student_layer", "student_layers"):
    if key in hp:
      assert set(layer_tuple(hp[key])) <= set(objective.student_features)
  params, state = _jit(objective.init)(_key(0), student, teachers, batch)
  has_stats = "batch_stats" in state[name]

  @_jit
  def run(params, state):
    """The objective in train and eval mode, and the module applied directly."""
    variables = {"params": params[name], **state[name]}
    out = {}
    for train in (True, False):
      out[train] = objective(params, state, student, teachers, batch, jnp.asarray(0), _key(1),
                             train=train)
    mutable = ["batch_stats"] if has_stats else False
    direct = module.apply(variables, student, teachers, batch, mutable=mutable)
    return out, direct if has_stats else (direct, {}), module.apply(variables, student,
                                                                       teachers, batch)

  out, (direct_train, updated), direct_eval = run(params, state)
  for train, direct in ((True, direct_train), (False, direct_eval)):
    total, values, new_state = out[train]
    np.testing.assert_allclose(values[name], direct, rtol=1e-6)
    np.testing.assert_allclose(total, 2.0 * direct, rtol=1e-6)
    assert np.isfinite(float(total))
    if train and has_stats:
      jax.tree.map(np.testing.assert_allclose, new_state[name], dict(updated))
      assert all(not np.allclose(a, b) for a, b in zip(
          jax.tree.leaves(new_state[name]), jax.tree.leaves(state[name]), strict=True))
    else:
      jax.tree.map(np.testing.assert_array_equal, new_state[name], state[name])


def test_ft_pretraining_stage_and_main_stage_share_one_term():
  """The paraphraser pre-training stage ('ft' in reconstruct mode, the same loss as
  'ft_paraphraser') creates the very tree the main stage's 'ft' term uses."""
  rng = np.random.default_rng(14)
  student, teachers = _fake_outputs(rng, S_FEATS), {"t": _fake_outputs(rng, T_FEATS)}
  batch = {"label": np.zeros(4, np.int32), "mask": _mask(rng, 4)}
  stage = build_objective({"ft": {"mode": "reconstruct"}}, ["t"])
  main = build_objective({"ce": {}, "ft": {"weight": 200.0, "form": "repdistiller"}}, ["t"])
  params, state = _jit(stage.init)(_key(0), student, teachers, batch)
  main_params, main_state = jax.eval_shape(main.init, _key(0), student, teachers, batch)
  assert "ce" not in main_params
  assert jax.tree.map(jnp.shape, (params, state)) == jax.tree.map(
      jnp.shape, (main_params, main_state))

  @_jit
  def run(params, state):
    variables = {"params": params["ft"], **state["ft"]}
    direct = FT_PARA().apply(variables, student, teachers, batch, mutable=["batch_stats"])
    return (stage(params, state, student, teachers, batch, jnp.asarray(0), _key(1)),
            main(params, state, student, teachers, batch, jnp.asarray(0), _key(1)), direct)

  (_, stage_values, stage_state), (_, main_values, _), (direct, _) = run(params, state)
  np.testing.assert_allclose(stage_values["ft"], direct, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, stage_state["ft"], state["ft"])
  assert np.isfinite(float(main_values["ft"])) and float(main_values["ft"]) > 0


@pytest.mark.parametrize("name, settings, s_shape, t_shape, message", [
    ("fitnet", {"connector": "identity"}, (2, 4, 4, 3), (2, 4, 4, 5),
     r"'h' of shape \(2, 4, 4, 3\).*'g' of shape \(2, 4, 4, 5\).*connector='conv1x1_bn'"),
    ("fitnet", {}, (2, 4, 4, 3), (2, 2, 2, 3),
     r"'h' of shape \(2, 4, 4, 3\).*'g' of shape \(2, 2, 2, 3\).*equal resolution"),
    ("ab", {"layer_weights": (1.0,)}, (2, 4, 4, 3), (2, 2, 2, 5),
     r"'h' of shape \(2, 4, 4, 3\).*'g' of shape \(2, 2, 2, 5\).*equal resolution"),
    ("vid", {}, (2, 3, 3, 3), (2, 2, 2, 5),
     r"'h' of shape \(2, 3, 3, 3\).*'g' of shape \(2, 2, 2, 5\).*whole multiple"),
    ("ft", {}, (2, 3, 3, 3), (2, 2, 2, 5),
     r"'h' of shape \(2, 3, 3, 3\).*'g' of shape \(2, 2, 2, 5\).*whole multiple"),
    ("ft", {}, (2, 3), (2, 5), r"'h' of shape \(2, 3\).*'g' of shape \(2, 5\).*\[B, H, W, C\]"),
    ("ab", {}, (2, 2, 2, 3), (2, 2, 2, 3), r"layer_weights"),
])
def test_shape_errors_name_both_layers_shapes_and_the_fix(name, settings, s_shape, t_shape,
                                                          message):
  rng = np.random.default_rng(15)
  layer_key = "layers" if name in ("vid", "ab") else "layer"
  layers = {f"student_{layer_key}": "h", f"teacher_{layer_key}": "g"}
  if layer_key == "layers":
    layers = {k: (v,) for k, v in layers.items()}
  objective = build_objective({name: {**layers, **settings}}, ["t"])
  with pytest.raises(ObjectiveError, match=rf"Loss term '{name}'.*{message}"):
    _jit(objective.init)(_key(0), _outs({"h": rng.normal(size=s_shape)}),
                   {"t": _outs({"g": rng.normal(size=t_shape)})}, {})
