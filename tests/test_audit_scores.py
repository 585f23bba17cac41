"""The audit's feature and residual scores, its on-manifold probes and the paper's baseline,
each against a NumPy/SciPy/scikit-learn reference written here; and an audit whose student
and controls expose features, with a decoy, through `run_audit` (NumPy models, no training)."""

import numpy as np
import pytest
from scipy import special, stats
from sklearn.linear_model import Ridge

from distill_jax.audit import decision, probes, scores
from distill_jax.audit.run import paper_baseline, run_audit


@pytest.mark.parametrize("n,d,k,seed", [(40, 6, 10, 0), (41, 30, 3, 1)])
def test_ridge_heldout_matches_sklearn(n, d, k, seed):
  """Fit on a seeded half (scikit-learn's Ridge on the features standardised by that half,
  penalty 0.1 x fit rows, intercept), scored on the other half: 1 - squared error / the
  held-out mean squared deviation from the fit half's mean; NaN on the fit half."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + 3.0
  logits = x[:, :k % d + 1] @ rng.normal(size=(k % d + 1, k)) + rng.normal(size=(n, k))
  got = scores.ridge_heldout(x, logits, seed=7)
  fit, held = scores._split(n, 7)
  assert len(fit) == n // 2 and sorted([*fit, *held]) == list(range(n))
  y = special.log_softmax(logits, axis=1)
  z = (x - x[fit].mean(0)) / x[fit].std(0)
  model = Ridge(alpha=scores.RIDGE * len(fit), fit_intercept=True).fit(z[fit], y[fit])
  error = ((y[held] - model.predict(z[held])) ** 2).sum(1)
  total = ((y[held] - y[fit].mean(0)) ** 2).sum(1).mean()
  np.testing.assert_allclose(got[held], 1 - error / total, rtol=1e-7, atol=1e-9)
  assert np.all(np.isnan(got[fit]))



def test_ridge_heldout_scores_a_linear_map_high_and_noise_low():
  """Logits that are a small linear map of the features (log-probs nearly linear in them)
  score near 1 held out; unrelated features score near or below 0."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(200, 5))
  logits = 0.2 * x @ rng.normal(size=(5, 10))
  assert np.nanmean(scores.ridge_heldout(x, logits, 0)) > 0.9
  assert np.nanmean(scores.ridge_heldout(rng.normal(size=(200, 5)), logits, 0)) < 0.1


def test_cka_shares_average_to_linear_cka():
  """The mean of the per-input shares is linear CKA, HSIC(Kx, Ky) / sqrt(HSIC(Kx, Kx)
  HSIC(Ky, Ky)) with HSIC(K, L) = tr(K H L H), H = I - 11'/n, Ky of row-centred logits."""
  rng = np.random.default_rng(2)
  x, logits = rng.normal(size=(25, 7)), rng.normal(size=(25, 5))
  logits[:, 0] += 3 * x[:, 0]
  got = scores.cka_shares(x, logits)
  h = np.eye(25) - 1 / 25
  y = logits - logits.mean(1, keepdims=True)

  def hsic(a, b):
    return np.trace(a @ h @ b @ h)

  kx, ky = x @ x.T, y @ y.T
  want = hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky))
  assert got.shape == (25,) and got.mean() == pytest.approx(want, rel=1e-10)
  # Invariant to a per-row shift of the logits and to an orthogonal map and scale of features.
  q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
  shifted = logits + rng.normal(size=(25, 1))
  assert scores.cka_shares(2 * x @ q, shifted).mean() == pytest.approx(want, rel=1e-9)
  assert scores.cka_shares(x, x @ rng.normal(size=(7, 5)) + 5).mean() > want


