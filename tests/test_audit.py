"""The distillation audit (distill_jax/audit): scores against NumPy/SciPy references, the
p-value's calibration, synthesis reproducibility, query-only candidates, and an end-to-end
audit through the CLI on tiny digits models that picks the true teacher or says none."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
from scipy import special, stats

from distill_jax.audit import decision, scores

# --- Scores against references written here ------------------------------------------------

def _logits(n, k, scale=3.0, seed=0):
  return np.random.default_rng(seed).normal(size=(n, k)) * scale


@pytest.mark.parametrize("n,k,scale", [(7, 10, 1.0), (33, 3, 30.0), (5, 100, 0.01)])
def test_scores_match_references(n, k, scale):
  s, t = _logits(n, k, scale, 1), _logits(n, k, scale, 2)
  s[0] = t[0]  # One identical row: KL 0, agreement 1, rank correlation 1.
  got = scores.per_input_scores(s, t, None, temperatures=(1.0, 4.0))
  np.testing.assert_array_equal(got["top1"], [float(a == b) for a, b in
                                              zip(s.argmax(1), t.argmax(1), strict=True)])
  for temperature in (1.0, 4.0):
    p, q = special.softmax(t / temperature, 1), special.softmax(s / temperature, 1)
    want = [stats.entropy(a, b) for a, b in zip(p, q, strict=True)]  # KL(p || q).
    np.testing.assert_allclose(got[scores.kl_name(temperature)], want, rtol=1e-6, atol=1e-9)
  want_rho = [stats.spearmanr(a, b).statistic for a, b in zip(s, t, strict=True)]
  np.testing.assert_allclose(got["spearman"], want_rho, rtol=1e-9)
  assert got["kl_t1"][0] == pytest.approx(0.0, abs=1e-12) and got["spearman"][0] == 1.0
  assert np.all(np.isnan(got["mistakes"]))  # No reference labels: undefined.


def test_spearman_averages_tied_ranks():
  s = np.array([[1.0, 1.0, 2.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
  t = np.array([[3.0, 1.0, 1.0, 2.0, 5.0, 0.0], [1.0, 2.0, 2.0, 3.0, 3.0, 3.0]])
  want = [stats.spearmanr(a, b).statistic for a, b in zip(s, t, strict=True)]
  np.testing.assert_allclose(scores.spearman(s, t), want, rtol=1e-12)
  np.testing.assert_array_equal(scores.average_ranks(s), stats.rankdata(s, axis=1))
  assert np.isnan(scores.spearman(np.ones((1, 4)), t[:1, :4]))[0]  # Constant row.


def test_mistake_agreement_and_majority_vote():
  teacher = np.eye(4)[[0, 1, 2, 3, 1]]  # top-1: 0 1 2 3 1
  student = np.eye(4)[[0, 2, 2, 0, 1]]  # top-1: 0 2 2 0 1
  labels = np.array([0, 0, 0, 0, -1])  # The teacher is wrong on inputs 1, 2, 3; 4 unknown.
  got = scores.mistake_agreement(student, teacher, labels)
  np.testing.assert_array_equal(got, [np.nan, 0.0, 1.0, 0.0, np.nan])
  votes = [np.eye(3)[[0, 1, 2]], np.eye(3)[[0, 2, 2]], np.eye(3)[[1, 2, 0]]]
  np.testing.assert_array_equal(scores.majority_vote(votes), [0, 2, 2])  # Ties -> smallest.


# --- The decision: calibrated under the null, powerful under the alternative ---------------

def test_compare_is_the_prediction_t_test():
  controls = np.array([0.30, 0.25, 0.35, 0.28])
  got = decision.compare(0.10, controls, higher_is_closer=False)
  sd = controls.std(ddof=1)
  t = (controls.mean() - 0.10) / (sd * np.sqrt(1 + 1 / 4))
  assert got.t == pytest.approx(t) and got.p_value == pytest.approx(stats.t.sf(t, 3))
  assert got.effect == pytest.approx((controls.mean() - 0.10) / sd)
  assert got.p_rank == pytest.approx(1 / 5)
  with pytest.raises(ValueError, match="at least 2 control"):
    decision.compare(0.1, [0.2], True)


def test_holm_matches_the_step_down_reference():
  p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}
  ordered = sorted(p.items(), key=lambda x: x[1])
  want, running = {}, 0.0
  for i, (name, value) in enumerate(ordered):
    running = max(running, min(1.0, (len(p) - i) * value))
    want[name] = running
  assert decision.holm(p) == pytest.approx(want)


def test_p_values_are_uniform_under_the_null():
  """Student and controls drawn alike (no distillation): p ~ U(0, 1), false accusations at
  rate <= alpha for each candidate."""
  rng = np.random.default_rng(1)
  p = np.array([decision.compare(x[0], x[1:], True).p_value
                for x in rng.normal(size=(3000, 6))])
  assert stats.kstest(p, "uniform").pvalue > 0.01
  assert abs(np.mean(p < 0.05) - 0.05) < 0.015
  accused = [decision.accuse({c: decision.compare(x[c, 0], x[c, 1:], True) for c in range(3)}
                             )[1] for x in rng.normal(size=(1000, 3, 6))]
  assert np.mean([bool(a) for a in accused]) <= 0.05 + 0.02


def test_combine_is_the_t_test_on_the_oriented_mean():
  """`combine`: the prediction t-test on each model's equal-weight mean of its scores, each
  oriented so that higher = closer; the student's SE from its bootstrap means."""
  rng = np.random.default_rng(4)
  student, controls = rng.normal(size=3), rng.normal(size=(6, 3))
  higher = [True, False, True]
  boot = student + 0.01 * rng.normal(size=(50, 3))
  got = decision.combine(student, controls, higher, boot)
  sign = np.array([1.0, -1.0, 1.0])
  s, c = (sign * student).mean(), (sign * controls).mean(axis=1)
  t = (s - c.mean()) / (c.std(ddof=1) * np.sqrt(1 + 1 / 6))
  assert got.t == pytest.approx(t) and got.p_value == pytest.approx(stats.t.sf(t, 5))
  assert got.student == pytest.approx(s) and got.higher_is_closer
  assert got.student_se == pytest.approx((sign * boot).mean(axis=1).std(ddof=1))
  assert np.isnan(decision.combine([np.nan, 0.0, 0.0], controls, higher).p_value)


