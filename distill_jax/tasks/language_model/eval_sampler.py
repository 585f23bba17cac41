"""A few of the student's samples at each evaluation of a language-model run (`EvalSampler`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data.text import packing
from distill_jax.models import tokenizers
from distill_jax.tasks.language_model.generate import completion_records, sample


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSampler:
  """A few of the student's samples at each evaluation of a language-model run (config
  `eval_samples` = how many; 0: none): continuations of the first `prompt_len` tokens of the
  first held-out rows (`config.on_policy`'s lengths and temperature, a fixed seed, so
  evaluations compare), for the log and TensorBoard. For on-policy runs also the metrics
  `sample_length` (mean generated tokens, EOS included) and, per teacher,
  `teacher_logprob/NAME` (the teacher's mean log-likelihood per token of those samples: how
  plausible the teacher finds what the student writes).
  """

  model: Any
  teacher_applies: Any
  tokenizer: Any
  prompts: Any  # int32 [n, prompt_len]
  max_new_tokens: int
  temperature: float
  top_k: int
  metrics: bool

  @staticmethod
  def from_config(config: Any, student: Any, teacher_applies: Any, on_policy: Any
                  ) -> EvalSampler | None:
    """None unless the student can decode and `config.eval_samples` > 0."""
    count = int(config.get("eval_samples", 0) or 0)
    settings = config.get("on_policy")
    if count <= 0 or settings is None or not hasattr(student, "init_cache"):
      return None
    rows = packing.packed_split(config.data, config.data.eval_split).tokens[:count]
    return EvalSampler(student, teacher_applies,
                       tokenizers.get_tokenizer(config.data.get("tokenizer", "bytes")),
                       np.asarray(rows[:, :int(settings.prompt_len)], np.int32),
                       int(settings.max_new_tokens), float(settings.get("temperature", 1.0)),
                       int(settings.get("top_k", 0)), on_policy is not None)

  @functools.cached_property
  def _compiled(self) -> Any:
    tok = self.tokenizer

    def run(student_vars, teacher_vars, prompts, rng):
      tokens, mask = sample(self.model, student_vars, prompts, rng=rng,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            top_k=self.top_k, eos_id=tok.eos_id, pad_id=tok.pad_id)
      metrics = {}
      if self.metrics:
        kept = mask[:, 1:]
        metrics["sample_length"] = jnp.mean(jnp.sum(mask, axis=1))
        for name, apply in self.teacher_applies.items():
          logits = apply(teacher_vars[name], {"tokens": tokens}, False).whole_logits()
          logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
          ll = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
          metrics[f"teacher_logprob/{name}"] = (jnp.sum(ll * kept)
                                                / jnp.maximum(jnp.sum(kept), 1.0))
      return tokens, mask, metrics

    return jax.jit(run)

  def __call__(self, student_vars: Any, teacher_vars: Any, seed: int = 0
               ) -> tuple[list[str], dict[str, float]]:
    """(the texts, each `prompt ␞ completion`, and the metrics)."""
    tokens, mask, metrics = jax.device_get(self._compiled(
        student_vars, {n: teacher_vars[n] for n in self.teacher_applies}, self.prompts,
        jax.random.PRNGKey(seed)))
    prompt_len = self.prompts.shape[1]
    records = completion_records(self.tokenizer, [self.tokenizer.decode(p) for p in self.prompts],
                                 tokens, mask, prompt_len)
    texts = [f"{r['prompt']} ␞ {r['completion']}" for r in records]
    return texts, {k: float(v) for k, v in metrics.items()}