def test_residual_slopes_match_the_regression():
  """Mean of the per-input values = the pooled slope of the regression through the origin of
  r (the model's row-centred log-probs minus the controls' mean) on u (the teacher's minus the
  candidates' mean); a model that copies what is specific to the teacher gets slope ~ 1."""
  rng = np.random.default_rng(3)
  n, k = 30, 6
  common = rng.normal(size=(n, k))
  candidates = [common + rng.normal(size=(n, k)) for _ in range(3)]
  controls = [common + 0.3 * rng.normal(size=(n, k)) for _ in range(4)]
  model = common + 0.7 * rng.normal(size=(n, k))

  def centred(a):
    z = special.log_softmax(a, axis=1)
    return z - z.mean(1, keepdims=True)

  r = centred(model) - np.mean([centred(c) for c in controls], 0)
  u = centred(candidates[1]) - np.mean([centred(c) for c in candidates], 0)
  slope = np.linalg.lstsq(u.reshape(-1, 1), r.reshape(-1), rcond=None)[0][0]
  got = scores.residual_slopes(model, controls, candidates[1], candidates)
  assert got.shape == (n,) and got.mean() == pytest.approx(slope, rel=1e-10)
  assert np.all(np.isnan(scores.residual_slopes(model, [], candidates[1], candidates)))
  # Log-probs that copy candidate 1's own part, on top of the controls': slope near 1.
  copy = np.mean([centred(c) for c in controls], 0) + u
  got = scores.residual_slopes(copy, controls, candidates[1], candidates).mean()
  assert got == pytest.approx(1.0, abs=0.05)


def test_paper_baseline_is_argmax_of_inverse_kl():
  rng = np.random.default_rng(4)
  student = rng.normal(size=(12, 5))
  teachers = {"a": rng.normal(size=(12, 5)), "b": student + 0.1 * rng.normal(size=(12, 5))}
  per_input = {c: {"synthetic": {"s": scores.per_input_scores(student, t, None)}}
               for c, t in teachers.items()}
  got = paper_baseline(per_input, ["a", "b"], "s", ["synthetic"])
  for c, t in teachers.items():
    kl = [stats.entropy(special.softmax(ti), special.softmax(si))
          for ti, si in zip(t, student, strict=True)]
    assert got["scores"][c] == pytest.approx(np.mean(1 / (np.array(kl) + 1e-6)), rel=1e-6)
  assert got["answer"] == "b" and got["probe"] == "synthetic"


# --- Probes on the data manifold ------------------------------------------------------------

def _context(student, candidates, n=24, seed=0, settings=None):
  return probes.ProbeContext(student, candidates, (4, 4, 1), 10, n, seed,
                             settings=settings or {})


def test_mixup_mixes_the_real_inputs():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(24, 4, 4, 1)).astype(np.float32)
  context = _context(None, {}, settings={"mixup": {"beta": "0.5"}})
  context.cache["real"] = probes.Probe("real", real, np.arange(24) % 10, {})  # Made once.
  got = context.probe("mixup")
  draws = np.random.default_rng([0, 2])
  perm, lam = draws.permutation(24), draws.beta(0.5, 0.5, size=24)
  want = [lam[i] * real[i] + (1 - lam[i]) * real[perm[i]] for i in range(24)]
  np.testing.assert_allclose(got.images, want, rtol=1e-6, atol=1e-6)
  assert got.labels is None and got.info["beta"] == 0.5
  with pytest.raises(probes.AuditError, match="mixup.beta"):
    _context(None, {}, settings={"mixup": {"beta": "0"}}, n=4).probe("mixup")