@pytest.mark.parametrize("num_controls", [4, 11])
def test_combined_p_values_are_uniform_under_the_null(num_controls):
  """Three scores per model, correlated, on different scales and in both directions, drawn
  alike for the student and the controls: the combined statistic's p ~ U(0, 1), also in the
  tail Holm uses (alpha / 4), and the decision over 3 candidates accuses at rate <= alpha. (A
  mean of scores standardised by the controls' sd fails this: 2-3x too many small p with 4
  controls.)"""
  rng = np.random.default_rng(5)
  scale = np.array([0.05, 2.0, 0.3])
  corr = np.array([[1.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 1.0]])
  cov = corr * np.outer(scale, scale)
  higher = [True, False, True]
  x = rng.multivariate_normal([0.4, 1.0, -0.2], cov, size=(4000, num_controls + 1))
  p = np.array([decision.combine(xi[0], xi[1:], higher).p_value for xi in x])
  assert stats.kstest(p, "uniform").pvalue > 0.01
  assert abs(np.mean(p < 0.05) - 0.05) < 0.012
  assert np.mean(p < 0.0125) < 0.0125 + 0.006
  draws = rng.multivariate_normal(np.zeros(3), cov, size=(1000, 3, num_controls + 1))
  accused = [decision.accuse({c: decision.combine(d[c, 0], d[c, 1:], higher)
                              for c in range(3)})[1] for d in draws]
  assert np.mean([bool(a) for a in accused]) <= 0.05 + 0.02


