"""AT, SP, RKD, PKT, NST and FSP against independent float64 NumPy/SciPy references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses
from distill_jax.common.outputs import Outputs
from distill_jax.losses import features as F
from distill_jax.losses import relations as R
from distill_jax.losses.base import avg_pool_to
from distill_jax.losses.objective import ObjectiveError, build_objective

NAMES = ("at", "sp", "rkd", "pkt", "nst", "fsp")


def _jit(name):
  """The registered loss, jitted with its hyper-parameters static (one compile per shape)."""
  fn = losses.LOSSES.get(name)
  return jax.jit(fn, static_argnames=tuple(losses.loss_hparams(fn)))


FNS = {name: _jit(name) for name in NAMES}

# Feature shapes (without the batch axis) of a fake student and a fake teacher: the teacher is
# wider except where FSP needs equal widths (stem and stage1..3 of the "fsp" set).
STUDENT = {"stem": (8, 8, 3), "stage1": (8, 8, 4), "stage2": (4, 4, 6), "stage3": (2, 2, 8),
           "pool": (8,)}
TEACHER = {"stem": (8, 8, 5), "stage1": (8, 8, 8), "stage2": (4, 4, 12), "stage3": (2, 2, 16),
           "pool": (16,)}


def _features(rng, shapes, batch, scale=1.0, relu=True):
  out = {}
  for name, shape in shapes.items():
    x = rng.normal(size=(batch, *shape)) * scale
    out[name] = np.maximum(x, 0.0) if relu and name != "pool" else x
  return out


def _outputs(features, dtype=jnp.float32):
  batch = len(next(iter(features.values())))
  return Outputs(jnp.zeros((batch, 3), dtype),
                 {k: jnp.asarray(v, dtype) for k, v in features.items()}, {})


def _pair(seed, batch, *, teacher_shapes=None, scale=1.0):
  rng = np.random.default_rng(seed)
  s = _features(rng, STUDENT, batch, scale)
  t = _features(rng, teacher_shapes or TEACHER, batch, scale)
  return s, t


def _call(name, s, t, batch=None, **hp):
  return FNS[name](_outputs(s), {"t": _outputs(t)}, batch or {}, **hp)


# ------------------------------------------------------------- references (float64, by formula)


def _pool_ref(x, spatial):
  """Average-pools [B, H, W, C] to [B, h, w, C] block by block (integer ratio)."""
  b, h_in, w_in, c = x.shape
  h, w = spatial
  rh, rw = h_in // h, w_in // w
  out = np.zeros((b, h, w, c))
  for i, j in itertools.product(range(h), range(w)):
    out[:, i, j] = x[:, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw].mean(axis=(1, 2))
  return out


def _unit(v, axis=None):
  """v / ||v||, and 0 for a zero vector (the F.normalize convention the losses follow)."""
  norm = np.linalg.norm(v, axis=axis, keepdims=axis is not None)
  return v / np.maximum(norm, 1e-300)


def at_reference(s_list, t_list, p=2.0):
  total = 0.0
  for s, t in zip(s_list, t_list, strict=True):
    per_pos = []
    for fs, ft in zip(np.float64(s), np.float64(t), strict=True):
      a_s = (np.abs(fs) ** p).sum(axis=-1).ravel()  # Sum over channels: same after normalising.
      a_t = (np.abs(ft) ** p).sum(axis=-1).ravel()
      per_pos.append((_unit(a_s) - _unit(a_t)) ** 2)
    total += np.mean(per_pos)
  return total


def sp_reference(s_list, t_list):
  total = 0.0
  for s, t in zip(s_list, t_list, strict=True):
    b = len(s)
    gs = [np.float64(x).reshape(b, -1) @ np.float64(x).reshape(b, -1).T for x in (s, t)]
    gs = [_unit(g, axis=1) for g in gs]
    total += np.sum((gs[0] - gs[1]) ** 2) / b**2
  return total


def rkd_reference(s, t, wd=25.0, wa=50.0):
  s, t = np.float64(s).reshape(len(s), -1), np.float64(t).reshape(len(t), -1)
  b = len(s)

  def dist(x):
    d = scipy.spatial.distance.cdist(x, x)
    return d / (d.sum() / (b * (b - 1)))

  def angles(x):
    out = np.zeros((b, b, b))
    for j, i, k in itertools.product(range(b), repeat=3):
      if i != j and k != j:
        u, v = x[i] - x[j], x[k] - x[j]
        out[j, i, k] = _unit(u) @ _unit(v)
    return out

  loss_d = np.mean(scipy.special.huber(1.0, dist(s) - dist(t)))
  loss_a = np.mean(scipy.special.huber(1.0, angles(s) - angles(t)))
  return wd * loss_d + wa * loss_a


def pkt_reference(s, t, eps=1e-7):
  def probs(x):
    x = np.float64(x).reshape(len(x), -1)
    x = x / (np.sqrt((x**2).sum(1, keepdims=True)) + eps)
    k = (x @ x.T + 1.0) / 2.0
    return k / k.sum(1, keepdims=True)

  p_s, p_t = probs(s), probs(t)
  return np.mean(p_t * np.log((p_t + eps) / (p_s + eps)))


def nst_reference(s_list, t_list):
  total = 0.0
  for s, t in zip(s_list, t_list, strict=True):
    s, t = np.float64(s), np.float64(t)
    if s.shape[1] > t.shape[1]:
      s = _pool_ref(s, t.shape[1:3])
    elif t.shape[1] > s.shape[1]:
      t = _pool_ref(t, s.shape[1:3])
    mmd = []
    for fs, ft in zip(s, t, strict=True):
      xs = [_unit(c) for c in fs.reshape(-1, fs.shape[-1]).T]
      xt = [_unit(c) for c in ft.reshape(-1, ft.shape[-1]).T]
      k = lambda xa, xb: np.mean([(a @ b) ** 2 for a in xa for b in xb])
      mmd.append(k(xt, xt) + k(xs, xs) - 2 * k(xs, xt))
    total += np.mean(mmd)
  return total


def fsp_reference(s_list, t_list):
  def fsp(f1, f2):
    f1, f2 = np.float64(f1), np.float64(f2)
    if f1.shape[1] > f2.shape[1]:
      f1 = _pool_ref(f1, f2.shape[1:3])
    elif f2.shape[1] > f1.shape[1]:
      f2 = _pool_ref(f2, f1.shape[1:3])
    return np.stack([a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1]) / (a.size
                     // a.shape[-1]) for a, b in zip(f1, f2, strict=True)])

  total = 0.0
  for i in range(len(s_list) - 1):
    total += np.mean((fsp(s_list[i], s_list[i + 1]) - fsp(t_list[i], t_list[i + 1])) ** 2)
  return total


DEFAULT_LAYERS = {"at": ("stage1", "stage2", "stage3"), "sp": ("stage3",), "rkd": "pool",
                  "pkt": "pool", "nst": ("stage1", "stage2", "stage3"),
                  "fsp": ("stem", "stage1", "stage2", "stage3")}
FSP_TEACHER = {k: (v[:-1] + (STUDENT[k][-1],) if k != "pool" else v) for k, v in TEACHER.items()}


def reference(name, s, t):
  """The named loss with its default layers, from the feature dicts."""
  layers = DEFAULT_LAYERS[name]
  if isinstance(layers, str):
    return {"rkd": rkd_reference, "pkt": pkt_reference}[name](s[layers], t[layers])
  refs = {"at": at_reference, "sp": sp_reference, "nst": nst_reference, "fsp": fsp_reference}
  return refs[name]([s[n] for n in layers], [t[n] for n in layers])


def _inputs(name, seed, batch, scale=1.0):
  return _pair(seed, batch, teacher_shapes=FSP_TEACHER if name == "fsp" else None, scale=scale)


# -------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", NAMES)
def test_default_layers_match_numpy(name):
  s, t = _inputs(name, 7 + NAMES.index(name), 6)
  np.testing.assert_allclose(_call(name, s, t), reference(name, s, t), rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("s_shape, t_shape, p", [
    ((3, 4, 4, 2), (3, 4, 4, 7), 2.0), ((4, 6, 5, 3), (4, 6, 5, 3), 3.0),
    ((2, 7, 1), (2, 7, 4), 1.5)])  # The last: token features [B, L, C].
def test_at_shapes_and_p_match_numpy(s_shape, t_shape, p):
  rng = np.random.default_rng(11)
  s, t = rng.normal(size=s_shape), rng.normal(size=t_shape)
  got = _call("at", {"a": s}, {"b": t}, student_layers="a", teacher_layers="b", p=p)
  np.testing.assert_allclose(got, at_reference([s], [t], p), rtol=2e-4)
  np.testing.assert_allclose(F.attention_map(jnp.asarray(s), p)[0],
                             _unit((np.abs(s[0]) ** p).sum(-1).ravel()), rtol=1e-5)


def _adaptive_pool_ref(x, spatial):
  """PyTorch's adaptive_avg_pool2d bins, by hand: cell i of S -> O covers floor(i S / O) ..
  ceil((i + 1) S / O) - 1 (overlapping when O does not divide S)."""
  b, h_in, w_in, c = x.shape
  h, w = spatial
  out = np.zeros((b, h, w, c))
  for i, j in itertools.product(range(h), range(w)):
    r0, r1 = (i * h_in) // h, int(np.ceil((i + 1) * h_in / h))
    c0, c1 = (j * w_in) // w, int(np.ceil((j + 1) * w_in / w))
    out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("s_shape, t_shape", [
    ((3, 8, 8, 2), (3, 4, 4, 5)),  # The student's map is pooled (ResNet-50 -> vgg8 style).
    ((2, 4, 4, 3), (2, 8, 8, 3)),  # The teacher's (e.g. vgg13 stage4 against MobileNetV2's).
    ((2, 7, 5, 2), (2, 3, 2, 4)),  # Non-integer ratios: overlapping bins, as adaptive pooling.
    ((2, 4, 4, 2), (2, 4, 4, 3))])  # Equal sizes: pooling changes nothing.
def test_at_pool_to_smaller_matches_numpy(s_shape, t_shape):
  rng = np.random.default_rng(15)
  s, t = rng.normal(size=s_shape), rng.normal(size=t_shape)
  spatial = tuple(min(a, b) for a, b in zip(s_shape[1:3], t_shape[1:3], strict=True))
  want = at_reference([_adaptive_pool_ref(s, spatial)], [_adaptive_pool_ref(t, spatial)])
  got = _call("at", {"a": s}, {"b": t}, student_layers="a", teacher_layers="b",
              pool_to_smaller=True)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  np.testing.assert_allclose(F.adaptive_avg_pool(jnp.asarray(s, jnp.float32), spatial),
                             _adaptive_pool_ref(s, spatial), rtol=1e-5, atol=1e-6)
  if s_shape[1:3] != t_shape[1:3]:  # The default still refuses, naming the option.
    with pytest.raises(ValueError, match="pool_to_smaller=True"):
      _call("at", {"a": s}, {"b": t}, student_layers="a", teacher_layers="b")


def test_at_pool_to_smaller_refuses_maps_larger_on_different_axes():
  rng = np.random.default_rng(16)
  s, t = rng.normal(size=(2, 4, 8, 2)), rng.normal(size=(2, 8, 4, 2))
  with pytest.raises(ValueError, match=r"'a'.*\(2, 4, 8, 2\)"):
    _call("at", {"a": s}, {"b": t}, student_layers="a", teacher_layers="b",
          pool_to_smaller=True)


def test_core_array_functions_match_numpy():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(5, 7))
  core = jax.jit(lambda v, m: (R.pairwise_distances(v), R.angle_matrix(v),
                               R.pkt_probabilities(v), avg_pool_to(m, (2, 3)),
                               F.fsp_matrix(m, m[:, ::2, ::2, :2])))
  maps = rng.normal(size=(2, 4, 6, 3))
  dist, angles, probs, pooled, fsp = core(jnp.asarray(x, jnp.float32),
                                          jnp.asarray(maps, jnp.float32))
  np.testing.assert_allclose(dist, scipy.spatial.distance.cdist(x, x), rtol=1e-5, atol=1e-6)
  u, v = x[0] - x[3], x[4] - x[3]  # The angle at anchor 3 between x_0 and x_4.
  np.testing.assert_allclose(angles[3, 0, 4], _unit(u) @ _unit(v), rtol=1e-5)
  assert angles[3, 3, 4] == 0 and angles[3, 0, 3] == 0
  cos = (_unit(x, axis=1) @ _unit(x, axis=1).T + 1) / 2
  np.testing.assert_allclose(probs, cos / cos.sum(1, keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(pooled, _pool_ref(maps, (2, 3)), rtol=1e-5, atol=1e-6)
  small = maps[:, ::2, ::2, :2]
  expected = np.einsum("bhwi,bhwj->bij", _pool_ref(maps, (2, 3)), small) / 6
  np.testing.assert_allclose(fsp, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("s_shape, t_shape", [((4, 10), (4, 3)), ((3, 2, 2, 5), (3, 4, 4, 2))])
def test_sp_rkd_pkt_shapes_match_numpy(s_shape, t_shape):
  rng = np.random.default_rng(12)
  s, t = rng.normal(size=s_shape), rng.normal(size=t_shape)
  kw = {"student_layers": "a", "teacher_layers": "b"}
  np.testing.assert_allclose(_call("sp", {"a": s}, {"b": t}, **kw), sp_reference([s], [t]),
                             rtol=2e-4)
  kw = {"student_layer": "a", "teacher_layer": "b"}
  np.testing.assert_allclose(
      _call("rkd", {"a": s}, {"b": t}, distance_weight=2.0, angle_weight=3.0, **kw),
      rkd_reference(s, t, 2.0, 3.0), rtol=2e-4)
  np.testing.assert_allclose(_call("pkt", {"a": s}, {"b": t}, **kw), pkt_reference(s, t),
                             rtol=2e-4, atol=1e-8)


@pytest.mark.parametrize("s_shape, t_shape", [
    ((3, 4, 4, 5), (3, 2, 2, 9)), ((2, 2, 3, 4), (2, 4, 6, 3)), ((2, 3, 3, 2), (2, 3, 3, 6))])
def test_nst_pools_the_larger_map_and_matches_numpy(s_shape, t_shape):
  rng = np.random.default_rng(13)
  s, t = np.abs(rng.normal(size=s_shape)), rng.normal(size=t_shape)
  got = _call("nst", {"a": s}, {"b": t}, student_layers="a", teacher_layers="b")
  np.testing.assert_allclose(got, nst_reference([s], [t]), rtol=2e-4, atol=1e-7)


def test_fsp_pools_within_each_network_and_matches_numpy():
  rng = np.random.default_rng(14)
  s = [rng.normal(size=shape) for shape in ((3, 8, 8, 2), (3, 4, 4, 3), (3, 4, 4, 5))]
  t = [rng.normal(size=shape) for shape in ((3, 4, 4, 2), (3, 8, 8, 3), (3, 2, 2, 5))]
  names = ("x", "y", "z")
  got = _call("fsp", dict(zip(names, s, strict=True)), dict(zip(names, t, strict=True)),
              student_layers=names, teacher_layers=names)
  np.testing.assert_allclose(got, fsp_reference(s, t), rtol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_equals_teacher(name):
  s, _ = _inputs(name, 21, 6)
  assert abs(float(_call(name, s, s))) < 1e-6
  _, t = _inputs(name, 22, 6)
  assert float(_call(name, s, t)) > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_large_and_degenerate_features_stay_finite_and_teacher_gets_no_gradient(name):
  s, t = _inputs(name, 31, 6, scale=1e3)
  for feats in (s, t):  # A dead (all-zero) example and two identical ones in both networks.
    for k in feats:
      feats[k][0] = 0.0
      feats[k][2] = feats[k][1]
  value, (s_grad, t_grad) = jax.value_and_grad(
      lambda fs, ft: FNS[name](_outputs(fs), {"t": _outputs(ft)}, {}), argnums=(0, 1))(
          *({k: jnp.asarray(v, jnp.float32) for k, v in x.items()} for x in (s, t)))
  assert np.isfinite(float(value))
  np.testing.assert_allclose(value, reference(name, s, t), rtol=2e-3, atol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(s_grad))
  assert any(np.any(g != 0) for g in jax.tree.leaves(s_grad))
  assert all(np.all(g == 0) for g in jax.tree.leaves(t_grad))


# Smaller layer sets for the float64 gradient checks (each compiles once more, in float64).
GRAD_LAYERS = {"at": ("stage2",), "nst": ("stage2",), "sp": ("stage3",),
               "fsp": ("stage1", "stage2")}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
  s, t = _inputs(name, 41, 4)
  hp = ({"student_layers": GRAD_LAYERS[name], "teacher_layers": GRAD_LAYERS[name]}
        if name in GRAD_LAYERS else {})
  with jax.enable_x64(True):
    teachers = {"t": _outputs(t, jnp.float64)}
    feats = {k: jnp.asarray(v + 0.1, jnp.float64) for k, v in s.items()}  # Away from 0.
    loss = jax.jit(lambda f: FNS[name](Outputs(jnp.zeros((4, 3)), f, {}), teachers, {}, **hp))
    check_grads(loss, (feats,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_mask_drops_padded_examples(name):
  s, t = _inputs(name, 51, 6)
  mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
  keep = mask.astype(bool)
  got = _call(name, s, t, {"mask": mask})
  kept = reference(name, {k: v[keep] for k, v in s.items()}, {k: v[keep] for k, v in t.items()})
  np.testing.assert_allclose(got, kept, rtol=2e-4, atol=1e-7)
  ones = _call(name, s, t, {"mask": np.ones(6, np.float32)})
  np.testing.assert_allclose(ones, _call(name, s, t), rtol=1e-5, atol=1e-8)


def test_named_teacher_is_used():
  s, t = _pair(61, 4)
  _, other = _pair(62, 4)
  teachers = {"a": _outputs(other), "b": _outputs(t)}
  for name in ("at", "rkd"):
    got = FNS[name](_outputs(s), teachers, {}, teacher="b")
    np.testing.assert_allclose(got, reference(name, s, t), rtol=2e-4)
  with pytest.raises(ValueError, match="set the term's `teacher`"):
    FNS["at"](_outputs(s), teachers, {})


@pytest.mark.parametrize("name, s_shape, t_shape, hp", [
    ("at", (2, 4, 4, 3), (2, 2, 2, 3), {}),
    ("nst", (2, 4, 4, 3), (2, 3, 3, 3), {}),
    ("fsp", (2, 4, 4, 3), (2, 4, 4, 5), {}),
    ("sp", (2, 4), (3, 4), {}),
    ("rkd", (2, 4), (3, 4), {}),
    ("pkt", (2, 4), (3, 4), {}),
])
def test_shape_mismatch_names_both_layers_and_shapes(name, s_shape, t_shape, hp):
  rng = np.random.default_rng(71)
  s = {"s_feat": rng.normal(size=s_shape)}
  t = {"t_feat": rng.normal(size=t_shape)}
  if name == "fsp":  # Two layers per network; the mismatch is in the second.
    s = {"s_first": rng.normal(size=s_shape), **s}
    t = {"t_first": rng.normal(size=s_shape), **t}
    hp = {"student_layers": ("s_first", "s_feat"), "teacher_layers": ("t_first", "t_feat")}
  elif name in ("rkd", "pkt"):
    hp = {"student_layer": "s_feat", "teacher_layer": "t_feat"}
  else:
    hp = {"student_layers": ("s_feat",), "teacher_layers": ("t_feat",)}
  with pytest.raises(ValueError) as info:
    _call(name, s, t, **hp)
  message = str(info.value)
  for part in ("'s_feat'", "'t_feat'", str(tuple(s_shape)), str(tuple(t_shape))):
    assert part in message
  # Through the objective, the message also names the term.
  objective = build_objective({"mine": {"loss": name, **hp}}, ["t"])
  with pytest.raises(ObjectiveError, match=r"Loss term 'mine' \(loss '" + name):
    objective({}, {}, _outputs(s), {"t": _outputs(t)}, {}, jnp.asarray(0),
              jax.random.PRNGKey(0))


def test_feature_maps_are_required_where_positions_matter():
  s, t = _pair(72, 2)
  for name in ("at", "nst"):
    with pytest.raises(ValueError, match="needs feature maps"):
      _call(name, s, t, student_layers=("pool",), teacher_layers=("pool",))
  with pytest.raises(ValueError, match="integer multiples"):
    _call("fsp", {"a": np.ones((2, 4, 4, 2)), "b": np.ones((2, 3, 3, 2))},
          {"a": np.ones((2, 4, 4, 2)), "b": np.ones((2, 4, 4, 2))},
          student_layers=("a", "b"), teacher_layers=("a", "b"))


@pytest.mark.parametrize("name", NAMES)
def test_objective_end_to_end(name):
  s, t = _inputs(name, 81, 6)
  objective = build_objective({name: {"weight": 0.5}}, ["t"])
  assert set(objective.student_features) == set(np.atleast_1d(DEFAULT_LAYERS[name]))
  assert set(objective.teacher_features("t")) == set(np.atleast_1d(DEFAULT_LAYERS[name]))
  student, teachers, batch = _outputs(s), {"t": _outputs(t)}, {}
  params, state = objective.init(jax.random.PRNGKey(0), student, teachers, batch)
  assert params == {} and state == {}
  total, values, _ = jax.jit(lambda *args: objective(*args))(
      params, state, student, teachers, batch, jnp.asarray(0), jax.random.PRNGKey(1))
  direct = FNS[name](student, teachers, batch)
  np.testing.assert_allclose(values[name], direct, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(total, 0.5 * direct, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(values[name], reference(name, s, t), rtol=2e-4, atol=1e-7)
