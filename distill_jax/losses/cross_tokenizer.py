"""Token losses across tokenizers: a teacher that reads the same text in its own tokens.

A cross-tokenizer teacher (`teachers.NAME.tokenizer`, `data/text/cross_tokenizer.py`) runs on
its own ids `xtok/NAME/tokens` [B, L_T]; the batch says, per student position, which teacher
position predicts the same boundary (`xtok/NAME/index` int32 [B, L]) and whether one does
(`xtok/NAME/mask` float32 [B, L]); the teacher's forward carries the map of its vocabulary
onto the student's (`VOCAB_MAP`, int32 [B, V_T]: each teacher id's first student token, -1
for none; `with_vocab_map`). A teacher without these keys shares the student's tokenizer and
rows: it aligns position for position and its vocabulary maps to itself.

- `xtok_kl`: at each kept student position with an aligned teacher, the teacher's next-token
  distribution (temperature T) mapped onto the student's vocabulary by prefix marginalisation
  (each teacher token's probability to the student token its text starts with; the mass of
  ids that map nowhere dropped and the rest renormalised), then `T^2 * KL(q || p_S)`. With
  several teachers q is, per position, the mixture over the teachers aligned there
  (`aggregation` 'mean' or 'weighted'). Identical tokenizers give `token_fkl` exactly.
- `uld`: Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): at aligned
  positions the L1 distance between the teacher's and the student's probability vectors
  each sorted in decreasing order (the shorter padded with zeros), i.e. the Wasserstein-1
  distance under a uniform cost between the two distributions up to a relabelling, so no
  vocabulary map is needed; plus, as the paper trains, the student's cross-entropy:
  `crossentropy_weight * CE + distillation_weight * W1` (both means over their positions).

Both are chunked along the student's positions (`chunking.token_mean`): a chunk gathers the
aligned teacher positions' inputs (its hidden states when its logits are lazy, then
`logits_of`), so neither model's [B, L, V] logits exist whole under `config.fused_logits`.
The mass that does not map is reported by the language-model task's metrics
(`xtok_unmapped/NAME`, `unmapped_mass`), with the share of kept positions aligned
(`xtok_aligned/NAME`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import NON_NEGATIVE
from distill_jax.losses.base import (
  TEACHER_WEIGHTS,
  TEMPERATURE,
  check_teacher,
  kl,
  masked_mean,
  register_loss,
)
from distill_jax.losses.chunking import chunked_per_token, fused_chunk_size

XTOK_PREFIX = "xtok/"  # Batch keys of cross-tokenizer teachers: xtok/NAME/{tokens,index,mask}.
VOCAB_MAP = "xtok/vocab_map"  # The feature a cross-tokenizer teacher's Outputs carry.
XTOK_AGGREGATIONS = ("mean", "weighted")


def batch_key(teacher: str, what: str) -> str:
  """The batch key of teacher `teacher`'s `what` ('tokens', 'index' or 'mask')."""
  return f"{XTOK_PREFIX}{teacher}/{what}"


def aligns_tokens(fn: Callable) -> bool:
  """Whether a registered loss reads teachers through the alignment (so a teacher with its own
  tokenizer may feed it); every other token term needs the student's tokenizer."""
  return bool(getattr(fn, "aligns_tokens", False))


def with_vocab_map(apply: Callable, vocab_map: np.ndarray) -> Callable:
  """A teacher forward `apply(variables, batch, train, rng=None) -> Outputs` whose outputs
  also carry `vocab_map` (int32 [V_T], broadcast over the batch's rows) as feature `VOCAB_MAP`."""
  table = np.asarray(vocab_map, np.int32)

  def wrapped(variables: Any, batch: Mapping[str, jax.Array], train: bool,
              rng: jax.Array | None = None) -> Outputs:
    out = apply(variables, batch, train, rng)
    rows = out.token_inputs().shape[0]
    mapped = jnp.broadcast_to(jnp.asarray(table), (rows, len(table)))
    return out._replace(features={**out.features, VOCAB_MAP: mapped})

  return wrapped