def test_synthetic_logits_true_teacher_is_found_and_only_it(monkeypatch):
  """Logits: K candidates and M controls share the task (a common component); the student is
  the true teacher's logits plus noise. Only the true teacher gets p < 0.05."""
  from distill_jax.audit.run import run_audit

  rng = np.random.default_rng(2)
  n, k = 300, 10
  task = rng.normal(size=(n, k)) * 2

  def model(own):
    return task + own * rng.normal(size=(n, k))

  teachers = {f"t{i}": model(1.5) for i in range(4)}
  controls = {f"c{i}": model(1.5) for i in range(5)}
  student_logits = 0.7 * teachers["t2"] + 0.3 * model(1.5)
  probe_images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)

  class Fixed:  # A model answering for the fixed probe inputs (their pixel is their index).
    def __init__(self, name, logits):
      self.name, self.logits = name, logits

    def __call__(self, images):
      return self.logits[np.asarray(images).reshape(-1).astype(int)]

  from distill_jax.audit import probes

  def fixed_probe(context):
    return probes.Probe("fixed", probe_images, None, {})

  monkeypatch.setitem(probes.PROBES._entries, "fixed_test", fixed_probe)  # For this test.
  result = run_audit(Fixed("student", student_logits),
                     {n_: Fixed(n_, x) for n_, x in teachers.items()},
                     {n_: Fixed(n_, x) for n_, x in controls.items()},
                     input_shape=(1, 1, 1), num_classes=k, probes=("fixed_test",))
  p = {c: result["primary"]["comparisons"][c]["p_value"] for c in teachers}
  assert p["t2"] < 0.05 and all(p[c] > 0.05 for c in teachers if c != "t2"), p
  assert result["answer"] == "t2"
  # The combined decision: each model's mean of its Spearman contrast and minus its kl_fit
  # contrast (lower KL = closer), rebuilt here from the per-score means of the report.
  combined = run_audit(Fixed("student", student_logits),
                       {n_: Fixed(n_, x) for n_, x in teachers.items()},
                       {n_: Fixed(n_, x) for n_, x in controls.items()},
                       input_shape=(1, 1, 1), num_classes=k, probes=("fixed_test",),
                       primary="fixed_test:spearman,fixed_test:kl_fit")
  assert combined["answer"] == "t2"
  assert combined["primary"]["pairs"] == [["fixed_test", "spearman"], ["fixed_test", "kl_fit"]]

  def statistic(model, c):
    def contrast(score):
      value = {o: (combined["scores"][o]["fixed_test"][score]["student"] if model == "student"
                   else combined["scores"][o]["fixed_test"][score]["controls"][model])
               for o in teachers}
      return value[c] - np.mean([v for o, v in value.items() if o != c])
    return (contrast("spearman") - contrast("kl_fit")) / 2

  for c in teachers:
    got = combined["primary"]["comparisons"][c]
    assert got["student"] == pytest.approx(statistic("student", c))
    assert list(got["controls"].values()) == pytest.approx([statistic(m, c) for m in controls])
  student_as_control = run_audit(Fixed("student", model(1.5)),
                                 {n_: Fixed(n_, x) for n_, x in teachers.items()},
                                 {n_: Fixed(n_, x) for n_, x in controls.items()},
                                 input_shape=(1, 1, 1), num_classes=k, probes=("fixed_test",))
  assert student_as_control["answer"] == decision.NONE


# --- Tiny digits models, trained cheaply (full-batch Adam on the 1500 training images) -------

def _digits(data_dir, split):
  from distill_jax import data as data_lib

  config = data_lib.default_data_config("digits")
  config.data_dir = data_dir
  images, labels = [], []
  for batch in data_lib.eval_batches(config, global_batch_size=512, split=split):
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
  return np.concatenate(images), np.concatenate(labels)


def _fit_mlp(images, targets, hidden, seed, steps, temperature=1.0):
  """An MLP fitted to soft `targets` [N, 10] (one-hot labels or a teacher's softmax at
  `temperature`) by full-batch Adam; returns its variables."""
  import jax

  from distill_jax.models import build_model

  module = build_model("mlp", 10, hidden=tuple(hidden))
  variables = module.init(jax.random.PRNGKey(seed), images[:1], train=False)
  return _fit(module, variables, images, targets, temperature, steps)


@functools.partial(jax.jit, static_argnames=("module", "steps"))
def _fit(module, variables, x, y, temperature, steps):
  """`steps` full-batch Adam steps of softmax cross-entropy at `temperature` (compiled once per
  architecture: the temperature is an argument)."""
  optimizer = optax.adam(0.01)

  def loss(v):
    return optax.softmax_cross_entropy(module.apply(v, x, train=False) / temperature, y).mean()

  def step(_, carry):
    v, state = carry
    updates, state = optimizer.update(jax.grad(loss)(v), state, v)
    return optax.apply_updates(v, updates), state

  return jax.lax.fori_loop(0, steps, step, (variables, optimizer.init(variables)))[0]


def _export(directory, hidden, variables):
  from distill_jax.common.model_io import export_model

  export_model(str(directory), variables, {"model": "mlp", "kwargs": {"hidden": list(hidden)},
                                           "num_classes": 10, "step": 0})
  return str(directory)


@pytest.fixture(scope="module")
def zoo(data_dir, teacher_dir, tmp_path_factory):
  return build_zoo(data_dir, teacher_dir, tmp_path_factory.mktemp("zoo"))


