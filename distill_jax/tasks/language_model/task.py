"""Language modelling: packed token rows [B, L], next-token targets [B, L], per-token masks.

Batch keys (`data.text`): `tokens` (what the model reads), `targets`, `mask`, `document`, `id`.
Every metric is a mean over the kept tokens (mask 1), summed over batches and devices first:

- `ce` (nats per token), `perplexity` = exp(ce), `bits_per_byte` = total NLL in bits over the
  UTF-8 bytes of text the kept targets stand for (eval batches' `target_bytes`, from the
  tokenizer's `byte_lengths`: one per byte token, a BPE token's decoded bytes; the NLL of the
  EOS predictions counts, special tokens add no bytes), `top1` (next-token accuracy);
- per teacher, and for 'ensemble' (the equal-weight mixture) with several: `agreement/NAME`
  (token top-1 agreement with the student), `kl/NAME` (KL(teacher || student) at T = 1, nats
  per token), `teacher_ce/NAME` and `teacher_top1/NAME`.

The headline is the held-out perplexity (lower is better). With lazy logits
(`config.fused_logits`) the train metrics and eval sums are computed chunk by chunk from the
hidden states, as the token losses are.

Its hooks: `student_init` loads the student's open weights (`config.student.init`);
`check_teachers` refuses open-weights teachers whose tokenizer is not the data's
(`check_tokenizers`); `build_extras` builds the on-policy rollout (`config.on_policy`,
`on_policy.OnPolicy`, sampling from the teacher-student mixture that MiniLLM's terms ask for)
and the samples shown at each evaluation (`eval_sampler.EvalSampler`); `validate` refuses a
term that learns from the student's own samples (`minillm`) unless every main-stage batch is
sampled, at temperature 1 without top-k.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.common.model_io import CheckpointError
from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import ConfigError
from distill_jax.data import batch_keys
from distill_jax.data.text import batches, packing
from distill_jax.data.text import info as text_info
from distill_jax.losses import LOSSES
from distill_jax.losses import cross_tokenizer as xtok
from distill_jax.losses.base import kl, masked_mean, masked_sum, teacher_log_probs
from distill_jax.losses.chunking import chunked_per_token, fused_chunk_size
from distill_jax.losses.objective import build_objective
from distill_jax.models import tokenizers
from distill_jax.tasks.base import Task, TaskExtras, TaskInfo
from distill_jax.tasks.language_model.eval_sampler import EvalSampler
from distill_jax.tasks.language_model.on_policy import (
    Retokenize,
    on_policy_from_config,
    rollout_mixture,
)


def _nll(log_probs: jax.Array, targets: jax.Array) -> jax.Array:
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _outputs(logits: Mapping[str, jax.Array]) -> dict[str, Outputs]:
  return {name: Outputs(x, {}, {}) for name, x in logits.items()}


def _per_token(fn: Any, student: Outputs, teachers: Mapping[str, Outputs],
               batch: Mapping[str, jax.Array]) -> Any:
  """`fn(student logits, {teacher: logits}, targets)` ([B, C, V], [B, C] -> {name: [B, C]})
  over every position: at once, or C positions at a time when logits are lazy
  (`config.fused_logits`), so the metrics never hold the [B, L, V] logits whole either."""
  arrays = {"student": student.token_inputs(), "targets": batch["targets"],
            "teachers": {n: t.token_inputs() for n, t in teachers.items()}}

  def chunk_values(chunk):
    return fn(student.logits_of(chunk["student"]),
              {n: teachers[n].logits_of(x) for n, x in chunk["teachers"].items()},
              chunk["targets"])

  return chunked_per_token(chunk_values, arrays, fused_chunk_size(0, student, teachers))


@dataclasses.dataclass(frozen=True)
class LanguageModel(Task):
  """Next-token prediction on packed text; see the module docstring."""

  input_key: str = "tokens"
  headline: str = "perplexity"
  higher_is_better: bool = False
  supports_teacher_cache: bool = True
  # The on-policy rollout rewrites tokens, targets, mask and document; id names the row.
  rollout_keys: tuple[str, ...] = ("tokens", "targets", "mask", "document", "id")

  def check_teachers(self, teachers: Mapping[str, Any], config: Any) -> None:
    """Every open-weights teacher's tokenizer is the data's (`check_tokenizers`), unless the
    teacher has its own (`teachers.NAME.tokenizer`), which only the terms that align
    tokenizations may read (`check_aligned_terms`)."""
    check_tokenizers(teachers, config.data.get("tokenizer"))
    check_aligned_terms(config)

  def student_init(self, config: Any) -> Any:
    """The open weights of `config.student.init` (models.hf.student_config), else None."""
    if not config.student.get("init"):
      return None
    from distill_jax.models import hf  # safetensors and tokenizers load only when used.
    return hf.load_student_init(config.student.init, config.student.name,
                                config.student.kwargs, config.data.get("tokenizer") or "bytes")

  def validate(self, config: Any) -> None:
    """A term that learns from the student's own samples (its loss has `rollout_mixture`:
    `minillm`) runs in the main stage only, with `config.on_policy.fraction` = 1 at
    temperature 1 and no top-k (its importance weights assume samples of q_θ or of the
    teacher mixture, nothing else), and all such terms ask for one mixture."""
    names = list(config.teachers)
    for key, stage in config.stages.items():
      for term in build_objective(stage.losses, names).terms:
        if hasattr(term.fn, "rollout_mixture"):
          raise ConfigError(
              f"config.stages.{key}.losses.{term.name} ({term.loss}) learns from the student's "
              "own samples, which only the main stage draws (config.on_policy): move it to "
              "config.losses.")
    terms = [t for t in build_objective(config.losses, names).terms
             if hasattr(t.fn, "rollout_mixture")]
    if not terms:
      return
    where = f"config.losses.{terms[0].name} ({terms[0].loss})"
    settings = config.get("on_policy") or {}
    fraction = float(settings.get("fraction", 0.0))
    if fraction != 1.0:
      raise ConfigError(f"{where} is a policy gradient on the student's own samples: set "
                        f"config.on_policy.fraction=1 (got {fraction}).")
    temperature, top_k = float(settings.get("temperature", 1.0)), int(settings.get("top_k", 0))
    if temperature != 1.0 or top_k != 0:
      raise ConfigError(f"{where} weighs the samples as drawn from the student (or its teacher "
                        f"mixture) itself: set config.on_policy.temperature=1 and top_k=0 (got "
                        f"{temperature} and {top_k}).")
    try:
      rollout_mixture(terms, names)
    except ValueError as e:
      raise ConfigError(f"config.losses: {e}") from None

  def build_extras(self, config: Any, student: Any, *, example: Mapping[str, jax.Array],
                   teacher_applies: Mapping[str, Any],
                   teachers: Mapping[str, Any] | None = None) -> TaskExtras:
    """The on-policy rollout (`config.on_policy`, else None; decoding with the teacher that
    teacher-mixed sampling names, from `teachers`) and the eval samples
    (`config.eval_samples`, else None)."""
    on_policy = self._on_policy(config, student, example, teachers or {})
    # The samples are the student's tokens: teachers with their own tokenizer do not score them.
    same = {n: a for n, a in teacher_applies.items()
            if not config.teachers[n].get("tokenizer")}
    sampler = EvalSampler.from_config(config, student, same, on_policy)
    return TaskExtras(on_policy=on_policy, sampler=sampler)

  def _on_policy(self, config: Any, student: Any, example: Mapping[str, jax.Array],
                 teachers: Mapping[str, Any]) -> Any:
    """The `OnPolicy` of `config.on_policy` (None without), sampling from the mixture the
    main stage's terms ask for (`on_policy.rollout_mixture`), refusing batch keys that would
    not follow the student's samples (`data.batch_keys`)."""
    if config.get("on_policy") is None:
      return None
    seq_len = int(example[self.input_key].shape[1])
    data_tokenizer = config.data.get("tokenizer", "bytes")
    retokenize = tuple(  # Cross-tokenizer teachers score the samples in their own tokens.
        Retokenize(name, data_tokenizer, settings.tokenizer,
                   int(settings.get("seq_len", 0)) or seq_len)
        for name, settings in config.teachers.items() if settings.get("tokenizer"))
    try:
      names = list(config.teachers)
      teacher, alpha = rollout_mixture(build_objective(config.losses, names).terms, names)
      module = getattr(teachers.get(teacher), "module", None) if teacher else None
      on_policy = on_policy_from_config(
          config.on_policy, student, tokenizers.get_tokenizer(data_tokenizer), seq_len,
          retokenize, (teacher, alpha), module)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if on_policy is not None:
      stale = batch_keys.rollout_problems(example, self.rollout_keys)
      if stale:
        raise ConfigError(
            f"config.on_policy.fraction={on_policy.fraction} replaces the rows by the "
            "student's samples, but these batch keys would still describe the original rows: "
            + "; ".join(stale) + ".")
    return on_policy

  def info(self, data_config: Any) -> TaskInfo:
    info = text_info.get_text_info(data_config)
    return TaskInfo(info.vocab_size, (info.seq_len,), dict(info.num_examples), info,
                    dict(info.extra), dict(info.counts))

  def train_iterator(self, data_config: Any, **kwargs: Any) -> Any:
    return batches.train_iterator(data_config, **kwargs)

  def eval_batches(self, data_config: Any, **kwargs: Any) -> Any:
    return batches.eval_batches(data_config, **kwargs)

  def input_fingerprint(self, data_config: Any, split: str, seed: int, augmented: bool
                        ) -> dict[str, Any]:
    """The packed rows' content (SHA-256), their length and tokenizer; text is never
    augmented, so the seed and `augmented` do not matter."""
    del seed, augmented
    info = text_info.get_text_info(data_config)
    return {"data": data_config.name, "split": split,
            "num_examples": len(packing.packed_split(data_config, split)),
            "sha256": packing.rows_digest(data_config, split), "seq_len": info.seq_len,
            "tokenizer": info.tokenizer, "augment": "none"}

  def example_batch(self, input_shape: tuple[int, ...], batch_size: int,
                    cached_logits: Mapping[str, tuple[int, ...]] | None = None
                    ) -> dict[str, jax.Array]:
    rows = (batch_size, *input_shape)
    batch = {"tokens": jnp.zeros(rows, jnp.int32), "targets": jnp.zeros(rows, jnp.int32),
             "mask": jnp.ones(rows, jnp.float32), "document": jnp.zeros(rows, jnp.int32),
             "id": jnp.zeros((batch_size,), jnp.int32)}
    for key, shape in (cached_logits or {}).items():
      batch[key] = jnp.zeros((batch_size, *shape), jnp.float32)
    return batch

  def loss_weight(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """The kept tokens, `sum(mask)`: every token term is a mean over them."""
    return jnp.sum(batch["mask"].astype(jnp.float32))

  def train_metrics(self, student: Outputs, teachers: Mapping[str, Outputs],
                    batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Next-token `top1` and, with teachers, token `agreement` with their ensemble."""
    mask = batch.get("mask")

    def per_token(logits, teacher_logits, targets):
      pred = jnp.argmax(logits, axis=-1)
      values = {"top1": (pred == targets).astype(jnp.float32)}
      if teacher_logits:
        ensemble = jnp.argmax(teacher_log_probs(_outputs(teacher_logits), 1.0), axis=-1)
        values["agreement"] = (pred == ensemble).astype(jnp.float32)
      return values

    same, cross = _split_teachers(teachers)
    values = _per_token(per_token, student, same, batch)
    return {**{name: masked_mean(v, mask) for name, v in values.items()},
            **{k: masked_mean(v, m if mask is None else m * mask)
               for k, (v, m) in _xtok_values(student, cross, batch).items()}}

  def eval_sums(self, student: Outputs, teachers: Mapping[str, Outputs],
                batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    mask = batch["mask"].astype(jnp.float32)
    teachers, cross = _split_teachers(teachers)
    names = list(teachers) + (["ensemble"] if len(teachers) > 1 else [])

    def per_token(logits, teacher_logits, targets):
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      pred = jnp.argmax(logp, axis=-1)
      values = {"ce": _nll(logp, targets), "top1": pred == targets}
      for name in names:
        t_logp = teacher_log_probs(_outputs(teacher_logits), 1.0,
                                   None if name == "ensemble" else name)
        values[f"agreement/{name}"] = jnp.argmax(t_logp, axis=-1) == pred
        values[f"kl/{name}"] = kl(t_logp, logp)
        values[f"teacher_ce/{name}"] = _nll(t_logp, targets)
        values[f"teacher_top1/{name}"] = jnp.argmax(t_logp, axis=-1) == targets
      return values

    total = lambda x: masked_sum(x, mask)  # Drops a NaN at padding (mask * NaN is NaN).
    values = _per_token(per_token, student, teachers, batch)
    # A cross-tokenizer teacher's means are over its own positions: each has its count.
    xtok_sums = {k: (masked_sum(v, m * mask), jnp.sum(m * mask))
                 for k, (v, m) in _xtok_values(student, cross, batch).items()}
    return {"count": jnp.sum(mask), "num_bytes": total(batch["target_bytes"]),
            **{name: total(v) for name, v in values.items()},
            **{k: s for k, (s, _) in xtok_sums.items()},
            **{f"{k}/count": c for k, (_, c) in xtok_sums.items()}}

  def eval_means(self, totals: Mapping[str, float]) -> dict[str, float]:
    totals = dict(totals)
    num_bytes = totals.pop("num_bytes")
    own = {k[:-len("/count")]: totals.pop(k) for k in list(totals)
           if k.startswith("xtok_") and k.endswith("/count")}
    own = {k: totals.pop(k) / max(count, 1.0) for k, count in own.items()}
    means = {**super().eval_means(totals), **own}
    means["perplexity"] = math.exp(min(means["ce"], 700.0))
    means["bits_per_byte"] = totals["ce"] / math.log(2) / max(num_bytes, 1.0)
    return means


def _split_teachers(teachers: Mapping[str, Outputs]
                    ) -> tuple[dict[str, Outputs], dict[str, Outputs]]:
  """(teachers that read the data's tokens, teachers with their own tokenizer)."""
  cross = {n: t for n, t in teachers.items() if xtok.VOCAB_MAP in t.features}
  return {n: t for n, t in teachers.items() if n not in cross}, cross


def _xtok_values(student: Outputs, teachers: Mapping[str, Outputs],
                 batch: Mapping[str, jax.Array]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Per cross-tokenizer teacher, per student position [B, L], (value, the positions its mean
  is over): `xtok_aligned/NAME` (whether a teacher position predicts the same boundary; over
  every position) and `xtok_unmapped/NAME` (the teacher's probability on tokens that start
  with no student token, which `xtok_kl` drops; over the aligned positions)."""
  values = {}
  for name, teacher in teachers.items():
    mass, aligned = xtok.unmapped_mass(name, teacher, batch, student)
    values[f"xtok_aligned/{name}"] = (aligned, jnp.ones_like(aligned))
    values[f"xtok_unmapped/{name}"] = (mass, aligned)
  return values


def check_aligned_terms(config: Any) -> None:
  """Raises unless every loss term that reads a teacher with its own tokenizer
  (`teachers.NAME.tokenizer`) aligns tokenizations (`xtok_kl`, `uld`): the others compare the
  student's and the teacher's outputs position by position over one vocabulary."""
  own = [n for n, s in config.teachers.items() if s.get("tokenizer")]
  if not own:
    return
  stages = {"losses": config.losses, **{f"stages.{s}.losses": st.losses
                                        for s, st in config.stages.items()}}
  for where, terms in stages.items():
    for term, settings in terms.items():
      loss = (settings or {}).get("loss", term)
      fn = LOSSES.get(loss) if loss in LOSSES else None
      if fn is None or not getattr(fn, "uses_teachers", True) or xtok.aligns_tokens(fn):
        continue
      named = (settings or {}).get("teacher")
      readers = [named] if named else own
      for name in readers:
        if name in own:
          raise ConfigError(
              f"config.{where}.{term} (loss {loss!r}) reads teacher {name!r}, which has its "
              f"own tokenizer (config.teachers.{name}.tokenizer="
              f"{config.teachers[name].tokenizer!r}): only the terms that align "
              f"tokenizations can ({', '.join(sorted(_aligning_losses()))}); use one, or "
              f"point the term at another teacher (config.{where}.{term}.teacher=...).")


def _aligning_losses() -> list[str]:
  return [name for name in LOSSES.names() if xtok.aligns_tokens(LOSSES.get(name))]


def check_tokenizers(teachers: Mapping[str, Any], data_tokenizer: str | None) -> None:
  """Raises unless every open-weights teacher's tokenizer (`Teacher.tokenizer`: its
  tokenizer.json, None for the others) is the data's (`data.tokenizer`, which the student
  reads): token-level distillation compares one vocabulary."""
  data_tokenizer = data_tokenizer or "bytes"
  for name, teacher in teachers.items():
    if teacher.tokenizer is None:
      continue
    if getattr(teacher, "own_tokenizer", None):  # Cross-tokenizer: its own must be its file.
      own = tokenizers.get_tokenizer(teacher.own_tokenizer)
      if not (isinstance(own, tokenizers.HfTokenizer) and own.fingerprint()
              == tokenizers.HfTokenizer.from_dir(teacher.tokenizer).fingerprint()):
        raise CheckpointError(
            f"Teacher {name!r} uses the tokenizer {teacher.tokenizer} but config.teachers."
            f"{name}.tokenizer={teacher.own_tokenizer!r} names another; set it to "
            f"hf:{os.path.dirname(teacher.tokenizer)}.")
      continue
    ours = tokenizers.get_tokenizer(data_tokenizer)
    if not (isinstance(ours, tokenizers.HfTokenizer) and
            ours.fingerprint() == tokenizers.HfTokenizer.from_dir(teacher.tokenizer).fingerprint()):
      raise CheckpointError(
          f"Teacher {name!r} uses the tokenizer {teacher.tokenizer} but the data and the "
          f"student use {getattr(ours, 'path', data_tokenizer)!r} (config.data.tokenizer="
          f"{data_tokenizer!r}); they must be the same file: set --config.data.tokenizer="
          f"hf:{os.path.dirname(teacher.tokenizer)}.")