def test_pair_disagreement_searches_between_the_two_closest():
  """The pair: the two candidates with the highest mean Spearman correlation to the student
  on the start inputs; the search raises the JS divergence of those two only."""
  rng = np.random.default_rng(6)
  weights = {c: rng.normal(size=(16, 10)) for c in "abc"}
  weights["s"] = weights["c"] + 0.3 * weights["a"]

  def linear(name):
    return lambda x: np.asarray(x).reshape(len(x), -1) @ weights[name]

  start = rng.normal(size=(24, 4, 4, 1)).astype(np.float32)
  rho = {c: np.mean([stats.spearmanr(a, b).statistic for a, b in
                     zip(linear("s")(start), linear(c)(start), strict=True)]) for c in "abc"}
  want_pair = tuple(sorted(rho, key=lambda c: -rho[c])[:2])
  context = _context(linear("s"), {c: linear(c) for c in "abc"},
                     settings={"pair_disagreement": {"start": "noise", "rounds": "5"}})
  context.cache["noise"] = probes.Probe("noise", start, None, {})
  got = context.probe("pair_disagreement")
  assert tuple(got.info["pair"]) == want_pair == ("c", "a")
  js = probes.js_divergence([linear(c)(got.images) for c in want_pair])
  assert got.info["js_after"] == pytest.approx(js.mean(), rel=1e-5)
  assert got.info["js_after"] > got.info["js_before"]


# --- An audit with features and a decoy ------------------------------------------------------

class _Model:
  """A NumPy model answering for the fixed probe inputs (their pixel is their index), with
  penultimate features when given."""

  def __init__(self, name, logits, features=None):
    self.name, self._logits, self._features = name, logits, features

  def __call__(self, images):
    return self._logits[np.asarray(images).reshape(-1).astype(int)]

  def features(self, images):
    if self._features is None:
      return None
    return self._features[np.asarray(images).reshape(-1).astype(int)]


def test_feature_scores_see_a_feature_distilled_student(monkeypatch):
  """The student's features carry a linear image of teacher t1's logits (as a feature method
  would leave) while its own logits are a control's: the logit scores see nothing, the ridge
  and CKA scores put the student above every control for t1; every score's effect is in the
  result for every source (the decoy too), and the decision names nobody on the logits."""
  rng = np.random.default_rng(7)
  n, k, d = 200, 10, 12
  task = rng.normal(size=(n, k)) * 2
  teachers = {f"t{i}": task + 1.5 * rng.normal(size=(n, k)) for i in range(3)}
  decoy = task + 1.5 * rng.normal(size=(n, k))
  mix = rng.normal(size=(k, d))

  def control(i):
    return _Model(f"c{i}", task + 1.5 * rng.normal(size=(n, k)),
                  task @ mix + 2.0 * rng.normal(size=(n, d)))

  controls = {f"c{i}": control(i) for i in range(6)}
  student = _Model("student", task + 1.5 * rng.normal(size=(n, k)),
                   teachers["t1"] @ mix + 0.5 * rng.normal(size=(n, d)))
  monkeypatch.setitem(probes.PROBES._entries, "fixed_test", lambda context: probes.Probe(
      "fixed", np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), None, {}))
  result = run_audit(student, {c: _Model(c, x) for c, x in teachers.items()}, controls,
                     input_shape=(1, 1, 1), num_classes=k, probes=("fixed_test",),
                     decoys={"decoy": _Model("decoy", decoy)}, primary="fixed_test:ridge")
  table = result["scores"]
  assert set(table) == {"t0", "t1", "t2", "decoy"}
  for source in table:
    assert set(table[source]["fixed_test"]) == {s.name for s in scores.score_names()}
    assert all(np.isfinite(v["effect"]) for v in table[source]["fixed_test"].values())
  for name in ("ridge", "cka"):
    row = table["t1"]["fixed_test"][name]
    assert row["student"] > max(row["controls"].values()), (name, row)
    assert row["effect"] > 3
  assert result["named"] == "t1", (result["adjusted_p"], result["pairwise_p"])
  assert result["decoys"] == ["decoy"] and "decoy" in result["pairwise_p"]["t1"]
  logits_only = run_audit(student, {c: _Model(c, x) for c, x in teachers.items()}, controls,
                          input_shape=(1, 1, 1), num_classes=k, probes=("fixed_test",),
                          decoys={"decoy": _Model("decoy", decoy)})
  assert logits_only["answer"] == decision.NONE, logits_only["adjusted_p"]
  assert logits_only["baseline"]["answer"] in teachers  # Forced: it always names one.