def build_zoo(data_dir, teacher_dir, root):
  """Candidate teachers: A (conftest's CNN teacher), B, C and D (MLPs of other widths and
  seeds trained on the labels); a student distilled from A alone with KD
  (T = 4); and 4 control students of the student's architecture, trained like it without any
  candidate: 2 on the labels, 2 distilled (KD, T = 4) from teachers that are not candidates
  (so the null covers students made soft by distillation)."""
  import jax

  from distill_jax.audit import load_exported

  images, labels = _digits(data_dir, "train")
  onehot = np.eye(10, dtype=np.float32)[labels]
  teacher = load_exported(teacher_dir, (8, 8, 1))
  soft = np.asarray(jax.nn.softmax(teacher(images) / 4.0))
  paths = {"A": teacher_dir}
  for name, hidden, seed in (("B", (64,), 11), ("C", (48,), 12), ("D", (16,), 13)):
    paths[name] = _export(root / name, hidden, _fit_mlp(images, onehot, hidden, seed, 300))
  paths["student"] = _export(root / "student", (32,),
                             _fit_mlp(images, soft, (32,), 0, 300, temperature=4.0))
  for i in range(2):
    paths[f"control{i}"] = _export(root / f"control{i}", (32,),
                                   _fit_mlp(images, onehot, (32,), 100 + i, 300))
  for i, hidden in ((2, (64,)), (3, (48,))):  # Architectures of B and C, other seeds.
    other = build_model_fn(hidden, _fit_mlp(images, onehot, hidden, 200 + i, 300))
    other_soft = np.asarray(jax.nn.softmax(other(images) / 4.0))
    paths[f"control{i}"] = _export(root / f"control{i}", (32,),
                                   _fit_mlp(images, other_soft, (32,), 100 + i, 300, 4.0))
  return paths


def build_model_fn(hidden, variables):
  from distill_jax.models import build_model

  module = build_model("mlp", 10, hidden=hidden)
  return lambda x: module.apply(variables, x, train=False)


# --- Probes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn_student(teacher_dir):
  """conftest's trained CNN (widths 32, 64, with BatchNorm), as an `Exported` model."""
  from distill_jax.audit import load_exported

  return load_exported(teacher_dir, (8, 8, 1), "cnn")


def test_bn_statistics_loss_matches_reference(cnn_student):
  from distill_jax.audit.probes import bn_statistics_loss

  x = np.random.default_rng(2).normal(size=(16, 8, 8, 1)).astype(np.float32)
  logits, loss = bn_statistics_loss(cnn_student.module, cnn_student.variables, x)
  _, state = cnn_student.module.apply(cnn_student.variables, x, train=False,
                                      capture_intermediates=True, mutable=["intermediates"])
  want = 0.0
  for layer in ("stem", "stage1", "stage2"):  # Each conv's output is its BatchNorm's input.
    h = np.asarray(state["intermediates"][f"{layer}_conv"]["__call__"][0], np.float64)
    running = cnn_student.variables["batch_stats"][f"{layer}_bn"]
    want += np.linalg.norm(h.mean((0, 1, 2)) - running["mean"])
    want += np.linalg.norm(h.var((0, 1, 2)) - running["var"])
  assert float(loss) == pytest.approx(want, rel=1e-4)
  np.testing.assert_allclose(logits, cnn_student(x), rtol=1e-5, atol=1e-5)


def test_synthesis_is_reproducible_and_matches_the_student(cnn_student):
  from distill_jax.audit import synthesize
  from distill_jax.audit.probes import bn_statistics_loss

  kwargs = {"steps": 40, "batch_size": 24}
  a, labels, metrics = synthesize(cnn_student, (8, 8, 1), 10, 30, seed=5, **kwargs)
  b, labels_b, _ = synthesize(cnn_student, (8, 8, 1), 10, 30, seed=5, **kwargs)
  c, _, _ = synthesize(cnn_student, (8, 8, 1), 10, 30, seed=6, **kwargs)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(labels, labels_b)
  assert a.shape == (30, 8, 8, 1) and not np.allclose(a, c)
  assert np.bincount(labels, minlength=10).tolist() == [3] * 10  # Every class, evenly.
  # Optimised: the student predicts the targets, and its BN statistics fit better than noise.
  assert np.mean(cnn_student(a).argmax(1) == labels) > 0.9
  noise = np.random.default_rng(0).normal(size=(24, 8, 8, 1)).astype(np.float32)
  before = bn_statistics_loss(cnn_student.module, cnn_student.variables, noise)[1]
  after = bn_statistics_loss(cnn_student.module, cnn_student.variables, a[:24])[1]
  assert float(after) < 0.5 * float(before), (before, after)
  assert metrics["top1"] > 0.9


