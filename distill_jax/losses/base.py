"""The loss registry and the helpers that loss terms share.

What more than one loss module needs lives here, public and documented: the registry
(`register_loss`, `loss_hparams`, `loss_ranges`), teachers' outputs and their aggregation
(`teacher_outputs`, `teacher_log_probs`), masks (`masked_mean`, `zero_dropped`), feature pairs
and their shape checks (`feature_pairs`, `named_feature_pairs`, `match_spatial`,
`check_same_batch`, `check_vocab`) and array math (`kl`, `l2_normalize`, `avg_pool_to`,
`at_least_float32`, `precise_einsum`, `per_example_mean`). A helper that one module uses stays
there, private.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Outputs
from distill_jax.common.registry import Registry
from distill_jax.common.rules import NON_NEGATIVE, POSITIVE, Rule

LOSSES = Registry("loss")


def register_loss(name: str, *, uses_teachers: bool = True,
                  ranges: Mapping[str, Rule] | None = None,
                  fused_logits: bool = False) -> Callable[[Callable], Callable]:
  """Decorator: registers a loss term under `name`.

  `uses_teachers=False` marks a term that needs no teacher (e.g. cross-entropy), so a config
  that distills with no teacher is refused before anything is built. `ranges` maps a
  hyper-parameter of the loss to its rule `(Range, meaning)` (`distill_jax.common.rules`), e.g.
  `{'beta': (Range(0, 1), 'the mixture weight')}`: config validation refuses a value outside
  it (every element of a sequence), naming the term, the setting and the range, before
  anything is built. A range for a setting the loss does not take is refused here.
  `fused_logits=True` marks a term that reads the logits only through `Outputs.logits_of`
  on chunks of `Outputs.token_inputs()`, so it works with lazy logits (`config.fused_logits`);
  a run with lazy logits refuses every other term.
  """

  def decorator(fn: Callable) -> Callable:
    declared = dict(ranges or {})
    unknown = sorted(set(declared) - set(loss_hparams(fn)))
    if unknown:
      raise ValueError(f"register_loss({name!r}) declares ranges for {unknown}, which the loss "
                       f"does not take; its hyper-parameters are {sorted(loss_hparams(fn))}.")
    fn.uses_teachers = uses_teachers
    fn.fused_logits = fused_logits
    fn.setting_ranges = declared
    return LOSSES.register(name)(fn)

  return decorator


@dataclasses.dataclass(frozen=True)
class SideDataNeed:
  """A per-example array a loss term reads from the batch beyond the task's own keys, which
  the data layer builds once before training and adds to every train batch
  (`data.build_side_data`; the key must be declared in `data.batch_keys`).

  A loss declares what it needs with a method `side_data(self) -> tuple[SideDataNeed, ...]` (CRD:
  `contrast_idx` with negatives='other_class'); the run asks every term and builds each key
  once, so terms that read one key must declare it alike.

  Attributes:
    key: the batch key, e.g. 'contrast_idx'.
    builder: the name of the data layer's builder (`data.SIDE_DATA_BUILDERS`).
    settings: the builder's keyword arguments beyond the data, as sorted (name, value) pairs.
    shape: one example's array shape (without the batch axis), for the example batch.
    dtype: its dtype's name.
  """

  key: str
  builder: str
  settings: tuple[tuple[str, Any], ...]
  shape: tuple[int, ...]
  dtype: str = "int32"


def loss_ranges(fn: Any) -> dict[str, Rule]:
  """The ranges a registered loss declared (`register_loss(..., ranges=...)`); {} for none."""
  return dict(getattr(fn, "setting_ranges", {}))


# The rules of settings that several losses take with one meaning.
TEMPERATURE: Rule = (POSITIVE, "the softmax temperature")
TEACHER_WEIGHTS: Rule = (NON_NEGATIVE, "each teacher's weight")
EPS: Rule = (POSITIVE, "the numerical floor")


# Settings the objective fills in from the run, never from the config: the number of training
# examples (memory banks). Terms need no device axis: they always see the global batch.
CONTEXT_HPARAMS = ("num_examples",)
# Hyper-parameters that name features: the objective taps exactly these layers.
STUDENT_LAYER_HPARAMS = ("student_layer", "student_layers")
TEACHER_LAYER_HPARAMS = ("teacher_layer", "teacher_layers")
REQUIRED = inspect.Parameter.empty


def is_module_loss(fn: Any) -> bool:
  """True for a loss term that is a Flax module (it has trainable parameters or state)."""
  return isinstance(fn, type) and issubclass(fn, nn.Module)


def loss_hparams(fn: Any) -> dict[str, Any]:
  """A loss term's hyper-parameters and their defaults (`REQUIRED` when there is none).

  For a function: its keyword-only arguments. For a Flax module: its dataclass fields. The
  run-context settings (`CONTEXT_HPARAMS`) are not hyper-parameters and are left out.
  """
  if is_module_loss(fn):
    params = {
        f.name: (f.default if f.default is not dataclasses.MISSING else REQUIRED)
        for f in dataclasses.fields(fn) if f.init and f.name not in ("parent", "name")}
  else:
    params = {name: p.default for name, p in inspect.signature(fn).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
  return {k: v for k, v in params.items() if k not in CONTEXT_HPARAMS}


def layer_names(hparams: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, ...]:
  """The feature names that `hparams` ask for under `keys` (a name or a sequence of names)."""
  names: list[str] = []
  for key in keys:
    value = hparams.get(key)
    if value is None:
      continue
    names.extend([value] if isinstance(value, str) else list(value))
  return tuple(names)


def check_teacher(teachers: Mapping[str, Outputs], teacher: str | None) -> None:
  """Raises if there is no teacher at all, or if `teacher` names none of them."""
  if not teachers:
    raise ValueError("This loss term needs a teacher, but the config names none "
                     "(config.teachers is empty).")
  if teacher is not None and teacher not in teachers:
    raise ValueError(f"Loss names teacher {teacher!r}; the config's teachers are "
                     f"{sorted(teachers)}.")


def teacher_outputs(teachers: Mapping[str, Outputs], teacher: str | None = None) -> Outputs:
  """The named teacher's outputs; with `teacher=None`, the only teacher's."""
  check_teacher(teachers, teacher)
  if teacher is not None:
    return teachers[teacher]
  if len(teachers) != 1:
    raise ValueError(f"This loss compares with one teacher, but there are {len(teachers)} "
                     f"({sorted(teachers)}): set the term's `teacher`.")
  return next(iter(teachers.values()))


def feature_pairs(student: Outputs, teachers: Mapping[str, Outputs],
                  student_layers: str | Sequence[str], teacher_layers: str | Sequence[str],
                  teacher: str | None = None) -> list[tuple[jax.Array, jax.Array]]:
  """[(student feature, teacher feature)] for the paired layer names, in order."""
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  if len(s_names) != len(t_names):
    raise ValueError(f"student layers {s_names} and teacher layers {t_names} must pair up "
                     "one to one.")
  target = teacher_outputs(teachers, teacher)
  return [(student.features[s], jax.lax.stop_gradient(target.features[t]))
          for s, t in zip(s_names, t_names, strict=True)]


def shape_mismatch(term: str, s_layer: str, s_shape: Sequence[int], t_layer: str,
                   t_shape: Sequence[int], fix: str) -> ValueError:
  """The error for features that cannot be compared: names both layers, shapes and a fix."""
  return ValueError(
      f"Loss term {term!r} compares student layer {s_layer!r} of shape {tuple(s_shape)} with "
      f"teacher layer {t_layer!r} of shape {tuple(t_shape)}, which do not match. {fix}")


def named_feature_pairs(term: str, student: Outputs, teachers: Mapping[str, Outputs],
                        student_layers: str | Sequence[str], teacher_layers: str | Sequence[str],
                        teacher: str | None) -> list[tuple[str, jax.Array, str, jax.Array]]:
  """[(student layer, its feature, teacher layer, its feature)] for the paired layer names,
  the teacher's feature under stop_gradient (`feature_pairs`). Refuses a pair whose batch
  sizes or ranks differ, naming `term`, both layers and their shapes."""
  s_names, t_names = layer_tuple(student_layers), layer_tuple(teacher_layers)
  pairs = feature_pairs(student, teachers, s_names, t_names, teacher)
  out = []
  for (s, t), s_name, t_name in zip(pairs, s_names, t_names, strict=True):
    if s.shape[0] != t.shape[0] or s.ndim != t.ndim:
      raise shape_mismatch(term, s_name, s.shape, t_name, t.shape,
                           "Compare features of the same batch and rank ([B, H, W, C] with "
                           "[B, H, W, C], or [B, D] with [B, D]).")
    out.append((s_name, s, t_name, t))
  return out


def check_same_batch(term: str, s_name: str, s: jax.Array, t_name: str, t: jax.Array) -> None:
  """Refuses a student feature `s` and a teacher feature `t` of different batch sizes (their
  leading axes), naming `term`, both layers and their shapes."""
  if s.shape[:1] != t.shape[:1]:
    raise shape_mismatch(term, s_name, s.shape, t_name, t.shape,
                         fix="Student and teacher features must come from the same batch "
                             "(equal leading batch axis).")


def match_spatial(term: str, s_name: str, s: jax.Array, t_name: str,
                  t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two [B, H, W, C] maps at one spatial size: the larger average-pooled to the smaller's
  (`avg_pool_to`; the CRD code's VID and FT). Equal sizes pass as they are; sizes that are not
  whole multiples of each other (or other ranks of unequal size) are refused, naming `term`,
  both layers and their shapes."""
  if s.shape[1:-1] == t.shape[1:-1]:
    return s, t
  if s.ndim == 4:
    (sh, sw), (th, tw) = s.shape[1:3], t.shape[1:3]
    if sh >= th and sw >= tw and sh % th == 0 and sw % tw == 0:
      return avg_pool_to(s, (th, tw)), t
    if th >= sh and tw >= sw and th % sh == 0 and tw % sw == 0:
      return s, avg_pool_to(t, (sh, sw))
  raise shape_mismatch(
      term, s_name, s.shape, t_name, t.shape,
      "Spatial sizes must be equal, or one a whole multiple of the other (the larger map is "
      "then average-pooled): pick student and teacher layers of compatible resolution.")


