"""Contrastive Representation Distillation (CRD; Tian, Krishnan and Isola, ICLR 2020).

Registered here: `crd`, a module term with two trainable embedding heads and two momentum
memory banks (one row per training example) in its non-trainable 'memory' collection.

The core math is in small pure array functions, checked against NumPy in the tests:
`sample_contrast_indices`, `contrast_logits`, `log_normalizer`, `nce_loss`
and `momentum_update`. `CRD` only wires them together and keeps the state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.initializers import dense_kernel_init
from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import POSITIVE, POSITIVE_INT
from distill_jax.losses.base import (
  EPS,
  SideDataNeed,
  example_weights,
  feature_pairs,
  l2_normalize,
  register_loss,
  shape_mismatch,
)

# Above this ratio of bank rows to sampled rows per example, `contrast_logits` gathers the
# sampled rows ([B, K+1, D], as the reference does) instead of scoring the whole bank
# ([B, N] with one matmul); both give the same values, this only picks the cheaper one.
_DENSE_SCORING_MAX_RATIO = 64
# Where `crd` takes its negatives from, and its positive (see `CRD`).
NEGATIVES = ("uniform", "other_class")
POSITIVES = ("self", "same_class")


def sample_contrast_indices(rng: jax.Array, ids: jax.Array, num_examples: int,
                            num_negatives: int) -> jax.Array:
  """Memory-bank rows to score each example against: [B] ids -> [B, 1 + K] int32.

  Column 0 is the example's own id (the positive); columns 1..K are K negatives drawn
  uniformly, with replacement, from `[0, num_examples)` (the reference's alias sampler over
  uniform weights), so a negative may by chance be the positive itself, as in the reference.
  Each example's negatives come from `fold_in(rng, id)`: they depend on the example, not on
  its position in the batch or on the device it sits on, so `jit` on a mesh and `pmap` draw
  the very same negatives without any communication (ids are distinct within a batch).
  """
  ids = ids.astype(jnp.int32)

  def draw(example_id: jax.Array) -> jax.Array:
    key = jax.random.fold_in(rng, example_id)
    return jax.random.randint(key, (num_negatives,), 0, num_examples, dtype=jnp.int32)

  negatives = jax.vmap(draw)(ids)
  return jnp.concatenate([ids[:, None], negatives], axis=1)


def contrast_logits(memory: jax.Array, idx: jax.Array, embedding: jax.Array,
                    temperature: float) -> jax.Array:
  """`<memory[idx[b, k]], embedding[b]> / T`: [N, D] bank, [B, K+1] rows, [B, D] -> [B, K+1].

  The log of the reference's unnormalised `exp(<m, e> / T)`. The bank is a constant here
  (stop_gradient): gradients reach only `embedding`.
  """
  memory = jax.lax.stop_gradient(memory)
  num_rows, cols = memory.shape[0], idx.shape[1]
  # Full float32 products (no TF32/bf16 passes on accelerators): 1 / T amplifies their error.
  precision = jax.lax.Precision.HIGHEST
  if num_rows <= _DENSE_SCORING_MAX_RATIO * cols:
    # Score every row once, then pick: no [B, K+1, D] intermediate.
    scores = jnp.matmul(embedding, memory.T, precision=precision)  # [B, N]
    logits = jnp.take_along_axis(scores, idx, axis=1)
  else:
    logits = jnp.einsum("bkd,bd->bk", memory[idx], embedding, precision=precision)
  return logits / temperature


def log_normalizer(logits: jax.Array, weights: jax.Array, num_examples: int) -> jax.Array:
  """`log Z` with `Z = mean(exp(logits)) * num_examples`, the reference's NCE normaliser.

  The mean runs over every entry of the rows with weight > 0 ([B, K+1] logits, [B] weights;
  the weights' values only select rows). Computed as a log-sum-exp (no overflow for
  small temperatures) and under stop_gradient: Z is a constant, as in the reference.
  """
  logits = jax.lax.stop_gradient(logits)
  keep = (weights > 0)[:, None]
  top = jnp.max(jnp.where(keep, logits, -jnp.inf))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  total = jnp.sum(jnp.where(keep, jnp.exp(logits - top), 0.0))
  count = jnp.sum(keep) * logits.shape[1]
  return top + jnp.log(jnp.maximum(total, 1e-30)) - jnp.log(
      jnp.maximum(count, 1).astype(logits.dtype)) + math.log(num_examples)


def nce_loss(log_probs: jax.Array, num_examples: int, weights: jax.Array | None = None,
             eps: float = 1e-7) -> jax.Array:
  """The CRD code's NCE loss (`ContrastLoss`) from `log x`, x = exp(<m, e> / T) / Z [B, 1+K].

  With `K` negatives, `Pn = 1 / num_examples` (uniform noise) and `c = K * Pn`:
    loss = -mean_b [ log(x_b0 / (x_b0 + c + eps)) + sum_{k>=1} log(c / (x_bk + c + eps)) ],
  the batch mean weighted by `weights` [B] (the batch mask). Evaluated from `log x` with
  `log(x + c + eps) = logaddexp(log x, log(c + eps))`, so it equals the reference's formula
  exactly and is finite for any logits (eps 1e-7 as in the reference).
  """
  num_negatives = log_probs.shape[1] - 1
  c = num_negatives / num_examples
  log_noise = math.log(c + eps)
  log_d1 = log_probs[:, 0] - jnp.logaddexp(log_probs[:, 0], log_noise)
  log_d0 = math.log(c) - jnp.logaddexp(log_probs[:, 1:], log_noise)
  per_example = -(log_d1 + jnp.sum(log_d0, axis=1))
  if weights is None:
    return jnp.mean(per_example)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def momentum_update(memory: jax.Array, ids: jax.Array, embeddings: jax.Array, momentum: float,
                    weights: jax.Array | None = None) -> jax.Array:
  """`memory[id] = normalize(momentum * memory[id] + (1 - momentum) * e)` for each row of e.

  [N, D] bank, [B] distinct ids, [B, D] embeddings (taken under stop_gradient). Rows whose
  weight is 0 (padding, whose id may be anything) leave the bank untouched; other rows are
  not changed.
  """
  embeddings = jax.lax.stop_gradient(embeddings).astype(memory.dtype)
  num_rows = memory.shape[0]
  ids = ids.astype(jnp.int32)
  keep = jnp.ones(ids.shape, bool) if weights is None else weights > 0
  rows = memory[jnp.where(keep, ids, 0)]
  updated = l2_normalize(momentum * rows + (1.0 - momentum) * embeddings)
  return memory.at[jnp.where(keep, ids, num_rows)].set(updated, mode="drop")


@register_loss("crd", ranges={
    "feat_dim": (POSITIVE_INT, "the embedding size"),
    "num_negatives": (POSITIVE_INT, "negatives per example"),
    "nce_temperature": (POSITIVE, "the NCE temperature"), "eps": EPS})
class CRD(nn.Module):
  """CRD (Tian et al., ICLR 2020): NCE contrast of student and teacher embeddings.

  `e_s = normalize(W_s f_s + b_s)`, `e_t = normalize(W_t f_t + b_t)`: trainable linear heads
  to `feat_dim` on the (flattened) features `f_s` [B, ...] of `student_layer` and `f_t` of
  `teacher_layer` (the teacher's head is trained, the teacher is not). Two memory banks
  [num_examples, feat_dim], `M_s` of student and `M_t` of teacher embeddings, one row per
  training example (`batch['id']`, int [B] in [0, num_examples)). Per example, rows
  `idx = [id, n_1..n_K]`, `n_k` uniform (`sample_contrast_indices`, or the batch's own
  `batch['contrast_idx']` [B, 1+K] if given, as the reference's data loader can), and
    out_s = exp(<M_t[idx], e_s> / T) / Z_s,   out_t = exp(<M_s[idx], e_t> / T) / Z_t,
    loss = NCE(out_s) + NCE(out_t)   (`nce_loss`, weighted batch mean under `batch['mask']`).
  `Z = mean(exp(<M[idx], e> / T)) * num_examples` is fixed at the first training step, as in
  the reference: it is kept as `log Z` in the 'memory' collection with a flag saying it is set
  (before that, e.g. in eval mode, the current batch's value is used without storing it).
  After the loss, during training only (the 'memory' collection is mutable, not at init), both
  banks take this batch's embeddings with momentum: `M[id] = normalize(m * M[id] + (1-m) * e)`.

  The term sees the global batch in every parallel mode (under pmap the train step gathers
  the outputs and batch before the objective), so every device computes the same loss and
  bank update: `jit` on a mesh and `pmap` give the single-device result.

  Defaults are the CRD paper code's (RepDistiller): feat_dim 128, 16384 negatives, NCE
  temperature 0.07, momentum 0.5, features of the pre-logit layer ('pool'); term weight 0.8
  beside CE with weight 1 (CRD+KD: KD weight 1). Memory per bank: num_examples * feat_dim
  floats (50000 x 128 x 4 B = 25.6 MB on CIFAR).

  Negatives (`negatives`): 'uniform' (default) draws them uniformly over all examples in the
  step (the reference's alias-sampler path), unless the batch brings `contrast_idx`.
  'other_class' is what RepDistiller's CIFAR loader does for its CRD runs: negatives from the
  examples of other classes only, drawn by the data pipeline
  (`distill_jax.data.class_contrast_indices`, which the run adds as `batch['contrast_idx']`,
  deterministic per seed); `positive='same_class'` then makes column 0 a random example of the
  same class (the reference's `mode='relax'`) instead of the example itself ('self', its
  'exact'). The memory update always writes the example's own row.
  """

  student_layer: str = "pool"
  teacher_layer: str = "pool"
  feat_dim: int = 128
  num_negatives: int = 16384
  nce_temperature: float = 0.07
  momentum: float = 0.5
  eps: float = 1e-7
  teacher: str | None = None
  num_examples: int = 0
  negatives: str = "uniform"
  positive: str = "self"

  def side_data(self) -> tuple[SideDataNeed, ...]:
    """With negatives='other_class': `contrast_idx` int32 [1 + num_negatives] per example,
    drawn from the labels (`data.class_contrast_indices`); raises ValueError naming a
    sampling setting that is not allowed. Otherwise nothing."""
    if self.negatives != "other_class":
      return ()
    self.check_sampling()
    return (SideDataNeed("contrast_idx", "class_contrast_indices",
                     (("num_negatives", self.num_negatives), ("positive", self.positive)),
                     (self.num_negatives + 1,), "int32"),)

  def check_sampling(self) -> None:
    """Raises a ValueError naming the setting if `negatives` / `positive` are not allowed."""
    if self.negatives not in NEGATIVES:
      raise ValueError(f"crd negatives={self.negatives!r} is not one of {NEGATIVES}.")
    if self.positive not in POSITIVES:
      raise ValueError(f"crd positive={self.positive!r} is not one of {POSITIVES}.")
    if self.positive != "self" and self.negatives != "other_class":
      raise ValueError(f"crd positive={self.positive!r} needs negatives='other_class' (the "
                       "data pipeline draws both from the labels).")

  @nn.compact
  def __call__(self, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Mapping[str, jax.Array]) -> jax.Array:
    if self.num_examples < 1:
      raise ValueError(f"crd keeps one memory row per training example and needs "
                       f"num_examples >= 1 (filled in by the run), got {self.num_examples}.")
    if "id" not in batch:
      raise ValueError("crd needs batch['id'] (each example's index in the training set, "
                       f"int [B]) to address its memory bank; the batch has {sorted(batch)}.")
    [(f_s, f_t)] = feature_pairs(student, teachers, self.student_layer, self.teacher_layer,
                                 self.teacher)
    if f_s.ndim < 2 or f_t.ndim < 2 or f_s.shape[0] != f_t.shape[0]:
      raise shape_mismatch("crd", self.student_layer, f_s.shape, self.teacher_layer, f_t.shape,
                           fix="Both features need the same batch axis first ([B, ...]).")
    self.check_sampling()
    if self.negatives == "other_class":
      given = batch.get("contrast_idx")
      if given is None:
        raise ValueError(
            "crd negatives='other_class' reads its negatives from batch['contrast_idx'] "
            "(int [B, 1 + num_negatives], added by the run's data pipeline from the labels, "
            "see distill_jax.data.class_contrast_indices); the batch has "
            f"{sorted(batch)}.")
      if given.shape[-1] != self.num_negatives + 1:
        raise ValueError(f"crd batch['contrast_idx'] has {given.shape[-1]} columns; "
                         f"num_negatives={self.num_negatives} needs {self.num_negatives + 1}.")
    ids = batch["id"]
    e_s = l2_normalize(nn.Dense(self.feat_dim, kernel_init=dense_kernel_init,
                                name="embed_s")(f_s.reshape(f_s.shape[0], -1)))
    e_t = l2_normalize(nn.Dense(self.feat_dim, kernel_init=dense_kernel_init,
                                name="embed_t")(f_t.reshape(f_t.shape[0], -1)))
    weights = example_weights(batch, e_s)

    stdv = 1.0 / math.sqrt(self.feat_dim / 3)
    shape = (self.num_examples, self.feat_dim)

    def bank() -> jax.Array:
      return jax.random.uniform(self.make_rng("params"), shape, jnp.float32, -stdv, stdv)

    memory_s = self.variable("memory", "memory_s", bank)
    memory_t = self.variable("memory", "memory_t", bank)
    log_z_s = self.variable("memory", "log_z_s", lambda: jnp.zeros((), jnp.float32))
    log_z_t = self.variable("memory", "log_z_t", lambda: jnp.zeros((), jnp.float32))
    z_is_set = self.variable("memory", "z_is_set", lambda: jnp.zeros((), jnp.bool_))

    idx = batch.get("contrast_idx")
    if idx is None:
      idx = sample_contrast_indices(self.make_rng("loss"), ids, self.num_examples,
                                    self.num_negatives)
    idx = idx.astype(jnp.int32)
    # Kept only when 'intermediates' is mutable (tests, debugging); free otherwise.
    self.sow("intermediates", "contrast_idx", idx)
    # The student's embedding against the teacher bank, the teacher's against the student's.
    logits_s = contrast_logits(memory_t.value, idx, e_s, self.nce_temperature)
    logits_t = contrast_logits(memory_s.value, idx, e_t, self.nce_temperature)
    batch_log_z_s = log_normalizer(logits_s, weights, self.num_examples)
    batch_log_z_t = log_normalizer(logits_t, weights, self.num_examples)
    use_log_z_s = jnp.where(z_is_set.value, log_z_s.value, batch_log_z_s)
    use_log_z_t = jnp.where(z_is_set.value, log_z_t.value, batch_log_z_t)
    loss = (nce_loss(logits_s - use_log_z_s, self.num_examples, weights, self.eps) +
            nce_loss(logits_t - use_log_z_t, self.num_examples, weights, self.eps))

    if self.is_mutable_collection("memory") and not self.is_initializing():
      log_z_s.value, log_z_t.value = use_log_z_s, use_log_z_t
      z_is_set.value = jnp.ones((), jnp.bool_)
      memory_s.value = momentum_update(memory_s.value, ids, e_s, self.momentum, weights)
      memory_t.value = momentum_update(memory_t.value, ids, e_t, self.momentum, weights)
    return loss
