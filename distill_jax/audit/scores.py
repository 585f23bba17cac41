"""Alignment scores between a student's and a candidate teacher's logits on probe inputs.

Every score is computed per input (an array [N], NaN where it is undefined), so that the
audit can average, bootstrap and plot it; `SCORES` lists them with their direction:

- `top1`: 1 where the student's and the candidate's top-1 classes agree (higher = closer).
- `kl_tT`: KL(p_teacher^T || p_student^T) of the softmaxes at temperature T, the quantity KD
  minimises (lower = closer).
- `kl_fit`: KL(p_teacher || p_student^tau) at the student temperature tau that minimises its
  mean over the probe inputs (lower = closer). Plain KL also measures how soft the student is:
  a student distilled at a high temperature is "close" to every flat, unsure model. Fitting tau
  per (model, candidate) takes that global sharpness out and leaves the shape of the outputs.
- `spearman`: Spearman rank correlation of the two logit vectors over the classes (ties get
  their average rank; higher = closer). Unlike top-1 it sees the order of the dark knowledge.
- `mistakes`: on the inputs where the candidate is wrong (its top-1 differs from the reference
  label: the true label on real data, else the majority vote of the other candidates), 1 where
  the student makes the same mistake, NaN elsewhere (higher = closer). Copied errors are the
  strongest evidence of distillation: a student trained on the labels has no reason to make them.

Where the signal is not in the logits (feature distillation: RKD, CRD), three more:

- `ridge`: a ridge map from the model's penultimate features (white-box: the student's and the
  controls') to the candidate's log-probs, fit on a seeded half of the probe inputs and scored
  on the other half: per held-out input 1 - its squared error / the held-out mean squared
  deviation from the fit half's mean, so its mean is the held-out R^2 (higher = closer; NaN on
  the fit half).
- `cka`: linear CKA between the model's feature Gram matrix and the candidate's logit Gram
  matrix (row-centred logits: a logit vector is known up to a shift), as per-input shares
  whose mean is the CKA (higher = closer).
- `residual`: the model's deviation from the mean of the controls no candidate taught (its
  row-centred log-probs minus theirs), regressed through the origin on the candidate's
  deviation from the candidates' mean: per input its share of the pooled slope (higher =
  closer). What every candidate shares, and what every control shares, cancels; only what is
  specific to one candidate is credited.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_TEMPERATURES = (1.0, 4.0, 10.0)


@dataclasses.dataclass(frozen=True)
class Score:
  name: str
  higher_is_closer: bool
  description: str


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top1_agreement(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
  """[N]: 1.0 where argmax agrees, else 0.0."""
  return (np.argmax(student, -1) == np.argmax(teacher, -1)).astype(np.float64)


def kl_divergence(student: np.ndarray, teacher: np.ndarray, temperature: float) -> np.ndarray:
  """[N]: KL(softmax(teacher / T) || softmax(student / T)), in nats."""
  log_t, log_s = log_softmax(teacher, temperature), log_softmax(student, temperature)
  return np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)


TEMPERATURE_GRID = tuple(float(x) for x in np.geomspace(0.1, 20.0, 47))


def fitted_kl(student: np.ndarray, teacher: np.ndarray,
              grid: Sequence[float] = TEMPERATURE_GRID) -> np.ndarray:
  """[N]: KL(softmax(teacher) || softmax(student / tau)) at the tau of `grid` with the lowest
  mean over the N inputs."""
  per_tau = [kl_with_student_temperature(student, teacher, tau) for tau in grid]
  return per_tau[int(np.argmin([v.mean() for v in per_tau]))]


def kl_with_student_temperature(student: np.ndarray, teacher: np.ndarray, tau: float
                                ) -> np.ndarray:
  """[N]: KL(softmax(teacher) || softmax(student / tau))."""
  log_t, log_s = log_softmax(teacher), log_softmax(student, tau)
  return np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)


def average_ranks(x: np.ndarray) -> np.ndarray:
  """Ranks (1..K) along the last axis; tied values share the mean of their ranks."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, axis=-1, kind="stable")
  sorted_x = np.take_along_axis(x, order, -1)
  k = x.shape[-1]
  ranks_sorted = np.broadcast_to(np.arange(1, k + 1, dtype=np.float64), x.shape).copy()
  # Average the ranks of each run of equal values: group id = count of value changes so far.
  new_group = np.concatenate([np.ones((*x.shape[:-1], 1), bool),
                              np.diff(sorted_x, axis=-1) != 0], -1)
  groups = np.cumsum(new_group, -1)
  flat_groups = (groups + (np.arange(int(np.prod(x.shape[:-1]))).reshape(x.shape[:-1])[
      ..., None] * (k + 1))).ravel()
  sums = np.bincount(flat_groups, ranks_sorted.ravel())
  counts = np.bincount(flat_groups)
  ranks_sorted = (sums[flat_groups] / counts[flat_groups]).reshape(x.shape)
  ranks = np.empty_like(ranks_sorted)
  np.put_along_axis(ranks, order, ranks_sorted, -1)
  return ranks


