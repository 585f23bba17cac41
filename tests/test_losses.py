"""Loss terms against independent NumPy/SciPy references, and the objective's validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses
from distill_jax.common.outputs import Outputs
from distill_jax.losses.objective import ObjectiveError, build_objective


def _outputs(logits):
  return Outputs(jnp.asarray(logits, jnp.float32), {}, {})


def kd_reference(s, t, temperature, mask=None):
  """T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean, in float64 NumPy/SciPy."""
  s, t = np.float64(s) / temperature, np.float64(t) / temperature
  log_p_t = scipy.special.log_softmax(t, axis=-1)
  log_p_s = scipy.special.log_softmax(s, axis=-1)
  p_t = np.exp(log_p_t)
  kl = np.sum(scipy.special.xlogy(p_t, p_t) - p_t * log_p_s, axis=-1)
  w = np.ones(len(s)) if mask is None else np.float64(mask)
  return temperature**2 * np.sum(kl * w) / np.sum(w)


def ce_reference(s, labels):
  s = np.float64(s)
  logp = s - scipy.special.logsumexp(s, axis=-1, keepdims=True)
  return -np.mean(logp[np.arange(len(s)), labels])


KD = losses.LOSSES.get("kd")
CE = losses.LOSSES.get("ce")


@pytest.mark.parametrize("shape", [(1, 2), (8, 10), (32, 100)])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_matches_numpy(shape, temperature):
  rng = np.random.default_rng(hash((shape, temperature)) % 2**32)
  s, t = rng.normal(size=shape) * 3, rng.normal(size=shape) * 3
  got = KD(_outputs(s), {"t": _outputs(t)}, {"label": np.zeros(shape[0], int)},
           temperature=temperature)
  np.testing.assert_allclose(got, kd_reference(s, t, temperature), rtol=2e-5, atol=1e-6)


def test_kd_extreme_logits_stay_finite_and_exact():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(16, 10)) * 1e4
  t = rng.normal(size=(16, 10)) * 1e4
  t[0] = -1e30  # A teacher row of equal, huge negative logits: uniform target.
  for temperature in (1.0, 4.0):
    got = float(KD(_outputs(s), {"t": _outputs(t)}, {}, temperature=temperature))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, kd_reference(s, t, temperature), rtol=1e-4)
  grad = jax.grad(lambda x: KD(_outputs(x), {"t": _outputs(t)}, {}, temperature=4.0))(
      jnp.asarray(s, jnp.float32))
  assert np.all(np.isfinite(grad))


def test_kd_is_zero_when_student_equals_teacher_and_positive_otherwise():
  x = np.random.default_rng(1).normal(size=(4, 7))
  assert abs(float(KD(_outputs(x), {"t": _outputs(x)}, {}, temperature=4.0))) < 1e-6
  assert float(KD(_outputs(x), {"t": _outputs(-x)}, {}, temperature=4.0)) > 0.1


def test_kd_respects_mask_and_averages_teachers():
  rng = np.random.default_rng(2)
  s, t1, t2 = (rng.normal(size=(6, 5)) for _ in range(3))
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  got = KD(_outputs(s), {"a": _outputs(t1)}, {"mask": mask}, temperature=2.0)
  np.testing.assert_allclose(got, kd_reference(s, t1, 2.0, mask), rtol=2e-5)
  # Two teachers: the target is the mean of their probabilities at the temperature.
  p = (scipy.special.softmax(t1 / 2.0, -1) + scipy.special.softmax(t2 / 2.0, -1)) / 2
  got = KD(_outputs(s), {"a": _outputs(t1), "b": _outputs(t2)}, {}, temperature=2.0)
  np.testing.assert_allclose(got, kd_reference(s, 2.0 * np.log(p), 2.0), rtol=2e-5)
  got = KD(_outputs(s), {"a": _outputs(t1), "b": _outputs(t2)}, {}, temperature=2.0,
           teacher="b")
  np.testing.assert_allclose(got, kd_reference(s, t2, 2.0), rtol=2e-5)


def test_kd_gradient_matches_finite_differences_and_ignores_teacher():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  f = lambda x: KD(_outputs(x), {"t": _outputs(t)}, {}, temperature=3.0)
  check_grads(f, (jnp.asarray(s, jnp.float32),), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  teacher_grad = jax.grad(
      lambda y: KD(_outputs(s), {"t": _outputs(y)}, {}, temperature=3.0))(
          jnp.asarray(t, jnp.float32))
  assert np.all(teacher_grad == 0)


def test_ce_matches_numpy_with_label_smoothing():
  rng = np.random.default_rng(4)
  s, labels = rng.normal(size=(8, 10)) * 5, rng.integers(0, 10, 8)
  np.testing.assert_allclose(CE(_outputs(s), {}, {"label": labels}), ce_reference(s, labels),
                             rtol=1e-5)
  smooth = CE(_outputs(s), {}, {"label": labels}, label_smoothing=0.1)
  logp = s - scipy.special.logsumexp(s, -1, keepdims=True)
  target = np.eye(10)[labels] * 0.9 + 0.01
  np.testing.assert_allclose(smooth, -np.mean(np.sum(target * logp, -1)), rtol=1e-5)


def test_objective_weighs_terms_and_warms_up():
  rng = np.random.default_rng(5)
  s, t = rng.normal(size=(8, 10)), rng.normal(size=(8, 10))
  labels = rng.integers(0, 10, 8)
  objective = build_objective(
      {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0, "warmup_steps": 10}},
      ["t"])
  batch = {"label": labels}
  for step, ramp in [(0, 0.0), (5, 0.5), (10, 1.0), (20, 1.0)]:
    total, terms, _ = objective({}, {}, _outputs(s), {"t": _outputs(t)}, batch,
                                jnp.asarray(step), jax.random.PRNGKey(0))
    expected = 0.1 * ce_reference(s, labels) + 0.9 * ramp * kd_reference(s, t, 4.0)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(terms["kd"], kd_reference(s, t, 4.0), rtol=1e-5)


@pytest.mark.parametrize("losses_config, teachers, message", [
    ({"kdd": {}}, ["t"], "Did you mean 'kd'"),
    ({"kd": {"temprature": 2.0}}, ["t"], "temprature"),
    ({"kd": {}}, [], "config.teachers is empty"),
    ({"kd": {"teacher": "nope"}}, ["t"], "names teacher 'nope'"),
    ({}, [], "config.losses is empty"),
])
def test_objective_rejects_bad_configs_clearly(losses_config, teachers, message):
  with pytest.raises((ObjectiveError, KeyError), match=message):
    build_objective(losses_config, teachers)


def test_registering_a_name_twice_fails():
  with pytest.raises(ValueError, match="already registered"):
    losses.register_loss("kd")(lambda *a, **k: 0.0)


def _mixture_reference(teacher_logits, temperature, weights):
  """log sum_i w_i[b] softmax(t_i[b] / T) in float64."""
  probs = np.stack([scipy.special.softmax(np.float64(t) / temperature, -1)
                    for t in teacher_logits])
  return np.log(np.einsum("nb,nbk->bk", weights, probs))


@pytest.mark.parametrize("aggregation", ["mean", "weighted", "entropy", "true_label"])
def test_multi_teacher_kd_aggregations_match_numpy(aggregation):
  rng = np.random.default_rng(7)
  s = rng.normal(size=(6, 5)) * 2
  ts = [rng.normal(size=(6, 5)) * 3 for _ in range(3)]
  labels = rng.integers(0, 5, 6)
  fixed = (1.0, 2.0, 5.0)
  p1 = [scipy.special.softmax(np.float64(t), -1) for t in ts]  # Confidence is taken at T = 1.
  if aggregation == "mean":
    w = np.full((3, 6), 1 / 3)
  elif aggregation == "weighted":
    w = np.repeat((np.array(fixed) / 8.0)[:, None], 6, axis=1)
  elif aggregation == "entropy":
    w = scipy.special.softmax(np.stack([np.sum(p * np.log(p), -1) for p in p1]), axis=0)
  else:
    p_true = np.stack([p[np.arange(6), labels] for p in p1])
    w = p_true / p_true.sum(0)
  teachers = {f"t{i}": _outputs(t) for i, t in enumerate(ts)}
  got = KD(_outputs(s), teachers, {"label": labels}, temperature=2.0, aggregation=aggregation,
           teacher_weights=fixed)
  want = kd_reference(s, 2.0 * _mixture_reference(ts, 2.0, w), 2.0)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  # With one teacher every aggregation is plain KD.
  one = KD(_outputs(s), {"t": _outputs(ts[0])}, {"label": labels}, temperature=2.0,
           aggregation=aggregation, teacher_weights=fixed[:1])
  np.testing.assert_allclose(one, kd_reference(s, ts[0], 2.0), rtol=2e-5)


def test_kl_is_shared_from_base_and_matches_numpy():
  """`base.kl`, the KL every logit and token loss (and the LM task's metric) uses: the NumPy
  sum over the last axis, with 0 * log 0 = 0 where p has zeros."""
  from distill_jax.losses.base import kl

  rng = np.random.default_rng(0)
  p = scipy.special.softmax(rng.normal(size=(3, 4, 7)), axis=-1)
  q = scipy.special.softmax(rng.normal(size=(3, 4, 7)), axis=-1)
  p[0, 0, :3] = 0.0
  p[0, 0] /= p[0, 0].sum()
  with np.errstate(divide="ignore"):
    log_p = np.log(p)
  want = np.sum(scipy.special.xlogy(p, p) - p * np.log(q), axis=-1)
  got = kl(jnp.asarray(log_p, jnp.float32), jnp.asarray(np.log(q), jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_no_private_name_is_imported_across_loss_modules():
  """Shared math lives public in `losses/base.py`: no module imports a `_name` from
  `distill_jax.losses.*` (a private helper used elsewhere is a shared one in disguise)."""
  import ast
  import pathlib

  root = pathlib.Path(losses.__file__).parent.parent
  found = []
  for path in root.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
          "distill_jax.losses"):
        found += [f"{path.relative_to(root)}: {node.module}.{a.name}" for a in node.names
                  if a.name.startswith("_")]
  assert not found, found


def test_every_registered_loss_registers_on_import_from_the_module_that_declares_it():
  """`import distill_jax.losses` registers every `@register_loss` of the package's modules
  (losses/__init__.py imports each module: one left out would leave its names unknown), and
  each name is registered by the module whose source declares it."""
  import ast
  import pathlib

  package = pathlib.Path(losses.__file__).parent
  declared = {}
  for path in sorted(package.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_loss"
          and node.args and isinstance(node.args[0], ast.Constant)):
        declared[node.args[0].value] = f"distill_jax.losses.{path.stem}"
  assert len(declared) >= 28, sorted(declared)  # Every built-in loss; none hides from the parse.
  registered = {name: losses.LOSSES.get(name).__module__ for name in declared
                if name in losses.LOSSES}
  assert registered == declared