def test_two_class_targets_and_soft_synthesis(cnn_student):
  """The soft targets: lam e_a + (1 - lam) e_b, a != b, seeded (a reference loop here); the
  synthesis (60 steps, BatchNorm term included) drives the briefly trained CNN's softmax
  towards them: the mean KL(target || student) falls well below that on noise, and its two
  top classes are the target's pair far more often than chance."""
  from scipy import special

  from distill_jax.audit import synthesize
  from distill_jax.audit.probes import two_class_targets

  targets = two_class_targets(20, 10, 1.0, [3, 5])
  rng = np.random.default_rng([3, 5])
  a = rng.integers(10, size=20)
  b = (a + 1 + rng.integers(9, size=20)) % 10
  lam = rng.beta(1.0, 1.0, size=20)
  for i in range(20):
    want = np.zeros(10)
    want[a[i]] += lam[i]
    want[b[i]] += 1 - lam[i]
    np.testing.assert_allclose(targets[i], want, rtol=1e-6)
  assert np.all(a != b)
  images, top, _ = synthesize(cnn_student, (8, 8, 1), 10, 20, seed=3, steps=60, batch_size=20,
                              targets=targets)
  np.testing.assert_array_equal(top, targets.argmax(1))

  def kl(x):
    p = special.softmax(cnn_student(x), axis=1)
    return np.mean([stats.entropy(t, q) for t, q in zip(targets, p, strict=True)])

  noise = np.random.default_rng(0).normal(size=images.shape).astype(np.float32)
  assert kl(images) < 0.6 * kl(noise), (kl(images), kl(noise))  # 0.98 against 1.97 here.
  pairs = np.sort(np.argsort(cnn_student(images), 1)[:, -2:], 1)
  # The two top classes are the target's pair on 45% of the inputs here (chance: 1/45).
  assert np.mean([set(p) == {x, y} for p, x, y in zip(pairs, a, b, strict=True)]) > 0.3


def test_synthesis_with_a_batchnorm_prior(cnn_student, data_dir, tmp_path):
  """A student without BatchNorm (an MLP) synthesises with the CNN's BatchNorm statistics as
  the prior (`prior=`, through the probe's option): the CNN's statistics term ends far below
  its value on noise and on the inputs synthesised without the prior, and the MLP still
  predicts its targets."""
  from distill_jax.audit import load_exported, probes
  from distill_jax.audit.probes import bn_statistics_loss

  images, labels = _digits(data_dir, "train")
  mlp_dir = _export(tmp_path / "mlp", (32,), _fit_mlp(
      images, np.eye(10, dtype=np.float32)[labels], (32,), 0, 300))
  mlp = load_exported(mlp_dir, (8, 8, 1), "mlp")

  def probe(settings):
    context = probes.ProbeContext(mlp, {}, (8, 8, 1), 10, 24, 0,
                                  settings={"synthetic": {"steps": "50", **settings}})
    return context.probe("synthetic")

  with_prior = probe({"prior": cnn_student.directory})
  alone = probe({})
  assert with_prior.info["prior"] == cnn_student.directory and alone.info["prior"] is None

  def bn(x):
    return float(bn_statistics_loss(cnn_student.module, cnn_student.variables, x)[1])

  noise = np.random.default_rng(1).normal(size=(24, 8, 8, 1)).astype(np.float32)
  assert bn(with_prior.images) < 0.5 * min(bn(noise), bn(alone.images))
  assert with_prior.info["final"]["top1"] > 0.9


class _OutputsOnly:
  """A candidate that answers queries and fails the test if anything else is asked of it."""

  def __init__(self, fn):
    object.__setattr__(self, "_fn", fn)
    object.__setattr__(self, "calls", 0)

  def __call__(self, images):
    object.__setattr__(self, "calls", self.calls + 1)
    return self._fn(images)

  def __getattr__(self, name):
    raise AssertionError(f"The audit asked a query-only candidate for {name!r}.")