def spearman(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
  """[N]: Spearman correlation of each row's logits (NaN where a row is constant)."""
  a, b = average_ranks(student), average_ranks(teacher)
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  denominator = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, (a * b).sum(-1) / denominator, np.nan)


def mistake_agreement(student: np.ndarray, teacher: np.ndarray, reference: np.ndarray | None
                      ) -> np.ndarray:
  """[N]: where the teacher's top-1 differs from `reference` (labels [N], -1 = unknown), 1.0 if
  the student's top-1 equals the teacher's, else 0.0; NaN on the other inputs."""
  n = len(student)
  if reference is None:
    return np.full(n, np.nan)
  t = np.argmax(teacher, -1)
  wrong = (np.asarray(reference) >= 0) & (t != reference)
  same = (np.argmax(student, -1) == t).astype(np.float64)
  return np.where(wrong, same, np.nan)


def score_names(temperatures: Sequence[float] = DEFAULT_TEMPERATURES) -> list[Score]:
  """The scores of an image audit (`per_input_scores`, `feature_scores` and `residual`), in
  order, with their direction."""
  return [Score("top1", True, "top-1 agreement"),
          *[Score(kl_name(t), False, f"KL(teacher || student) at T={t:g}") for t in temperatures],
          Score("kl_fit", False, "KL(teacher || student) at the student temperature that fits "
                "best"),
          Score("spearman", True, "Spearman rank correlation of the logits"),
          Score("mistakes", True, "agreement on the candidate's own mistakes"),
          Score("ridge", True, "held-out R^2 of a ridge map from the model's penultimate "
                "features to the candidate's log-probs"),
          Score("cka", True, "linear CKA of the model's feature Gram matrix and the "
                "candidate's logit Gram matrix"),
          Score("residual", True, "slope of the model's deviation from the controls' mean on "
                "the candidate's deviation from the candidates' mean")]


def kl_name(temperature: float) -> str:
  return f"kl_t{temperature:g}"


def per_input_scores(student: np.ndarray, teacher: np.ndarray, reference: np.ndarray | None,
                     temperatures: Sequence[float] = DEFAULT_TEMPERATURES
                     ) -> dict[str, np.ndarray]:
  """Every score of `score_names(temperatures)`, per input ([N] each)."""
  out = {"top1": top1_agreement(student, teacher)}
  for t in temperatures:
    out[kl_name(t)] = kl_divergence(student, teacher, t)
  out["kl_fit"] = fitted_kl(student, teacher)
  out["spearman"] = spearman(student, teacher)
  out["mistakes"] = mistake_agreement(student, teacher, reference)
  return out


def majority_vote(logits: Sequence[np.ndarray]) -> np.ndarray | None:
  """[N]: the most frequent top-1 class among the models' logits (ties: the smallest class);
  None when `logits` is empty."""
  if not logits:
    return None
  votes = np.stack([np.argmax(x, -1) for x in logits])  # [M, N]
  k = max(int(x.shape[-1]) for x in logits)
  counts = np.zeros((votes.shape[1], k), np.int64)
  for row in votes:
    counts[np.arange(votes.shape[1]), row] += 1
  return np.argmax(counts, -1)


