"""DKD, logit MSE, reverse KL and generalized JSD against float64 NumPy/SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses
from distill_jax.common.outputs import Outputs
from distill_jax.losses import logits as logit_losses
from distill_jax.losses.objective import ObjectiveError, build_objective

NAMES = ("dkd", "logit_mse", "reverse_kl", "gjsd")


TEACHER_ARGS = ("teacher", "aggregation", "teacher_weights")


def _jit(name, static=TEACHER_ARGS):
  """The registered loss, jitted as the objective runs it.

  Compiling, not computing, is what takes the time here, so each shape should compile once:
  every hyper-parameter is passed (defaults filled in), the float ones traced, and the batch gets
  fixed dtypes, dummy labels when it has none and an all-ones mask when it has none (the no-mask
  path is checked in `test_per_token_logits_and_masks`). gjsd's beta is static: its endpoints
  are special cases.
  """
  loss = losses.LOSSES.get(name)
  defaults = losses.loss_hparams(loss)
  jitted = jax.jit(loss, static_argnames=static)

  def fn(student, teachers, batch, **hparams):
    shape = student.logits.shape
    batch = {"label": np.zeros(shape[:-1]), "mask": np.ones(shape[:1]), **batch}
    batch = {k: np.asarray(v, np.int32 if k == "label" else np.float32) for k, v in batch.items()}
    return jitted(student, teachers, batch, **{**defaults, **hparams})

  return fn


DKD, MSE, RKL = _jit("dkd"), _jit("logit_mse"), _jit("reverse_kl")
KD = _jit("kd")
GJSD = _jit("gjsd", ("beta", *TEACHER_ARGS))
FNS = {"dkd": DKD, "logit_mse": MSE, "reverse_kl": RKL, "gjsd": GJSD}


def _outputs(logits):
  return Outputs(jnp.asarray(logits, jnp.float32), {}, {})


def _grads(fn, s, t, batch, **hparams):
  """Gradients (NumPy) of a loss w.r.t. the student's and the teacher's logits."""
  grads = jax.grad(lambda x, y: fn(_outputs(x), {"t": _outputs(y)}, batch, **hparams),
                   argnums=(0, 1))(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  return tuple(map(np.asarray, grads))


# ---------------------------------------------------------------- references (float64, per row)


def _mean(per_example, mask):
  w = np.ones(len(per_example)) if mask is None else np.float64(mask)
  return np.sum(per_example * w) / np.sum(w)


def _kl_rows(log_p, log_q):
  """KL(p || q) per row from log-probabilities; 0 * log 0 = 0."""
  p = np.exp(log_p)
  return np.sum(np.where(p > 0, p * (log_p - np.where(p > 0, log_q, 0.0)), 0.0), axis=-1)


def dkd_parts_reference(s, t, labels, temperature):
  """Per-row (TCKD, NCKD) without T^2: the target class is deleted from the row outright."""
  tckd, nckd = [], []
  for s_row, t_row, y in zip(np.float64(s) / temperature, np.float64(t) / temperature, labels,
                             strict=True):
    parts = []
    for row in (t_row, s_row):
      logp = scipy.special.log_softmax(row)
      rest = np.delete(logp, y)
      binary = np.array([logp[y], scipy.special.logsumexp(rest)])
      parts.append((binary, scipy.special.log_softmax(np.delete(row, y))))
    (bt, nt), (bs, ns) = parts
    tckd.append(_kl_rows(bt, bs))
    nckd.append(_kl_rows(nt, ns))
  return np.array(tckd), np.array(nckd)


def dkd_reference(s, t, labels, alpha, beta, temperature, mask=None):
  tckd, nckd = dkd_parts_reference(s, t, labels, temperature)
  return temperature**2 * _mean(alpha * tckd + beta * nckd, mask)


def dkd_paper_code_reference(s, t, labels, alpha, beta, temperature):
  """The DKD paper's formulation with explicit probabilities: [p_y, 1 - p_y] from the softmax,
  and the non-target distribution as softmax(x / T - 1000 * onehot(y))."""
  s, t = np.float64(s) / temperature, np.float64(t) / temperature
  gt = np.eye(s.shape[-1])[labels]
  p_s, p_t = scipy.special.softmax(s, -1), scipy.special.softmax(t, -1)
  b_s = np.stack([np.sum(p_s * gt, -1), np.sum(p_s * (1 - gt), -1)], -1)
  b_t = np.stack([np.sum(p_t * gt, -1), np.sum(p_t * (1 - gt), -1)], -1)
  tckd = np.sum(b_t * (np.log(b_t) - np.log(b_s)), -1)
  q_s = scipy.special.softmax(s - 1000.0 * gt, -1)
  q_t = scipy.special.softmax(t - 1000.0 * gt, -1)
  nckd = np.sum(scipy.special.xlogy(q_t, q_t) - scipy.special.xlogy(q_t, q_s), -1)
  return temperature**2 * np.mean(alpha * tckd + beta * nckd)


def mse_reference(s, t, mask=None):
  return _mean(np.mean((np.float64(s) - np.float64(t))**2, axis=-1), mask)


def forward_kl_reference(s, t, temperature, mask=None):
  """KL(p_T || p_S) at temperature T, no T^2."""
  s, t = np.float64(s) / temperature, np.float64(t) / temperature
  log_p_s = scipy.special.log_softmax(s, -1)
  log_p_t = scipy.special.log_softmax(t, -1)
  return _mean(_kl_rows(log_p_t, log_p_s), mask)


def reverse_kl_reference(s, t, temperature, mask=None):
  """T^2 * KL(p_S || p_T)."""
  return temperature**2 * forward_kl_reference(t, s, temperature, mask)


def gjsd_reference(s, t, beta, temperature, mask=None):
  """beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S; endpoints KLs."""
  if beta == 0.0:
    return forward_kl_reference(s, t, temperature, mask)
  if beta == 1.0:
    return forward_kl_reference(t, s, temperature, mask)
  p_s = scipy.special.softmax(np.float64(s) / temperature, -1)
  p_t = scipy.special.softmax(np.float64(t) / temperature, -1)
  m = beta * p_t + (1 - beta) * p_s
  kl_t = np.sum(scipy.special.xlogy(p_t, p_t) - scipy.special.xlogy(p_t, m), -1)
  kl_s = np.sum(scipy.special.xlogy(p_s, p_s) - scipy.special.xlogy(p_s, m), -1)
  return _mean(beta * kl_t + (1 - beta) * kl_s, mask)


def _random(shape, seed, scale=3.0):
  rng = np.random.default_rng(seed)
  s, t = rng.normal(size=shape) * scale, rng.normal(size=shape) * scale
  return s, t, rng.integers(0, shape[-1], shape[0])


SHAPES = [(1, 2), (8, 10), (32, 100)]


# ---------------------------------------------------------------- values against the references


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_numpy(shape, alpha, beta, temperature):
  s, t, labels = _random(shape, seed=sum(shape) + int(beta))
  got = DKD(_outputs(s), {"t": _outputs(t)}, {"label": labels}, alpha=alpha, beta=beta,
            temperature=temperature)
  want = dkd_reference(s, t, labels, alpha, beta, temperature)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The paper's own formulation (explicit probabilities, target logit minus 1000) agrees.
  np.testing.assert_allclose(want, dkd_paper_code_reference(s, t, labels, alpha, beta,
                                                            temperature), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_logit_mse_matches_numpy(shape):
  s, t, _ = _random(shape, seed=10 + sum(shape))
  np.testing.assert_allclose(MSE(_outputs(s), {"t": _outputs(t)}, {}), mse_reference(s, t),
                             rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_reverse_kl_matches_numpy(shape, temperature):
  s, t, _ = _random(shape, seed=20 + sum(shape))
  got = RKL(_outputs(s), {"t": _outputs(t)}, {}, temperature=temperature)
  np.testing.assert_allclose(got, reverse_kl_reference(s, t, temperature), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape, beta, temperature", [
    ((1, 2), 0.5, 1.0), ((8, 10), 0.5, 1.0), ((8, 10), 0.1, 2.0), ((32, 100), 0.9, 0.9)])
def test_gjsd_matches_numpy(shape, beta, temperature):
  s, t, _ = _random(shape, seed=30 + sum(shape))
  got = GJSD(_outputs(s), {"t": _outputs(t)}, {}, beta=beta, temperature=temperature)
  np.testing.assert_allclose(got, gjsd_reference(s, t, beta, temperature), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- properties


def test_all_are_zero_when_student_equals_teacher():
  x, _, labels = _random((8, 10), seed=40)
  outs, teachers, batch = _outputs(x), {"t": _outputs(x)}, {"label": labels}
  values = [DKD(outs, teachers, batch), MSE(outs, teachers, batch), RKL(outs, teachers, batch)]
  values += [GJSD(outs, teachers, batch, beta=b) for b in (0.0, 0.5, 1.0)]
  np.testing.assert_allclose(np.array(values), 0.0, atol=1e-6)
  other = {"t": _outputs(-x)}
  for fn in FNS.values():
    assert float(fn(outs, other, batch)) > 0.01


def test_mask_is_honoured():
  s, t, labels = _random((8, 10), seed=41)
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.float32)
  s_padded = s.copy()
  s_padded[mask == 0] = 1e3  # Whatever the padded rows hold must not matter,
  labels_padded = labels.copy()
  labels_padded[mask == 0] = -100  # not even an out-of-range (ignore-index) label.
  padded = {"label": labels_padded, "mask": mask}
  for student, batch in [(s, {"label": labels, "mask": mask}), (s_padded, padded)]:
    outs, teachers = _outputs(student), {"t": _outputs(t)}
    np.testing.assert_allclose(DKD(outs, teachers, batch, temperature=2.0),
                               dkd_reference(s, t, labels, 1.0, 8.0, 2.0, mask), rtol=1e-4)
    np.testing.assert_allclose(MSE(outs, teachers, batch), mse_reference(s, t, mask), rtol=1e-5)
    np.testing.assert_allclose(RKL(outs, teachers, batch, temperature=2.0),
                               reverse_kl_reference(s, t, 2.0, mask), rtol=1e-4)
    np.testing.assert_allclose(GJSD(outs, teachers, batch, beta=0.5),
                               gjsd_reference(s, t, 0.5, 1.0, mask), rtol=1e-4)
  # Padded rows get no gradient, and no NaN.
  grad, _ = _grads(DKD, s_padded, t, padded)
  assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)
  # An all-padding batch gives 0, not NaN.
  empty = {"label": labels, "mask": np.zeros(8, np.float32)}
  for fn in FNS.values():
    assert float(fn(_outputs(s), {"t": _outputs(t)}, empty)) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_give_finite_values_and_gradients_and_none_to_the_teacher(name):
  fn = FNS[name]
  s, t, labels = _random((8, 10), seed=42, scale=1e4)
  t[0] = -1e30  # A teacher row of equal, huge negative logits: a uniform target.
  # A student row of the same (for logit_mse the same row as the teacher's: the squared
  # difference of -1e30 and a finite logit is 1e60, past float32 whatever the formula).
  s[0 if name == "logit_mse" else 1] = -1e30
  batch = {"label": labels}
  references = {
      "dkd": lambda temperature: dkd_reference(s, t, labels, 1.0, 8.0, temperature),
      "logit_mse": lambda temperature: mse_reference(s, t),
      "reverse_kl": lambda temperature: reverse_kl_reference(s, t, temperature),
      "gjsd": lambda temperature: gjsd_reference(s, t, 0.5, temperature),
  }
  for temperature in (1.0, 4.0):
    kw = {} if name == "logit_mse" else {"temperature": temperature}
    got = float(fn(_outputs(s), {"t": _outputs(t)}, batch, **kw))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, references[name](temperature), rtol=1e-4)
    student_grad, teacher_grad = _grads(fn, s, t, batch, **kw)
    assert np.all(np.isfinite(student_grad))
    assert np.any(student_grad != 0)
    assert np.all(teacher_grad == 0)  # The teacher is under stop_gradient.


def test_gjsd_endpoints_are_the_kls():
  s, t, _ = _random((8, 10), seed=43, scale=1.0)
  outs, teachers = _outputs(s), {"t": _outputs(t)}
  for temperature in (1.0, 3.0):
    for beta in (0.0, 1.0):
      np.testing.assert_allclose(GJSD(outs, teachers, {}, beta=beta, temperature=temperature),
                                 gjsd_reference(s, t, beta, temperature), rtol=1e-4)
    # beta = 0: forward KL, i.e. kd without its T^2; beta = 1: reverse_kl without its T^2.
    np.testing.assert_allclose(GJSD(outs, teachers, {}, beta=0.0, temperature=temperature),
                               KD(outs, teachers, {}, temperature=temperature) / temperature**2,
                               rtol=1e-5)
    np.testing.assert_allclose(GJSD(outs, teachers, {}, beta=1.0, temperature=temperature),
                               RKL(outs, teachers, {}, temperature=temperature) / temperature**2,
                               rtol=1e-5)
  # The raw formula vanishes at the endpoints, JSD_beta = beta KL(p_T || p_S) + O(beta^2) (and
  # likewise at 1), which is why they are defined as the KLs; shown on the float64 reference.
  np.testing.assert_allclose(gjsd_reference(s, t, 1e-4, 1.0) / 1e-4,
                             forward_kl_reference(s, t, 1.0), rtol=1e-3)
  with pytest.raises(ValueError, match="beta"):
    GJSD(outs, teachers, {}, beta=1.5)


def test_dkd_decomposes_kd():
  """Zhao et al. 2022, eq. 3: KD = TCKD + (1 - p_T(y)) NCKD per example (all with T^2)."""
  s, t, labels = _random((8, 10), seed=44)
  temperature = 2.0

  @jax.jit
  def parts(student_logits, teacher_logits, labels):
    teacher_logp = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    return (*logit_losses.dkd_divergences(student_logits, teacher_logp, labels, temperature),
            logit_losses.kd_divergence(student_logits, teacher_logp, temperature))

  tckd, nckd, kd = map(np.asarray, parts(jnp.asarray(s, jnp.float32),
                                         jnp.asarray(t, jnp.float32), jnp.asarray(labels)))
  p_target = scipy.special.softmax(t / temperature, -1)[np.arange(8), labels]
  np.testing.assert_allclose(kd, tckd + (1 - p_target) * nckd, rtol=1e-4, atol=1e-6)
  # The same parts as the reference, and the public loss picks them by alpha and beta.
  ref_tckd, ref_nckd = dkd_parts_reference(s, t, labels, temperature)
  np.testing.assert_allclose(tckd, temperature**2 * ref_tckd, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(nckd, temperature**2 * ref_nckd, rtol=1e-4, atol=1e-6)
  outs, teachers, batch = _outputs(s), {"t": _outputs(t)}, {"label": labels}
  np.testing.assert_allclose(DKD(outs, teachers, batch, alpha=1.0, beta=0.0,
                                 temperature=temperature), np.mean(tckd), rtol=1e-5)
  np.testing.assert_allclose(DKD(outs, teachers, batch, alpha=0.0, beta=1.0,
                                 temperature=temperature), np.mean(nckd), rtol=1e-5)
  # So DKD with alpha = beta = 1 bounds KD from above: it gives NCKD its full weight.
  assert float(DKD(outs, teachers, batch, alpha=1.0, beta=1.0, temperature=temperature)) >= (
      float(KD(outs, teachers, batch, temperature=temperature)))


@pytest.mark.parametrize("name, kw", [("dkd", {"temperature": 2.0}),
                                      ("gjsd", {"beta": 0.5, "temperature": 1.5})])
def test_gradients_match_finite_differences(name, kw):
  fn = FNS[name]
  s, t, labels = _random((8, 10), seed=45, scale=1.0)
  f = lambda x: fn(_outputs(x), {"t": _outputs(t)}, {"label": labels}, **kw)
  check_grads(f, (jnp.asarray(s, jnp.float32),), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- teachers, shapes, config


def test_several_teachers():
  rng = np.random.default_rng(47)
  s, t1, t2 = (rng.normal(size=(8, 10)) for _ in range(3))
  labels = rng.integers(0, 10, 8)
  teachers, batch = {"a": _outputs(t1), "b": _outputs(t2)}, {"label": labels}
  temperature = 2.0
  # Distribution losses: the target is the mean of the teachers' probabilities at T; as logits,
  # T * log(mean p) gives back that mean at the same temperature.
  mix = temperature * np.log((scipy.special.softmax(t1 / temperature, -1)
                              + scipy.special.softmax(t2 / temperature, -1)) / 2)
  np.testing.assert_allclose(DKD(_outputs(s), teachers, batch, temperature=temperature),
                             dkd_reference(s, mix, labels, 1.0, 8.0, temperature), rtol=1e-4)
  np.testing.assert_allclose(RKL(_outputs(s), teachers, batch, temperature=temperature),
                             reverse_kl_reference(s, mix, temperature), rtol=1e-4)
  np.testing.assert_allclose(GJSD(_outputs(s), teachers, batch, temperature=temperature),
                             gjsd_reference(s, mix, 0.5, temperature), rtol=1e-4)
  # Logit MSE: the mean of the teachers' logits.
  np.testing.assert_allclose(MSE(_outputs(s), teachers, batch), mse_reference(s, (t1 + t2) / 2),
                             rtol=1e-5)
  # Naming one teacher uses it alone.
  np.testing.assert_allclose(MSE(_outputs(s), teachers, batch, teacher="b"),
                             mse_reference(s, t2), rtol=1e-5)
  for fn in FNS.values():
    with pytest.raises(ValueError, match="names teacher 'c'"):
      fn(_outputs(s), teachers, batch, teacher="c")
    with pytest.raises(ValueError, match="config.teachers is empty"):
      fn(_outputs(s), {}, batch)


def _aggregation_weights(ts, labels, aggregation, fixed):
  """[n, B] per-example teacher weights in float64, from their definitions (confidence at T=1)."""
  n, batch = len(ts), len(labels)
  p1 = [scipy.special.softmax(np.float64(t), -1) for t in ts]
  if aggregation == "mean":
    return np.full((n, batch), 1 / n)
  if aggregation == "weighted":
    return np.repeat((np.float64(fixed) / np.sum(fixed))[:, None], batch, axis=1)
  if aggregation == "entropy":
    return scipy.special.softmax(np.stack([np.sum(p * np.log(p), -1) for p in p1]), axis=0)
  p_true = np.stack([p[np.arange(batch), labels] for p in p1])
  return p_true / p_true.sum(0)


@pytest.mark.parametrize("aggregation", ["weighted", "entropy", "true_label"])
def test_every_logit_term_aggregates_teachers_like_kd(aggregation):
  """dkd, reverse_kl, gjsd: the target is sum_i w_i softmax(t_i / T); logit_mse: sum_i w_i t_i.
  With one teacher each reduces to its single-teacher value."""
  rng = np.random.default_rng(53)
  s, *ts = (rng.normal(size=(6, 5)) * 2 for _ in range(4))
  labels = rng.integers(0, 5, 6)
  fixed, temperature = (1.0, 2.0, 5.0), 2.0
  w = _aggregation_weights(ts, labels, aggregation, fixed)
  probs = np.stack([scipy.special.softmax(np.float64(t) / temperature, -1) for t in ts])
  mix = temperature * np.log(np.einsum("nb,nbk->bk", w, probs))  # Logits of the mixture at T.
  teachers, batch = {f"t{i}": _outputs(t) for i, t in enumerate(ts)}, {"label": labels}
  settings = dict(aggregation=aggregation, teacher_weights=fixed)
  got = {name: fn(_outputs(s), teachers, batch, **settings,
                  **({} if name == "logit_mse" else {"temperature": temperature}))
         for name, fn in FNS.items()}
  np.testing.assert_allclose(got["dkd"], dkd_reference(s, mix, labels, 1.0, 8.0, temperature),
                             rtol=1e-4)
  np.testing.assert_allclose(got["reverse_kl"], reverse_kl_reference(s, mix, temperature),
                             rtol=1e-4)
  np.testing.assert_allclose(got["gjsd"], gjsd_reference(s, mix, 0.5, temperature), rtol=1e-4)
  np.testing.assert_allclose(got["logit_mse"],
                             mse_reference(s, np.einsum("nb,nbk->bk", w, np.float64(ts))),
                             rtol=1e-5)
  one = {name: fn(_outputs(s), {"t": _outputs(ts[0])}, batch, aggregation=aggregation,
                  teacher_weights=fixed[:1]) for name, fn in FNS.items()}
  single = {name: fn(_outputs(s), {"t": _outputs(ts[0])}, batch) for name, fn in FNS.items()}
  for name in FNS:
    np.testing.assert_allclose(one[name], single[name], rtol=1e-6, err_msg=name)


def test_per_token_logits_and_masks():
  rng = np.random.default_rng(48)
  s, t = rng.normal(size=(2, 4, 10)), rng.normal(size=(2, 4, 10))
  labels = rng.integers(0, 10, (2, 4))
  flat_s, flat_t, flat_labels = s.reshape(8, 10), t.reshape(8, 10), labels.reshape(8)
  outs, teachers = _outputs(s), {"t": _outputs(t)}
  example_mask = np.array([0, 1], np.float32)
  token_mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.float32)
  for mask, flat_mask in [(example_mask, np.repeat(example_mask, 4)),
                          (token_mask, token_mask.reshape(-1))]:
    np.testing.assert_allclose(GJSD(outs, teachers, {"mask": mask}),
                               gjsd_reference(flat_s, flat_t, 0.5, 1.0, flat_mask), rtol=1e-4)
  np.testing.assert_allclose(DKD(outs, teachers, {"label": labels, "mask": token_mask}),
                             dkd_reference(flat_s, flat_t, flat_labels, 1.0, 8.0, 4.0,
                                           token_mask.reshape(-1)), rtol=1e-4)
  # No mask at all: every position counts.
  unmasked = jax.jit(losses.LOSSES.get("gjsd"))(outs, teachers, {})
  np.testing.assert_allclose(unmasked, gjsd_reference(flat_s, flat_t, 0.5, 1.0), rtol=1e-4)


def test_registered_hyperparameters_and_config():
  get = losses.LOSSES.get
  pick = {"teacher": None, "aggregation": "mean", "teacher_weights": ()}
  assert losses.loss_hparams(get("dkd")) == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                             **pick}
  assert losses.loss_hparams(get("logit_mse")) == pick
  assert losses.loss_hparams(get("reverse_kl")) == {"temperature": 1.0, **pick}
  assert losses.loss_hparams(get("gjsd")) == {"beta": 0.5, "temperature": 1.0, **pick}
  build_objective({"ce": {}, "dkd": {"beta": 2.0, "warmup_steps": 10}, "logit_mse": {},
                   "reverse_kl": {"temperature": 2.0}, "gjsd": {"beta": 0.9}}, ["t"])
  with pytest.raises(ObjectiveError, match="gama"):
    build_objective({"dkd": {"gama": 1.0}}, ["t"])


@pytest.mark.parametrize("name", ("ce", "kd", *NAMES))
def test_nonfinite_logits_of_padded_examples_change_neither_value_nor_gradient(name):
  """NaN or inf logits (student and teacher) in the rows the batch's `mask` drops give exactly
  the value and gradient of finite ones: finite, and 0 for those rows (dropping the per-example
  value after the math would leave 0 * NaN in the gradient)."""
  fn = _jit("ce", static=("label_smoothing",)) if name == "ce" else {"kd": KD, **FNS}[name]
  s, t, labels = _random((8, 10), seed=45)
  mask = np.array([1, 0, 1, 1, 0, 1, 0, 1], np.float32)
  batch = {"label": labels, "mask": mask}
  value = float(fn(_outputs(s), {"t": _outputs(t)}, batch))
  grad, _ = _grads(fn, s, t, batch)
  assert np.all(grad[mask == 0] == 0) and np.abs(grad).max() > 1e-3
  for bad in (np.nan, np.inf, -np.inf):
    s_bad, t_bad = s.copy(), t.copy()
    s_bad[mask == 0], t_bad[mask == 0] = bad, bad
    got = float(fn(_outputs(s_bad), {"t": _outputs(t_bad)}, batch))
    got_grad, _ = _grads(fn, s_bad, t_bad, batch)
    np.testing.assert_array_equal(got, value, err_msg=f"{bad} in padded rows")
    np.testing.assert_array_equal(got_grad, grad, err_msg=f"{bad} in padded rows")