def check_vocab(student: Outputs, teachers: Mapping[str, Outputs]) -> None:
  """Raises unless every teacher's vocabulary (last axis of its logits) is the student's: the
  token-level divergences compare distributions over one vocabulary."""
  size = student.vocab_size
  for name, t in teachers.items():
    if (t.logits is not None or t.lazy) and t.vocab_size != size:
      raise ValueError(
          f"Teacher {name!r} predicts over a vocabulary of {t.vocab_size} tokens and the "
          f"student over {size}: token-level distillation needs one vocabulary (the same "
          "tokenizer for both models).")


def example_weights(batch: Mapping[str, jax.Array], logits: jax.Array) -> jax.Array:
  """Per-example weights [B]: the batch's `mask` (1 real, 0 padding) or all ones."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.ones(logits.shape[:1], logits.dtype)
  return mask.astype(logits.dtype)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of per-example `values` [B] under `weights` [B]; 0 for an all-padding batch.

  Values of weight 0 are dropped with a `where` (not multiplied by 0), so a NaN or inf there
  cannot poison the value. Their gradient is another matter: see `zero_dropped`.
  """
  return masked_sum(values, weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _mask_like(mask: jax.Array, x: jax.Array) -> jax.Array:
  """`mask` ([B] or [B, L]) with trailing unit axes, to broadcast over `x` [B, ..., *]."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def zero_dropped(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`x` [B, ...] with every entry at a dropped position (`mask` 0) replaced by 0.

  `mask` ([B] per example or [B, L] per token, or any shape that broadcasts against the
  leading axes of `x` once trailing unit axes are added: [B, 1, L] for [B, H, L, L]) says
  which positions count; None keeps all. Integer arrays (token ids) are returned as they are.

  Why on the input: a loss that drops positions after computing them, `where(mask, f(x), 0)`,
  has the right value but a NaN gradient when `f(x)` is NaN or inf there (the gradient of the
  dropped branch is 0 * NaN), e.g. the logits a model gives at padding. Zeroing `x` first makes
  every value computed from it finite, and the gradient with respect to the dropped entries is
  exactly 0. One elementwise `where`, which XLA fuses into the first op that reads `x`.
  """
  if mask is None or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return jnp.where(_mask_like(mask, x) > 0, x, jnp.zeros((), x.dtype))


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of `values` [B] or [B, L] times `mask` (same leading shape) over the kept positions
  (mask > 0); a NaN or inf at a dropped position is dropped, not multiplied by 0 (NaN)."""
  weights = _mask_like(mask.astype(jnp.float32), values)
  return jnp.sum(jnp.where(weights > 0, weights * values, 0.0))


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of per-example [B] or per-token [B, L] `values` over the kept positions.

  `mask` ([B] or [B, L]; 1 kept, 0 dropped; None keeps all) is broadcast over the trailing axes
  of `values`, so for [B, L] values the result is the sum over kept tokens divided by their
  number (not a mean of per-sequence means), and for [B] it is `weighted_mean`. Dropped
  positions are replaced by 0 (not multiplied by it), so a padding value that is NaN or inf
  cannot poison the mean; an all-dropped batch gives 0. The gradient through a NaN value is
  still NaN: a loss zeroes its inputs at dropped positions first (`zero_dropped`).
  """
  if mask is None:
    weights = jnp.ones(values.shape, jnp.float32)
  else:
    weights = jnp.broadcast_to(_mask_like(mask.astype(jnp.float32), values), values.shape)
  return weighted_mean(values.reshape(-1), weights.reshape(-1))


def dropped_outputs(outputs: Mapping[str, Outputs], mask: jax.Array | None
                    ) -> dict[str, Outputs]:
  """Each model's `Outputs` with its logits zeroed at the dropped positions (`zero_dropped`)."""
  return {name: o._replace(logits=None if o.logits is None else zero_dropped(o.logits, mask))
          for name, o in outputs.items()}


AGGREGATIONS = ("mean", "weighted", "entropy", "true_label")


def teacher_weights(teachers: Mapping[str, Outputs], aggregation: str = "mean",
                    weights: Sequence[float] = (), labels: jax.Array | None = None) -> jax.Array:
  """How much each teacher counts for each example: [num_teachers, B], summing to 1 over teachers.

  - 'mean': equal weights.
  - 'weighted': the fixed `weights` (one per teacher, in config order), normalised.
  - 'entropy': per example, softmax over teachers of minus each teacher's predictive entropy
    (at T = 1): confident teachers count more.
  - 'true_label': per example, each teacher's probability of the true label (at T = 1) over
    their sum, i.e. softmax of minus their cross-entropies (CA-MKD's confidence weighting).
  """
  logps = jnp.stack([jax.nn.log_softmax(t.logits, axis=-1) for t in teachers.values()])
  n, batch = logps.shape[0], logps.shape[1]
  if aggregation == "mean":
    return jnp.full((n, batch), 1.0 / n)
  if aggregation == "weighted":
    if len(weights) != n:
      raise ValueError(f"aggregation 'weighted' needs one weight per teacher ({n}: "
                       f"{list(teachers)}), got {list(weights)}.")
    w = jnp.asarray(weights, jnp.float32)
    return jnp.broadcast_to((w / jnp.sum(w))[:, None], (n, batch))
  if aggregation == "entropy":
    entropy = -jnp.sum(jnp.exp(logps) * logps, axis=-1)
    return jax.nn.softmax(-entropy, axis=0)
  if aggregation == "true_label":
    if labels is None:
      raise ValueError("aggregation 'true_label' needs the batch's labels.")
    log_p_true = jnp.take_along_axis(logps, labels[None, :, None].astype(jnp.int32), -1)[..., 0]
    return jax.nn.softmax(log_p_true, axis=0)
  raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}.")


