"""On-policy distillation (GKD): the student continues each row's prompt and the teachers
score its own text (`OnPolicy`, built from `config.on_policy` by `on_policy_from_config`).

A teacher with its own tokenizer (`teachers.NAME.tokenizer`) scores the samples in its own
tokens, as TRL's GOLD trainer does: `Retokenize` rebuilds its rows and alignment
(`data/text/cross_tokenizer.py`, host code) from the sampled rows inside the compiled step
(`jax.pure_callback`), so the cross-tokenizer terms compare the student's own text.

Teacher-mixed sampling (MiniLLM): a loss term may need its samples drawn from the per-step
mixture α p + (1 - α) q_θ of a teacher p and the student q_θ (a registered loss with a
`rollout_mixture(hparams, teacher_names) -> (teacher, α)` attribute, `losses.minillm`;
`rollout_mixture` below collects them). The rollout then decodes with `TeacherMix`: both
models advance their own key/value caches on the same tokens and the next token is drawn from
the mixture, so `generate.sample` runs unchanged; the teacher's variables come from the train
step (its `teacher_vars` argument), like the forwards'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data.text import cross_tokenizer
from distill_jax.losses.cross_tokenizer import batch_key
from distill_jax.models.tokenizers import get_tokenizer
from distill_jax.tasks.language_model.generate import check_settings, sample

ON_POLICY_SALT = 0x6B64  # fold_in(state.rng, this): the on-policy keys, apart from the others.


@dataclasses.dataclass(frozen=True)
class Retokenize:
  """Teacher `teacher`'s rows (`xtok/NAME/tokens`, `index`, `mask`) rebuilt from a batch's
  student rows: the data layer's `cross_tokenizer.teacher_rows` on the host, called from the
  compiled step (`jax.pure_callback`; per device's rows under pmap). Hashable (static)."""

  teacher: str
  student_tokenizer: str
  teacher_tokenizer: str
  length: int  # The teacher's row length.

  def host(self, tokens: np.ndarray, targets: np.ndarray, mask: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = cross_tokenizer.teacher_rows(
        np.asarray(tokens), np.asarray(targets), np.asarray(mask),
        get_tokenizer(self.student_tokenizer), get_tokenizer(self.teacher_tokenizer),
        self.length)
    return rows.tokens, rows.index, rows.mask

  def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    rows, length = batch["tokens"].shape
    shapes = (jax.ShapeDtypeStruct((rows, self.length), jnp.int32),
              jax.ShapeDtypeStruct((rows, length), jnp.int32),
              jax.ShapeDtypeStruct((rows, length), jnp.float32))
    tokens, index, mask = jax.pure_callback(
        self.host, shapes, batch["tokens"], batch["targets"], batch["mask"],
        vmap_method="sequential")
    return {batch_key(self.teacher, "tokens"): tokens, batch_key(self.teacher, "index"): index,
            batch_key(self.teacher, "mask"): mask}


@dataclasses.dataclass(frozen=True)
class TeacherMix:
  """A decoder over the mixture p̃ = α p + (1 - α) q_θ of a teacher p and the student q_θ, in
  the interface `generate.sample` decodes with (`init_cache`, `apply(variables, tokens,
  cache=)`): `variables` is (the student's, the teacher's), the cache is the pair of their
  caches, and the "logits" it returns are log p̃ [B, T, V] (so at temperature 1 without
  truncation `sample` draws exactly from p̃). Both models need the same vocabulary.
  """

  student: Any
  teacher: Any
  alpha: float

  def init_cache(self, batch: int, length: int, valid: jax.Array | None = None) -> Any:
    return (self.student.init_cache(batch, length, valid),
            self.teacher.init_cache(batch, length, valid))

  def apply(self, variables: Any, tokens: jax.Array, *, cache: Any) -> tuple[jax.Array, Any]:
    student_vars, teacher_vars = variables
    q, student_cache = self.student.apply(student_vars, tokens, cache=cache[0])
    p, teacher_cache = self.teacher.apply(teacher_vars, tokens, cache=cache[1])
    logq = jax.nn.log_softmax(q.astype(jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(p.astype(jnp.float32), axis=-1)
    mix = jnp.logaddexp(math.log(self.alpha) + logp, math.log1p(-self.alpha) + logq)
    return mix, (student_cache, teacher_cache)


def rollout_mixture(terms: Sequence[Any], teacher_names: Sequence[str]
                    ) -> tuple[str | None, float]:
  """(teacher, α) of the mixture the objective's `terms` (`losses.objective.Term`) need their
  samples from: (None, 0.0), the student alone, when no term asks (`rollout_mixture` on its
  loss); raises ValueError when two terms ask for different ones."""
  wanted = {}
  for term in terms:
    ask = getattr(term.fn, "rollout_mixture", None)
    if ask is not None:
      wanted[term.name] = ask(term.hparams, list(teacher_names))
  mixes = set(wanted.values())
  if len(mixes) > 1:
    raise ValueError(f"The loss terms {sorted(wanted)} need samples from different mixtures "
                     f"(teacher, teacher_mix) {wanted}; one rollout draws one: make them agree.")
  teacher, alpha = mixes.pop() if mixes else (None, 0.0)
  return (teacher, alpha) if alpha > 0 else (None, 0.0)


@dataclasses.dataclass(frozen=True)
class OnPolicy:
  """On-policy distillation (GKD, Agarwal et al., ICLR 2024): with probability `fraction` per
  batch, each row's first `prompt_len` tokens are continued by `max_new_tokens` tokens that
  the student samples (`temperature`, `top_k`), and the batch becomes those sequences, with
  the loss mask on the generated tokens only; the teachers then score the student's own text.

  With `mix` = α > 0 (MiniLLM's teacher-mixed sampling, asked for by a loss term:
  `rollout_mixture`) the tokens are drawn from α p + (1 - α) q_θ instead, p the teacher
  `mix_teacher` (module `teacher_model`, variables from the step's `teacher_vars`), through
  `TeacherMix`.

  Built from `config.on_policy` (`on_policy_from_config`); `model` is the student's module.
  Static (a hashable argument of the compiled step).
  """

  model: Any
  fraction: float
  prompt_len: int
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  eos_id: int | None = None
  pad_id: int = 0
  # The teachers with their own tokenizer: their rows rebuilt from the samples.
  retokenize: tuple[Retokenize, ...] = ()
  mix_teacher: str | None = None  # With `mix` = α > 0: sample from α p + (1 - α) q_θ, p the
  mix: float = 0.0  # teacher of this name, whose module is `teacher_model` (`TeacherMix`).
  teacher_model: Any = None

  @staticmethod
  def keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the key of the per-batch coin, the sampling key) the step draws from its RNG."""
    coin, draw = jax.random.split(jax.random.fold_in(rng, ON_POLICY_SALT))
    return coin, draw

  def rollout(self, variables: Any, batch: Mapping[str, jax.Array], key: jax.Array,
              teacher_vars: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
    """The batch with each row replaced by its prompt and the student's sample (no gradient;
    with `mix`, a sample of the teacher-student mixture, the teacher's variables from
    `teacher_vars`).

    tokens [B, L]: the first `prompt_len` tokens, the N sampled ones, then `pad_id`; targets:
    the next token; mask: 1 where the target is a generated token (up to and including EOS);
    document: the prompt's last document on the kept generated tokens, -1 after; each
    cross-tokenizer teacher's rows rebuilt from these (`retokenize`). Every other key is
    passed through as it is, so it must not describe the original tokens: the step refuses
    those that would (`data.batch_keys`, `Task.rollout_keys`).
    """
    model, variables = self.model, jax.lax.stop_gradient(variables)
    if self.mix > 0:
      if teacher_vars is None or self.mix_teacher not in teacher_vars:
        raise ValueError(f"Teacher-mixed sampling (teacher_mix={self.mix}) needs teacher "
                         f"{self.mix_teacher!r}'s variables: pass teacher_vars.")
      model = TeacherMix(self.model, self.teacher_model, self.mix)
      variables = (variables, jax.lax.stop_gradient(teacher_vars[self.mix_teacher]))
    tokens, mask = sample(model, variables, batch["tokens"][:, :self.prompt_len],
                          max_new_tokens=self.max_new_tokens, rng=key,
                          temperature=self.temperature, top_k=self.top_k, eos_id=self.eos_id,
                          pad_id=self.pad_id)
    tokens, mask = jax.lax.stop_gradient((tokens, mask))
    batch_size, length = batch["tokens"].shape
    rest = length - tokens.shape[1]
    tokens = jnp.pad(tokens, ((0, 0), (0, rest)), constant_values=self.pad_id)
    mask = jnp.pad(mask, ((0, 0), (0, rest)))
    out = dict(batch)
    out["tokens"] = tokens.astype(batch["tokens"].dtype)
    out["targets"] = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)),
                             constant_values=self.pad_id).astype(batch["targets"].dtype)
    out["mask"] = jnp.pad(mask[:, 1:], ((0, 0), (0, 1))).astype(batch["mask"].dtype)
    if "document" in batch:
      last = batch["document"][:, self.prompt_len - 1:self.prompt_len]
      generated = jnp.arange(length)[None, :] >= self.prompt_len
      out["document"] = jnp.where(generated, jnp.where(mask > 0, last, -1),
                                  batch["document"]).astype(batch["document"].dtype)
    for retokenize in self.retokenize:
      out.update(retokenize(out))
    return out

  def __call__(self, variables: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
               axis_name: str | None = None, teacher_vars: Mapping[str, Any] | None = None
               ) -> dict[str, jax.Array]:
    """With probability `fraction` (a coin from `rng`, inside the compiled step) the
    `rollout` of the batch, else the batch as it is.

    Under pmap (`axis_name`) every device tosses the same coin but samples with its own key
    (the device index folded in): the same key on each device's rows would draw the same
    random numbers for row i of every device. So pmap's samples are not one device's (jit on
    a mesh samples the global batch and gives exactly the single-device samples).
    """
    coin, draw = self.keys(rng)
    if axis_name is not None:
      draw = jax.random.fold_in(draw, jax.lax.axis_index(axis_name))
    use = jax.random.uniform(coin) < self.fraction
    batch = dict(batch)
    return jax.lax.cond(use, lambda b: self.rollout(variables, b, draw, teacher_vars),
                        lambda b: b, batch)


def on_policy_from_config(settings: Any, model: Any, tokenizer: Any, seq_len: int,
                          retokenize: tuple[Retokenize, ...] = (),
                          mixture: tuple[str | None, float] = (None, 0.0),
                          teacher_model: Any = None) -> OnPolicy | None:
  """The `OnPolicy` of `config.on_policy` (None when absent or `fraction` is 0), rebuilding
  the rows of the cross-tokenizer teachers of `retokenize`, sampling from `mixture` = (teacher,
  α) (`rollout_mixture`; α = 0: the student alone) with the teacher's module `teacher_model`;
  raises ValueError naming the setting that does not fit."""
  if settings is None or float(settings.get("fraction", 0.0)) == 0.0:
    return None
  fraction = float(settings.fraction)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"config.on_policy.fraction must be in [0, 1], got {fraction}.")
  prompt_len, new = int(settings.prompt_len), int(settings.max_new_tokens)
  if prompt_len < 1 or new < 1:
    raise ValueError(f"config.on_policy.prompt_len ({prompt_len}) and max_new_tokens ({new}) "
                     "must be positive.")
  if prompt_len + new > seq_len:
    raise ValueError(f"config.on_policy.prompt_len + max_new_tokens = {prompt_len} + {new} "
                     f"exceeds data.seq_len {seq_len}: the samples must fit in the rows.")
  temperature, top_k = float(settings.get("temperature", 1.0)), int(settings.get("top_k", 0))
  check_settings(new, temperature, top_k, 1.0)
  if not hasattr(model, "init_cache"):
    raise ValueError(f"config.on_policy needs a student that can decode (transformer_lm), not "
                     f"{type(model).__name__}.")
  teacher, alpha = mixture
  if alpha > 0:
    if not hasattr(teacher_model, "init_cache"):
      raise ValueError(f"Teacher-mixed sampling needs teacher {teacher!r} to decode "
                       f"(transformer_lm), not {type(teacher_model).__name__}.")
    sizes = (getattr(model, "num_classes", None), getattr(teacher_model, "num_classes", None))
    if sizes[0] != sizes[1]:
      raise ValueError(f"Teacher-mixed sampling mixes next-token distributions over one "
                       f"vocabulary; the student has {sizes[0]} tokens and teacher "
                       f"{teacher!r} {sizes[1]}.")
  return OnPolicy(model, fraction, prompt_len, new, temperature, top_k,
                  getattr(tokenizer, "eos_id", None), getattr(tokenizer, "pad_id", 0),
                  tuple(retokenize), teacher if alpha > 0 else None, alpha,
                  teacher_model if alpha > 0 else None)