def test_query_only_candidates_are_only_queried(monkeypatch):
  """The whole audit, disagreement search included, with candidates that answer queries and
  fail on any other use (NumPy models: no weights to be had)."""
  from distill_jax.audit import QueryOnly, probes, run_audit

  rng = np.random.default_rng(3)
  weights = {name: rng.normal(size=(64, 10)) for name in ("a", "b", "c0", "c1", "s")}

  def linear(name):
    return lambda images: np.asarray(images).reshape(len(images), -1) @ weights[name]

  monkeypatch.setitem(probes.PROBES._entries, "noise_test", lambda context: probes.Probe(
      "noise_test", np.random.default_rng(context.seed).normal(
          size=(context.num_inputs, *context.input_shape)).astype(np.float32), None, {}))
  candidates = {"a": _OutputsOnly(linear("a")), "b": _OutputsOnly(linear("b"))}
  controls = {"c0": QueryOnly("c0", linear("c0")), "c1": QueryOnly("c1", linear("c1"))}
  result = run_audit(QueryOnly("s", linear("s")), candidates, controls, input_shape=(8, 8, 1),
                     num_classes=10,
                     num_inputs=20, probes=("disagreement",),
                     probe_settings={"disagreement": {"start": "noise_test", "rounds": 3}})
  # 3 search rounds + the initial point + the scores: 5 queries of 20 inputs each.
  assert [c.calls for c in candidates.values()] == [5, 5]
  assert result["queries"] == {"a": 100, "b": 100}
  assert controls["c0"].queries == 20
  info = result["probes"]["disagreement"]
  assert info["js_after"] >= info["js_before"] and info["start"] == "noise_test"


# --- End to end through the CLI --------------------------------------------------------------

def _audit_args(zoo, data_dir, out, candidates):
  controls = ",".join(f"control{i}={zoo[f'control{i}']}" for i in range(4))
  return [f"--student={zoo['student']}",
          "--candidates=" + ",".join(f"{c}={zoo[c]}" for c in candidates),
          f"--controls={controls}", f"--data_dir={data_dir}", f"--out={out}",
          "--num_inputs=128"]


def _audit_cli(zoo, data_dir, out, candidates):
  """`python -m distill_jax.main audit ...` in a subprocess running this checkout."""
  from conftest import run_cli

  proc = run_cli(["audit", *_audit_args(zoo, data_dir, out, candidates)], timeout=300)
  with open(os.path.join(out, "audit.json")) as f:
    return proc, json.load(f)


def test_cli_audit_picks_the_true_teacher(zoo, data_dir, tmp_path):
  proc, result = _audit_cli(zoo, data_dir, tmp_path, "ABCD")
  assert result["answer"] == "A", result["adjusted_p"]
  assert result["adjusted_p"]["A"] < 0.05 and result["num_controls"] == 4
  assert result["primary"] == {**result["primary"], "probe": "disagreement",
                               "score": "spearman", "contrast": True}
  assert {p: i["num_inputs"] for p, i in result["probes"].items()} == {
      "disagreement": 128, "synthetic": 128}
  assert "Answer: 'A'" in proc.stdout
  with open(tmp_path / "audit.md") as f:
    text = f.read()
  assert "4 control students" in text and "128 disagreement probe inputs" in text
  assert os.path.getsize(tmp_path / "audit.png") > 10_000


def test_cli_audit_says_none_without_the_true_teacher(zoo, data_dir, tmp_path, capsys):
  """The same command in-process (`distill_jax.audit.cli.main`: no second JAX start-up)."""
  from distill_jax.audit import cli

  assert cli.main(_audit_args(zoo, data_dir, tmp_path, "BCD")) == 0
  assert "Answer: none of the candidates" in capsys.readouterr().out
  with open(tmp_path / "audit.json") as f:
    result = json.load(f)
  assert result["answer"] == "none", result["adjusted_p"]
  assert result["answer_set"] == [] and result["named"] is None
  assert result["precision"] is None and min(result["adjusted_p"].values()) >= 0.05