def alignment(name: str, teacher: Outputs, batch: Mapping[str, jax.Array], student: Outputs
              ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Teacher `name`'s (index int32 [B, L], mask float32 [B, L], vocabulary map int32 [V_T] or
  None for the identity): from the batch for a cross-tokenizer teacher, else position for
  position (the teacher must then share the student's vocabulary and rows)."""
  key = batch_key(name, "index")
  inputs = student.token_inputs()
  if key in batch:
    if VOCAB_MAP not in teacher.features:
      raise ValueError(f"Teacher {name!r} has cross-tokenizer rows ({key}) but its outputs "
                       f"carry no {VOCAB_MAP!r} (build its forward with with_vocab_map).")
    return batch[key], batch[batch_key(name, "mask")], teacher.features[VOCAB_MAP][0]
  if (teacher.vocab_size != student.vocab_size
      or teacher.token_inputs().shape[1] != inputs.shape[1]):
    raise ValueError(
        f"Teacher {name!r} predicts over {teacher.vocab_size} tokens at "
        f"{teacher.token_inputs().shape[1]} positions and the student over "
        f"{student.vocab_size} at {inputs.shape[1]}, but the batch has no {key!r}: give the "
        f"teacher its own tokenizer (config.teachers.{name}.tokenizer), so its rows are "
        "re-tokenised and aligned.")
  rows, length = inputs.shape[:2]
  index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
  return index, jnp.ones((rows, length), jnp.float32), None


def gather_positions(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, L_T, ...] at positions `index` [B, C] -> [B, C, ...]."""
  return jax.vmap(lambda rows, at: rows[at])(x, index)


def map_probs(probs: jax.Array, vocab_map: jax.Array | None, size: int
              ) -> tuple[jax.Array, jax.Array]:
  """Teacher probabilities [..., V_T] summed onto `size` student ids by `vocab_map` ([V_T];
  None: the identity) -> ([..., size], the mass of ids mapped to -1 [...])."""
  if vocab_map is None:
    return probs, jnp.zeros(probs.shape[:-1], probs.dtype)
  lead = probs.shape[:-1]
  segments = jnp.where(vocab_map >= 0, vocab_map, size)
  summed = jax.ops.segment_sum(probs.reshape(-1, probs.shape[-1]).T, segments,
                               num_segments=size + 1).T.reshape(*lead, size + 1)
  return summed[..., :size], summed[..., size]


def _teacher_weights(names: tuple[str, ...], aggregation: str, weights: tuple[float, ...]
                     ) -> dict[str, float]:
  if len(names) == 1:  # One teacher (or the one named): every aggregation is that teacher.
    return {names[0]: 1.0}
  if aggregation not in XTOK_AGGREGATIONS:
    raise ValueError(f"Cross-tokenizer terms take aggregation {list(XTOK_AGGREGATIONS)} "
                     f"(per-token weights need one vocabulary), got {aggregation!r}.")
  if aggregation == "mean":
    return {n: 1.0 / len(names) for n in names}
  if len(weights) != len(names):
    raise ValueError(f"aggregation 'weighted' needs one weight per teacher ({len(names)}: "
                     f"{list(names)}), got {list(weights)}.")
  total = float(sum(weights))
  return {n: float(w) / total for n, w in zip(names, weights, strict=True)}


def _aligned_terms(student: Outputs, teachers: Mapping[str, Outputs],
                   batch: Mapping[str, jax.Array], teacher: str | None, chunk_size: int,
                   per_token: Callable[..., dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Per-token values [B, L] of `per_token(student_logits [B, C, V], targets [B, C],
  {name: (teacher logits [B, C, V_T], aligned [B, C], vocab map)})`, chunked along the
  student's positions; each chunk gathers the aligned teacher positions' inputs."""
  check_teacher(teachers, teacher)
  used = {teacher: teachers[teacher]} if teacher is not None else dict(teachers)
  aligned = {n: alignment(n, t, batch, student) for n, t in used.items()}
  arrays = {"student": student.token_inputs(), "targets": batch["targets"],
            "index": {n: a[0] for n, a in aligned.items()},
            "aligned": {n: a[1] for n, a in aligned.items()}}

  def chunk_values(chunk):
    views = {}
    for n, t in used.items():
      at = chunk["aligned"][n]
      inputs = gather_positions(jax.lax.stop_gradient(t.token_inputs()), chunk["index"][n])
      logits = jax.lax.stop_gradient(t.logits_of(inputs)).astype(jnp.float32)
      views[n] = (jnp.where(at[..., None] > 0, logits, 0.0), at, aligned[n][2])
    return per_token(student.logits_of(chunk["student"]), chunk["targets"], views)

  return chunked_per_token(chunk_values, arrays,
                           fused_chunk_size(chunk_size, student, used), batch.get("mask"))


def _any_aligned(batch: Mapping[str, jax.Array], names: list[str], shape: tuple[int, ...]
                 ) -> jax.Array:
  """[B, L]: 1 where at least one of `names` has an aligned position."""
  masks = [batch[batch_key(n, "mask")] if batch_key(n, "mask") in batch else jnp.ones(shape)
           for n in names]
  return (sum(masks) > 0).astype(jnp.float32)


def _kept(batch: Mapping[str, jax.Array], shape: tuple[int, ...]) -> jax.Array:
  mask = batch.get("mask")
  return jnp.ones(shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


@register_loss("xtok_kl", fused_logits=True,
               ranges={"temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS})
def xtok_kl(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
            *, temperature: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
            aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Forward KL from teachers of any tokenizer, `T^2 * KL(q || p_S)` where q is the aligned
  teachers' next-token distribution mapped onto the student's vocabulary (module docstring);
  mean over the kept student positions that have an aligned teacher position."""
  names = [teacher] if teacher is not None else list(teachers)
  weights = _teacher_weights(tuple(names), aggregation, teacher_weights)
  size, scale = student.vocab_size, temperature**2

  def per_token(logits, targets, views):
    del targets
    num, den = 0.0, 0.0
    for n, (t_logits, at, vocab_map) in views.items():
      mapped, lost = map_probs(jax.nn.softmax(t_logits / temperature, -1), vocab_map, size)
      kept_mass = jnp.maximum(1.0 - lost, 1e-30) if vocab_map is not None else 1.0
      num = num + (weights[n] * at)[..., None] * mapped / jnp.asarray(kept_mass)[..., None]
      den = den + weights[n] * at
    target = num / jnp.maximum(den, 1e-30)[..., None]
    log_target = jnp.where(target > 0, jnp.log(jnp.where(target > 0, target, 1.0)), -jnp.inf)
    student_logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
    return {"kl": scale * kl(jax.lax.stop_gradient(log_target), student_logp)}

  values = _aligned_terms(student, teachers, batch, teacher, chunk_size, per_token)
  shape = batch["targets"].shape
  return masked_mean(values["kl"], _kept(batch, shape) * _any_aligned(batch, names, shape))


def sorted_l1(p: jax.Array, q: jax.Array) -> jax.Array:
  """ULD's distance: `sum_i |sort(p)_i - sort(q)_i|` over the last axis, both sorted in
  decreasing order, the shorter padded with zeros ([..., V_p], [..., V_q] -> [...])."""
  p, q = -jnp.sort(-p, axis=-1), -jnp.sort(-q, axis=-1)
  size = max(p.shape[-1], q.shape[-1])
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
  return jnp.sum(jnp.abs(pad(p) - pad(q)), axis=-1)


@register_loss("uld", fused_logits=True, ranges={
  "temperature": TEMPERATURE, "teacher_weights": TEACHER_WEIGHTS,
  "crossentropy_weight": (NON_NEGATIVE, "the weight of the student's cross-entropy"),
  "distillation_weight": (NON_NEGATIVE,
                          "the weight of the sorted-probability distance (lambda)")})
def uld(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
        *, temperature: float = 1.0, crossentropy_weight: float = 1.0,
        distillation_weight: float = 1.0, chunk_size: int = 0, teacher: str | None = None,
        aggregation: str = "mean", teacher_weights: tuple[float, ...] = ()) -> jax.Array:
  """Universal Logit Distillation (Boizard et al. 2024): `crossentropy_weight * CE +
  distillation_weight * W1`, CE the student's next-token cross-entropy (mean over the kept
  positions) and W1 `sorted_l1` between the teacher's and the student's probabilities at
  `temperature` (both; the paper's is 1), mean over the kept positions with an aligned teacher
  (several teachers: their distances averaged per position over those aligned there)."""
  names = [teacher] if teacher is not None else list(teachers)
  weights = _teacher_weights(tuple(names), aggregation, teacher_weights)

  def per_token(logits, targets, views):
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    probs = jax.nn.softmax(logits / temperature, -1)
    num, den = 0.0, 0.0
    for n, (t_logits, at, _) in views.items():
      distance = sorted_l1(jax.nn.softmax(t_logits / temperature, -1), probs)
      num = num + weights[n] * at * distance
      den = den + weights[n] * at
    return {"ce": ce, "w1": num / jnp.maximum(den, 1e-30)}

  values = _aligned_terms(student, teachers, batch, teacher, chunk_size, per_token)
  shape = batch["targets"].shape
  kept = _kept(batch, shape)
  return (crossentropy_weight * masked_mean(values["ce"], kept) + distillation_weight
          * masked_mean(values["w1"], kept * _any_aligned(batch, names, shape)))


xtok_kl.aligns_tokens = True
uld.aligns_tokens = True


def unmapped_mass(name: str, teacher: Outputs, batch: Mapping[str, jax.Array],
                  student: Outputs) -> tuple[jax.Array, jax.Array]:
  """Per student position [B, L]: the aligned teacher's probability (T = 1) on ids that map to
  no student token, and the alignment mask (what a metric averages it over)."""
  index, aligned, vocab_map = alignment(name, teacher, batch, student)
  if vocab_map is None:
    return jnp.zeros(index.shape, jnp.float32), aligned
  lost = vocab_map < 0

  def chunk_values(chunk):
    logits = teacher.logits_of(gather_positions(teacher.token_inputs(), chunk["index"]))
    return jnp.sum(jnp.where(lost, jax.nn.softmax(logits.astype(jnp.float32), -1), 0.0), -1)

  values = chunked_per_token(chunk_values, {"index": index}, fused_chunk_size(0, teacher))
  return values, aligned