RIDGE = 0.1  # The ridge penalty per fit example, on standardised features.


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit rows, held-out rows): a seeded half of range(n) and the rest."""
  order = np.random.default_rng([seed, 4099]).permutation(n)
  return np.sort(order[:n // 2]), np.sort(order[n // 2:])


def ridge_heldout(features: np.ndarray, teacher: np.ndarray, seed: int, ridge: float = RIDGE
                  ) -> np.ndarray:
  """[N]: per held-out input, 1 - ||y_i - yhat_i||^2 / mean_held-out ||y_j - mean_fit(y)||^2,
  NaN on the fit half. y: the teacher's log-probs [N, K]; yhat: the ridge map (with an
  intercept) from the features [N, D] standardised by the fit half, penalty ridge x (fit rows),
  fit on `_split(N, seed)`'s first half."""
  x, y = np.asarray(features, np.float64), log_softmax(teacher)
  fit, held = _split(len(x), seed)
  out = np.full(len(x), np.nan)
  if len(fit) < 2 or len(held) < 1:
    return out
  mean, sd = x[fit].mean(0), x[fit].std(0)
  z = (x - mean) / np.where(sd > 0, sd, 1.0)
  y_mean = y[fit].mean(0)
  gram = z[fit].T @ z[fit] + ridge * len(fit) * np.eye(z.shape[1])
  weights = np.linalg.solve(gram, z[fit].T @ (y[fit] - y_mean))
  error = ((y[held] - y_mean - z[held] @ weights) ** 2).sum(-1)
  total = ((y[held] - y_mean) ** 2).sum(-1).mean()
  out[held] = 1.0 - error / total if total > 0 else np.nan
  return out


def cka_shares(features: np.ndarray, teacher: np.ndarray) -> np.ndarray:
  """[N]: each input's share of the linear CKA between the features [N, D] and the teacher's
  row-centred logits [N, K]: with centred Gram matrices Kx, Ky, N * sum_j Kx_ij Ky_ij /
  (||Kx||_F ||Ky||_F), whose mean over i is the CKA."""
  x = np.asarray(features, np.float64)
  y = np.asarray(teacher, np.float64)
  y = y - y.mean(-1, keepdims=True)
  x, y = x - x.mean(0), y - y.mean(0)  # Centring the columns centres the Gram matrices.
  kx, ky = x @ x.T, y @ y.T
  denominator = np.linalg.norm(kx) * np.linalg.norm(ky)
  if denominator == 0:
    return np.full(len(x), np.nan)
  return len(x) * (kx * ky).sum(-1) / denominator


def feature_scores(features: np.ndarray | None, teacher: np.ndarray, seed: int
                   ) -> dict[str, np.ndarray]:
  """`ridge` and `cka` ([N] each) of a model's penultimate features against a teacher's
  logits; NaN where the model's features are unknown (a query-only model)."""
  if features is None:
    nan = np.full(len(teacher), np.nan)
    return {"ridge": nan, "cka": nan.copy()}
  return {"ridge": ridge_heldout(features, teacher, seed), "cka": cka_shares(features, teacher)}


def residual_slopes(model: np.ndarray, controls: Sequence[np.ndarray], teacher: np.ndarray,
                    candidates: Sequence[np.ndarray]) -> np.ndarray:
  """[N]: r_i . u_i / mean_j (u_j . u_j), whose mean is the slope of the regression through
  the origin of r on u: r = the model's row-centred log-probs [N, K] minus the mean of the
  controls'; u = the teacher's minus the mean of the candidates' (the teacher among them when
  it is one). NaN without controls."""
  if not controls:
    return np.full(len(model), np.nan)

  def centred(logits):
    z = log_softmax(logits)
    return z - z.mean(-1, keepdims=True)

  r = centred(model) - np.mean([centred(c) for c in controls], 0)
  u = centred(teacher) - np.mean([centred(c) for c in candidates], 0)
  scale = (u * u).sum(-1).mean()
  return (r * u).sum(-1) / scale if scale > 0 else np.full(len(model), np.nan)