def test_cli_errors_are_one_line(zoo, tmp_path, capsys):
  from distill_jax.audit import cli

  missing = str(tmp_path / "nowhere")
  assert cli.main([f"--student={zoo['student']}", f"--candidates={missing},{zoo['B']}",
                   f"--controls={zoo['control0']},{zoo['control1']}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("Error: --candidates:") and missing in err and "\n" not in err
  assert cli.main([f"--student={zoo['student']}", f"--candidates={zoo['A']},{zoo['B']}",
                   f"--controls={zoo['control0']},{zoo['control1']}", "--probe=synthtic"]) == 2
  err = capsys.readouterr().err.strip()
  assert "Unknown probe 'synthtic'" in err and "Known probes: disagreement, " in err
  assert "\n" not in err
  base = [f"--student={zoo['student']}", f"--candidates=A={zoo['A']},B={zoo['B']}",
          f"--controls={zoo['control0']},{zoo['control1']}"]
  assert cli.main([*base, f"--shadows={zoo['control2']}"]) == 2  # No SOURCE: given.
  err = capsys.readouterr().err.strip()
  assert err.startswith("Error: --shadows=") and "SOURCE:PATH" in err and "\n" not in err
  assert cli.main([*base, f"--shadows=Z:{zoo['control2']}"]) == 2  # Z: no candidate or decoy.
  err = capsys.readouterr().err.strip()
  assert err.startswith("Error: --shadows: control2='Z'") and "(A, B)" in err


@pytest.mark.parametrize("arg", ["tiny", "cifar10,tiny"])
def test_benchmark_sweep_validates(arg, tmp_path):
  """experiments/audit_digits, on the digits and in the CIFAR-10 setting: 4 teachers, 5
  methods x 4 teachers, 4 two-teacher ensembles, 2 x 12 controls (`controls=N` changes that);
  every trial's config (built by the spec file's own get_config) passes the CLI's own
  validation; nothing is trained. CIFAR-10 is not prepared here, so its sweep is refused for
  that alone: the configs are checked first, and the data once for all 52 trials."""
  from conftest import ROOT

  from distill_jax.config import load_config_file
  from distill_jax.sweep import load_trials
  from distill_jax.sweep.spec import SweepError, validate_trials

  spec = os.path.join(ROOT, "experiments", "audit_digits", "sweep.py")
  cifar = arg.startswith("cifar10")
  trials = load_trials(f"{spec}:{arg}", str(tmp_path), validate=not cifar)
  if cifar:
    with pytest.raises(SweepError) as refused:
      validate_trials(trials, str(tmp_path))
    assert str(refused.value).startswith("Data set 'cifar10' is not prepared in data_dir ")
    assert "52 trial(s) read it" in str(refused.value)
  stages = [t.stage for t in trials]
  assert stages.count("teachers") == 4 and stages.count("students") == 48
  assert len(load_trials(f"{spec}:{arg},controls=5", str(tmp_path), validate=False)) == 4 + 34
  assert all(t.config.startswith(spec + ":") for t in trials)
  ensembles = [t for t in trials if t.labels.get("method") == "ensemble"]
  assert len(ensembles) == 4 and all(t.depends_on and len(t.depends_on) == 2 for t in ensembles)
  first = ensembles[0]
  config = load_config_file(first.config, dict(first.overrides))
  assert set(config.teachers) == {"teacher", "teacher2"}
  assert config.losses.kd.aggregation == "mean"
  assert [config.teachers[k].checkpoint for k in ("teacher", "teacher2")] == [
      f"{{ROOT}}/{name}" for name in first.depends_on]
  assert config.losses.kd.get("teacher") is None  # The target: both teachers' mean.
  assert config.data.name == ("cifar10" if cifar else "digits")
  names = {t.name for t in trials}
  if cifar:
    assert {"resnet56a", "resnet56b", "resnet110", "vgg13", "kd-vgg13-s0",
            "ensemble-resnet56a_vgg13-s0", "alone-wrn16-2-s11"} <= names
    assert load_config_file(f"{spec}:cifar10,ce,resnet56,cifar10").num_epochs == 240.0
  else:
    assert "ensemble-cnn32-64a_mlp256-s0" in names
    # Controls and distilled students of an architecture train alike (digits.py's MLP roles
    # drop the crop; the benchmark keeps it for every student).
    augments = {(t.labels["arch"], load_config_file(t.config, dict(t.overrides)).data.augment)
                for t in trials if t.stage == "students"}
    assert augments == {("mlp", "crop"), ("cnn", "crop")}


def test_benchmark_table_counts_either_ensemble_teacher():
  """table.py: an ensemble student's answer is correct if it names either true teacher; a
  third teacher is a wrong one; a set answer is counted apart; controls' accusations are false
  accusations."""
  import importlib.util

  from conftest import ROOT

  path = os.path.join(ROOT, "experiments", "audit_digits", "table.py")
  module_spec = importlib.util.spec_from_file_location("audit_digits_table", path)
  table = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(table)

  def row(method, teacher, answer, forced, base):
    return {"method": method, "teacher": teacher, "answer": answer,
            "effect": {forced: 3.0, "Z": 1.0}, "baseline_real_top1": base,
            "baseline_spearman": base}

  rows = [row("ensemble", "A_B", "B", "A", "C"), row("ensemble", "A_B", "C", "B", "A"),
          row("ensemble", "A_B", "none", "C", "B"), row("ensemble", "A_B", "A", "A", "A"),
          row("kd", "A", "B", "B", "A"), row("alone", None, "none", "A", "A"),
          row("alone", None, "A", "A", "A"), row("kd", "A", "A or B", "A", "A")]
  lines = table.summarise(rows).splitlines()
  assert lines[2] == ("| ensemble (correct: either teacher) | 4 | 50% | 25% | 0% | 25% | 75% | "
                      "75% | 75% |")
  # A set answer ('A or B') is counted apart: neither correct nor a wrong teacher.
  assert lines[3] == "| kd | 2 | 0% | 0% | 50% | 50% | 50% | 100% | 100% |"
  assert lines[4].startswith("| controls (false accusations) | 2 | - | 50% | - | 50% accused")


def test_cli_audit_with_a_decoy_and_shadows(zoo, data_dir, tmp_path, capsys):
  """--decoys and --shadows through the CLI: D is a decoy (queried like a candidate, never
  named) and two students distilled from D (KD, T = 4) are decoy controls. The KD student of
  A is named A alone: accused, and closer to A than to B, C and the decoy D (the
  intersection-union p is the largest of those p-values); the JSON keeps the pairwise
  p-values, the controls' teachers and the paper's baseline row; the report gives no
  'confidence'. A third student distilled from D (a teacher that is no candidate) accuses
  nobody."""
  import jax

  from distill_jax.audit import cli, load_exported

  images, _ = _digits(data_dir, "train")
  soft = np.asarray(jax.nn.softmax(load_exported(zoo["D"], (8, 8, 1))(images) / 4.0))
  made = {f"fromD{i}": _export(tmp_path / f"fromD{i}", (32,),
                               _fit_mlp(images, soft, (32,), 300 + i, 300, 4.0))
          for i in range(3)}
  controls = ",".join(f"control{i}={zoo[f'control{i}']}" for i in range(4))
  shadows = ",".join(f"D:fromD{i}={made[f'fromD{i}']}" for i in range(2))

  def audit(student, out):
    assert cli.main([f"--student={student}", f"--controls={controls}",
                     "--candidates=" + ",".join(f"{c}={zoo[c]}" for c in "ABC"),
                     f"--decoys=D={zoo['D']}", f"--shadows={shadows}",
                     f"--data_dir={data_dir}", f"--out={out}", "--num_inputs=64",
                     "--set=synthetic.steps=100", "--set=disagreement.rounds=10"]) == 0
    with open(os.path.join(out, "audit.json")) as f:
      return json.load(f)

  result = audit(zoo["student"], tmp_path / "a")
  assert result["answer"] == "A" and result["named"] == "A", (result["adjusted_p"],
                                                              result["pairwise_p"])
  assert result["decoys"] == ["D"] and result["num_untaught"] == 6
  assert result["reference_teachers"]["fromD0"] == "D"
  assert result["reference_teachers"]["control0"] is None
  assert set(result["pairwise_p"]["A"]) == {"B", "C", "D"}
  assert result["pairwise_null"]["D"] == "shadows"
  assert result["iut_p"]["A"] == pytest.approx(max(result["adjusted_p"]["A"],
                                                   *result["pairwise_p"]["A"].values()))
  assert result["baseline"]["answer"] in "ABC" and result["baseline"]["probe"] == "synthetic"
  # The controls' features reach the feature scores (the CLI loads them white-box).
  ridge = result["scores"]["A"]["synthetic"]["ridge"]
  assert np.isfinite(ridge["effect"]) and len(ridge["references"]) == 6
  assert "confidence" not in result and "Answer: 'A': accused" in capsys.readouterr().out
  with open(tmp_path / "a" / "audit.md") as f:
    text = f.read()
  assert "intersection-union p" in text and "Baseline: argmax of mean 1/(KL + eps)" in text
  innocent = audit(made["fromD2"], tmp_path / "d")
  assert innocent["answer"] == "none", (innocent["adjusted_p"], innocent["pairwise_p"])
