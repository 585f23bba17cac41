"""DKD, logit MSE, reverse KL and generalized JSD against independent float64 NumPy/SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses
from distill_jax.losses import logits as logit_losses
from distill_jax.objective import ObjectiveError, build_objective
from distill_jax.outputs import Outputs

NAMES = ("dkd", "logit_mse", "reverse_kl", "gjsd")


def _jit(name, static=("teacher",)):
  """The registered loss, jitted as the objective runs it; float hyper-parameters are traced,
  so each shape compiles once (gjsd's beta is static: its endpoints are special cases)."""
  return jax.jit(losses.LOSSES.get(name), static_argnames=static)


DKD, MSE, RKL, KD = _jit("dkd"), _jit("logit_mse"), _jit("reverse_kl"), _jit("kd")
GJSD = _jit("gjsd", ("beta", "teacher"))
FNS = {"dkd": DKD, "logit_mse": MSE, "reverse_kl": RKL, "gjsd": GJSD}


def _outputs(logits):
  return Outputs(jnp.asarray(logits, jnp.float32), {}, {})


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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta, temperature", [(0.5, 1.0), (0.1, 2.0), (0.9, 0.9), (0.0, 1.0),
                                               (1.0, 2.0)])
def test_gjsd_matches_numpy(shape, beta, temperature):
  s, t, _ = _random(shape, seed=30 + sum(shape))
  got = GJSD(_outputs(s), {"t": _outputs(t)}, {}, beta=beta, temperature=temperature)
  np.testing.assert_allclose(got, gjsd_reference(s, t, beta, temperature), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- properties


def test_all_are_zero_when_student_equals_teacher():
  x, _, labels = _random((6, 9), seed=40)
  outs, teachers, batch = _outputs(x), {"t": _outputs(x)}, {"label": labels}
  values = [DKD(outs, teachers, batch), MSE(outs, teachers, batch), RKL(outs, teachers, batch)]
  values += [GJSD(outs, teachers, batch, beta=b) for b in (0.0, 0.3, 0.5, 1.0)]
  np.testing.assert_allclose(np.array(values), 0.0, atol=1e-6)
  other = {"t": _outputs(-x)}
  assert float(DKD(outs, other, batch)) > 0.1
  assert float(MSE(outs, other, batch)) > 0.1
  assert float(RKL(outs, other, batch)) > 0.1
  assert float(GJSD(outs, other, batch)) > 0.01


def test_mask_is_honoured():
  s, t, labels = _random((6, 5), seed=41)
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  batch = {"label": labels, "mask": mask}
  s_padded = s.copy()
  s_padded[mask == 0] = 1e3  # Whatever the padded rows hold must not matter.
  for student in (s, s_padded):
    outs, teachers = _outputs(student), {"t": _outputs(t)}
    np.testing.assert_allclose(DKD(outs, teachers, batch, temperature=2.0),
                               dkd_reference(s, t, labels, 1.0, 8.0, 2.0, mask), rtol=1e-4)
    np.testing.assert_allclose(MSE(outs, teachers, batch), mse_reference(s, t, mask), rtol=1e-5)
    np.testing.assert_allclose(RKL(outs, teachers, batch, temperature=2.0),
                               reverse_kl_reference(s, t, 2.0, mask), rtol=1e-4)
    np.testing.assert_allclose(GJSD(outs, teachers, batch, beta=0.3),
                               gjsd_reference(s, t, 0.3, 1.0, mask), rtol=1e-4)
  # An all-padding batch gives 0, not NaN.
  empty = {"label": labels, "mask": np.zeros(6, np.float32)}
  assert float(GJSD(_outputs(s), {"t": _outputs(t)}, empty)) == 0.0


@pytest.mark.parametrize("name", ["dkd", "logit_mse", "reverse_kl", "gjsd"])
def test_extreme_logits_give_finite_values_and_gradients(name):
  fn = losses.LOSSES.get(name)
  s, t, labels = _random((16, 10), seed=42, scale=1e4)
  t[0] = -1e30  # A teacher row of equal, huge negative logits: a uniform target.
  s[1] = -1e30  # And a student row of the same.
  batch = {"label": labels}
  hparams = [{}] if name == "logit_mse" else [{"temperature": 1.0}, {"temperature": 4.0}]
  for kw in hparams:
    got = float(fn(_outputs(s), {"t": _outputs(t)}, batch, **kw))
    assert np.isfinite(got)
    grad = jax.grad(lambda x, kw=kw: fn(_outputs(x), {"t": _outputs(t)}, batch, **kw))(
        jnp.asarray(s, jnp.float32))
    assert np.all(np.isfinite(grad))
    if name == "logit_mse":
      continue  # Squares of 1e30: finite in float32 only because the means overflow to... skip.
    temperature = kw["temperature"]
    want = {
        "dkd": lambda: dkd_reference(s, t, labels, 1.0, 8.0, temperature),
        "reverse_kl": lambda: reverse_kl_reference(s, t, temperature),
        "gjsd": lambda: gjsd_reference(s, t, 0.5, temperature),
    }[name]()
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_gjsd_endpoints_are_the_kls_and_the_interior_tends_to_them():
  s, t, _ = _random((8, 10), seed=43)
  outs, teachers = _outputs(s), {"t": _outputs(t)}
  for temperature in (1.0, 3.0):
    # beta = 0: forward KL, i.e. kd without its T^2; beta = 1: reverse_kl (both lose T^2).
    np.testing.assert_allclose(GJSD(outs, teachers, {}, beta=0.0, temperature=temperature),
                               KD(outs, teachers, {}, temperature=temperature) / temperature**2,
                               rtol=1e-5)
    np.testing.assert_allclose(GJSD(outs, teachers, {}, beta=1.0, temperature=temperature),
                               RKL(outs, teachers, {}, temperature=temperature) / temperature**2,
                               rtol=1e-5)
  # JSD_beta = beta KL(p_T || p_S) + O(beta^2), and symmetrically near beta = 1, which is why
  # the endpoints are defined as the KLs rather than the raw formula's 0.
  eps = 1e-3
  forward = float(GJSD(outs, teachers, {}, beta=0.0))
  reverse = float(GJSD(outs, teachers, {}, beta=1.0))
  np.testing.assert_allclose(float(GJSD(outs, teachers, {}, beta=eps)) / eps, forward, rtol=2e-2)
  np.testing.assert_allclose(float(GJSD(outs, teachers, {}, beta=1 - eps)) / eps, reverse,
                             rtol=2e-2)
  with pytest.raises(ValueError, match="beta"):
    GJSD(outs, teachers, {}, beta=1.5)


def test_dkd_decomposes_kd():
  """Zhao et al. 2022, eq. 3: KD = TCKD + (1 - p_T(y)) NCKD per example (all with T^2)."""
  s, t, labels = _random((12, 7), seed=44)
  temperature = 2.0
  teacher_logp = jax.nn.log_softmax(jnp.asarray(t, jnp.float32) / temperature, axis=-1)
  tckd, nckd = logit_losses.dkd_divergences(jnp.asarray(s, jnp.float32), teacher_logp,
                                            jnp.asarray(labels), temperature)
  kd = logit_losses.kd_divergence(jnp.asarray(s, jnp.float32), teacher_logp, temperature)
  p_target = scipy.special.softmax(t / temperature, -1)[np.arange(12), labels]
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


@pytest.mark.parametrize("name, kw", [("dkd", {"temperature": 2.0}),
                                      ("gjsd", {"beta": 0.5, "temperature": 1.5}),
                                      ("gjsd", {"beta": 0.0}),
                                      ("gjsd", {"beta": 1.0})])
def test_gradients_match_finite_differences(name, kw):
  fn = losses.LOSSES.get(name)
  s, t, labels = _random((4, 6), seed=45, scale=1.0)
  f = lambda x: fn(_outputs(x), {"t": _outputs(t)}, {"label": labels}, **kw)
  check_grads(f, (jnp.asarray(s, jnp.float32),), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["dkd", "logit_mse", "reverse_kl", "gjsd"])
def test_teacher_gets_no_gradient(name):
  fn = losses.LOSSES.get(name)
  s, t, labels = _random((4, 6), seed=46)
  grad = jax.grad(lambda y: fn(_outputs(s), {"t": _outputs(y)}, {"label": labels}))(
      jnp.asarray(t, jnp.float32))
  assert np.all(grad == 0)


# ---------------------------------------------------------------- teachers, shapes, config


def test_several_teachers():
  rng = np.random.default_rng(47)
  s, t1, t2 = (rng.normal(size=(6, 5)) for _ in range(3))
  labels = rng.integers(0, 5, 6)
  teachers, batch = {"a": _outputs(t1), "b": _outputs(t2)}, {"label": labels}
  temperature = 2.0
  # Distribution losses: the target is the mean of the teachers' probabilities at T; as logits
  # T * log(mean p) reproduces it at the same temperature.
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
  np.testing.assert_allclose(GJSD(_outputs(s), teachers, batch, teacher="a", beta=0.2),
                             gjsd_reference(s, t1, 0.2, 1.0), rtol=1e-4)
  for fn in (DKD, MSE, RKL, GJSD):
    with pytest.raises(ValueError, match="names teacher 'c'"):
      fn(_outputs(s), teachers, batch, teacher="c")
    with pytest.raises(ValueError, match="config.teachers is empty"):
      fn(_outputs(s), {}, batch)


def test_gjsd_per_token_logits_with_batch_and_token_masks():
  rng = np.random.default_rng(48)
  s, t = rng.normal(size=(3, 4, 7)), rng.normal(size=(3, 4, 7))
  flat_s, flat_t = s.reshape(12, 7), t.reshape(12, 7)
  outs, teachers = _outputs(s), {"t": _outputs(t)}
  np.testing.assert_allclose(GJSD(outs, teachers, {}), gjsd_reference(flat_s, flat_t, 0.5, 1.0),
                             rtol=1e-4)
  example_mask = np.array([1, 0, 1], np.float32)
  np.testing.assert_allclose(GJSD(outs, teachers, {"mask": example_mask}),
                             gjsd_reference(flat_s, flat_t, 0.5, 1.0, np.repeat(example_mask, 4)),
                             rtol=1e-4)
  token_mask = rng.integers(0, 2, (3, 4)).astype(np.float32)
  token_mask[0, 0] = 1
  np.testing.assert_allclose(GJSD(outs, teachers, {"mask": token_mask}, beta=0.0),
                             gjsd_reference(flat_s, flat_t, 0.0, 1.0, token_mask.reshape(-1)),
                             rtol=1e-4)


def test_registered_hyperparameters_and_objective():
  assert losses.loss_hparams(DKD) == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                      "teacher": None}
  assert losses.loss_hparams(MSE) == {"teacher": None}
  assert losses.loss_hparams(RKL) == {"temperature": 1.0, "teacher": None}
  assert losses.loss_hparams(GJSD) == {"beta": 0.5, "temperature": 1.0, "teacher": None}
  s, t, labels = _random((8, 10), seed=49)
  objective = build_objective({"ce": {"weight": 1.0},
                               "dkd": {"beta": 2.0, "warmup_steps": 10}}, ["t"])
  total, terms = objective({}, _outputs(s), {"t": _outputs(t)}, {"label": labels},
                           jnp.asarray(5))
  want = dkd_reference(s, t, labels, 1.0, 2.0, 4.0)
  np.testing.assert_allclose(terms["dkd"], want, rtol=1e-4)
  np.testing.assert_allclose(total - terms["ce"], 0.5 * want, rtol=1e-4)