def teacher_log_probs(teachers: Mapping[str, Outputs], temperature: float,
                      teacher: str | None = None, *, aggregation: str = "mean",
                      weights: Sequence[float] = (), labels: jax.Array | None = None
                      ) -> jax.Array:
  """Log-probabilities [B, K] of the named teacher, or of the teachers' aggregate.

  With one teacher and `teacher=None` this is that teacher's log-softmax at `temperature`
  (every aggregation reduces to it). With several, the target is the mixture
  `sum_i w_i(x) softmax(t_i / T)` with the weights of `teacher_weights` (default: the plain
  average, the usual multi-teacher KD target); name one teacher to distill from it alone.
  """
  check_teacher(teachers, teacher)
  if teacher is not None:
    return jax.nn.log_softmax(teachers[teacher].logits / temperature, axis=-1)
  logps = jnp.stack([jax.nn.log_softmax(t.logits / temperature, axis=-1)
                     for t in teachers.values()])
  w = teacher_weights(teachers, aggregation, weights, labels)
  return jax.nn.logsumexp(logps, axis=0, b=w.reshape(w.shape + (1,) * (logps.ndim - 2)))


# ---------------------------------------------------------------------- shared array helpers

# The floor of a norm before dividing by it, as PyTorch's `F.normalize` (x / max(||x||, eps)),
# which the reference implementations of AT, SP, RKD (angles), NST, VID/AB and CRD use.
NORM_EPS = 1e-12


def kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """`KL(p || q) = sum_k p_k (log p_k - log q_k)` over the last axis, from log-probabilities.

  Shapes [..., K] -> [...]. Terms with `p_k == 0` contribute 0 (the limit of `p log p`), and
  the guard sits on the difference, so neither the value nor the gradient is NaN there even
  when `log p_k` or `log q_k` is -inf.
  """
  p = jnp.exp(log_p)
  keep = p > 0
  diff = jnp.where(keep, log_p - jnp.where(keep, log_q, 0.0), 0.0)
  return jnp.sum(p * diff, axis=-1)


def at_least_float32(x: jax.Array) -> jax.Array:
  """`x` in at least float32 (bf16/fp16 features are promoted, float64 stays)."""
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def precise_einsum(spec: str, *operands: jax.Array) -> jax.Array:
  """`jnp.einsum` at `Precision.HIGHEST`: no bf16/TF32 passes on accelerators, for the
  feature losses' contractions (Gram, similarity and kernel matrices)."""
  return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST)


def per_example_mean(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def layer_tuple(layers: str | Sequence[str]) -> tuple[str, ...]:
  """A term's layer setting (one name or several) as a tuple of names."""
  return (layers,) if isinstance(layers, str) else tuple(layers)


def safe_norm(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """`max(||x||_2, eps)` over `axis` (kept), computed as `sqrt(max(sum x^2, eps^2))`.

  Same value as clamping the norm, but the gradient is finite (zero) at x = 0, where the
  gradient of a plain norm is 0/0.
  """
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """`x / max(||x||_2, eps)` along `axis` (PyTorch's `F.normalize`); zero vectors stay zero."""
  return x / safe_norm(x, axis, eps)


def avg_pool_to(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
  """Average-pools [B, *S, C] to [B, *spatial, C]; each S_i must be a multiple of spatial_i.

  Equal to adaptive average pooling (PyTorch's `adaptive_avg_pool2d`, as in the CRD code's
  VID, FT and NST) when the sizes divide: non-overlapping windows of size S_i / spatial_i.
  """
  size = tuple(x.shape[1:-1])
  spatial = tuple(spatial)
  if size == spatial:
    return x
  if len(size) != len(spatial) or any(s % o for s, o in zip(size, spatial, strict=True)):
    raise ValueError(f"cannot average-pool spatial size {size} to {spatial}: the ratio must "
                     "be an integer on every axis.")
  shape = [x.shape[0]]
  for s, o in zip(size, spatial, strict=True):
    shape += [o, s // o]
  x = x.reshape(*shape, x.shape[-1])
  return jnp.mean(x, axis=tuple(range(2, 2 * len(size) + 1, 2)))
