"""The audit of a language-model student: prompts -> every model's own continuations -> how
each candidate scores them -> the same calibrated decision as for images (`run.summarise`).

Every model m (the student and each control) continues the same prompts (seeded sampling,
the same random draws for every model, so they differ only by what they learnt); then each
candidate c is asked for its next-token logits on m's sequences (query access only: a
function from token ids [N, L] to logits [N, L, V]), and on the generated positions

- `loglik`: c's mean log-likelihood per token of m's generated tokens (higher = closer): a
  student distilled from c writes what c finds likely;
- `top1`: the share of positions where m's and c's most likely next tokens agree (higher);
- `kl_tT`: the mean KL(p_c^T || p_m^T) between their next-token distributions at
  temperature T (lower).

The per-sequence means feed `run.summarise` unchanged: the attribution decision of
`decision.attribute` (accusation against the controls, pairwise tests, a candidate named only
by the intersection-union test, else a set or "none"); no decoys or shadows here yet.

Sampling asks a model for logits on a fixed-length buffer [N, P + G] (the positions not yet
written hold the pad token) and reads position t - 1 for token t: the models are causal, so
what follows t - 1 does not change its logits, and one compiled shape serves every step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from distill_jax.audit import scores
from distill_jax.audit.run import _jsonable, _parse_primary, summarise
from distill_jax.audit.subjects import AuditError, Exported, QueryOnly
from distill_jax.common.registry import Registry

LM_PROBES = Registry("language-model probe")
register_lm_probe = LM_PROBES.register
DEFAULT_LM_PROBES = ("prompts",)
DEFAULT_LM_SCORE = "kl_t1"
DEFAULT_LM_TEMPERATURES = (1.0,)
PROMPTS_DEFAULTS = {"prompt_len": 8, "new_tokens": 16, "temperature": 1.0, "file": ""}

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Prompt token ids [N, P] and how they were chosen."""

  name: str
  tokens: np.ndarray
  info: Mapping[str, Any]


@dataclasses.dataclass
class LMProbeContext:
  """What a language-model probe may use: the data set, the sizes, the per-probe options."""

  data_config: Any
  num_inputs: int
  seed: int
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def option(self, probe: str, key: str, default: Any) -> Any:
    return type(default)(self.settings.get(probe, {}).get(key, default))


@register_lm_probe("prompts")
def prompts_probe(context: LMProbeContext) -> Prompts:
  """The first `prompt_len` tokens of the first `num_inputs` held-out rows (the data set's
  eval split), or, with option `file`, one prompt per non-empty line of that UTF-8 file
  (encoded with the data set's tokenizer, BOS first; all cut to the shortest prompt's length,
  at most `prompt_len`, so every row starts generating at the same position)."""
  from distill_jax.data.text import packing
  from distill_jax.models import tokenizers

  prompt_len = context.option("prompts", "prompt_len", PROMPTS_DEFAULTS["prompt_len"])
  path = context.option("prompts", "file", "")
  if context.data_config is None:
    raise AuditError("The prompts probe needs the student's data config (its tokenizer and "
                     "held-out rows): audit a run's workdir, whose config.json names them.")
  if path:
    tokenizer = tokenizers.get_tokenizer(context.data_config.get("tokenizer", "bytes"))
    with open(path, encoding="utf-8") as f:
      lines = [line.rstrip("\n") for line in f if line.strip()][:context.num_inputs]
    if not lines:
      raise AuditError(f"--set=prompts.file={path}: no non-empty line to use as a prompt.")
    encoded = [tokenizer.encode(line)[:-1] for line in lines]  # BOS + text, no EOS.
    length = min(prompt_len, *(len(e) for e in encoded))
    tokens = np.stack([e[:length] for e in encoded]).astype(np.int32)
    info = {"file": path, "prompt_len": int(length)}
  else:
    split = context.data_config.get("eval_split") or "test"
    packed = packing.packed_split(context.data_config, split)
    tokens = np.asarray(packed.tokens[:context.num_inputs, :prompt_len], np.int32)
    info = {"data": context.data_config.name, "split": split, "prompt_len": int(prompt_len)}
  return Prompts("prompts", tokens, {**info, "num_inputs": int(len(tokens))})


def sample_continuations(fn: LogitsFn, prompts: np.ndarray, new_tokens: int, seed: int,
                         temperature: float = 1.0, pad_id: int = 0) -> np.ndarray:
  """[N, P + new_tokens]: `prompts` [N, P] continued by sampling from `fn`'s next-token
  distribution at `temperature` (Gumbel-max with draws seeded by `seed` alone, so every model
  given the same seed sees the same noise; temperature 0: greedy)."""
  prompts = np.asarray(prompts, np.int64)
  n, p = prompts.shape
  tokens = np.full((n, p + new_tokens), pad_id, np.int64)
  tokens[:, :p] = prompts
  rng = np.random.default_rng([seed, 7919])
  for t in range(p, p + new_tokens):
    logits = np.asarray(fn(tokens), np.float64)[:, t - 1]
    if temperature > 0:
      logits = logits / temperature + rng.gumbel(size=logits.shape)
    tokens[:, t] = np.argmax(logits, -1)
  return tokens


def score_list(temperatures: Sequence[float] = DEFAULT_LM_TEMPERATURES) -> list[scores.Score]:
  """The scores `per_sequence_scores` returns, in order, with their direction."""
  score = scores.Score
  return [score("loglik", True, "the candidate's mean log-likelihood per token of the model's "
                "generations"),
          score("top1", True, "top-1 next-token agreement on the generated positions"),
          *[score(scores.kl_name(t), False, f"next-token KL(candidate || model) at T={t:g} on "
                  "the generated positions") for t in temperatures]]



def per_sequence_scores(model: np.ndarray, candidate: np.ndarray, tokens: np.ndarray,
                        start: int, temperatures: Sequence[float] = DEFAULT_LM_TEMPERATURES
                        ) -> dict[str, np.ndarray]:
  """Every score of `score_list(temperatures)`, one per sequence ([N] each), averaged over the
  generated tokens `tokens[:, start:]`, each predicted from the logits [N, L, V] of the
  position before it."""
  m, c = model[:, start - 1:-1], candidate[:, start - 1:-1]
  n, g, v = m.shape
  flat_m, flat_c = m.reshape(n * g, v), c.reshape(n * g, v)
  target = np.asarray(tokens)[:, start:].reshape(n * g)
  log_c = scores.log_softmax(flat_c)
  out = {"loglik": log_c[np.arange(n * g), target].reshape(n, g).mean(1),
         "top1": scores.top1_agreement(flat_m, flat_c).reshape(n, g).mean(1)}
  for t in temperatures:
    out[scores.kl_name(t)] = scores.kl_divergence(flat_m, flat_c, t).reshape(n, g).mean(1)
  return out


def run_lm_audit(student: Exported | LogitsFn, candidates: Mapping[str, LogitsFn],
                 controls: Mapping[str, LogitsFn], *, data_config: Any = None,
                 probes: Sequence[str] = DEFAULT_LM_PROBES, primary: str | None = None,
                 num_inputs: int = 64, seed: int = 0,
                 temperatures: Sequence[float] = DEFAULT_LM_TEMPERATURES, alpha: float = 0.05,
                 bootstrap: int = 1000,
                 probe_settings: Mapping[str, Mapping[str, Any]] | None = None,
                 contrast: bool = True, student_name: str = "student",
                 pad_id: int | None = None) -> dict[str, Any]:
  """Audits a language-model `student` against `candidates`, calibrated by `controls`.

  Args:
    student: the student (an `Exported` language model or any token ids -> logits function).
    candidates, controls: name -> function from token ids [N, L] to logits [N, L, V]; only
      their outputs are used (controls: at least 2, trained on the same data without the
      candidates).
    probes: names in `LM_PROBES` (prompts for the models to continue).
    primary: `PROBE:SCORE[,PROBE:SCORE...]` that decides (default: the first probe and
      `kl_t1`; several: their mean, as `run.run_audit`).
    probe_settings: per-probe options; `prompts` takes prompt_len, new_tokens, temperature
      (of the models' sampling) and file (see `prompts_probe`).
    pad_id: the token after the written positions while sampling (default: the data set's
      tokenizer's pad token, else 0); causal models never see it.
    The rest as in `run.run_audit`.
  Returns:
    The same JSON-able dict as `run.run_audit` (see `report.write_report`).
  """
  from distill_jax.models import tokenizers

  t0 = time.time()
  probes = list(probes)
  for name in probes:
    LM_PROBES.get(name)
  listed = score_list(temperatures)
  pairs = _parse_primary(primary, probes, {s.name: s.higher_is_closer for s in listed},
                         DEFAULT_LM_SCORE)
  if len(controls) < 2:
    raise AuditError(f"--controls: the calibrated decision needs at least 2 control students "
                     f"(trained on the same data without the candidates), got {len(controls)}.")
  if not candidates:
    raise AuditError("--candidates: give at least one candidate teacher.")
  name = getattr(student, "name", student_name)
  overlap = set(candidates) & set(controls) | {name} & (set(candidates) | set(controls))
  if overlap:
    raise AuditError(f"Names used twice among the student, candidates and controls: "
                     f"{sorted(overlap)}; every model needs its own name.")
  if pad_id is None:
    pad_id = (tokenizers.get_tokenizer(data_config.get("tokenizer", "bytes")).pad_id
              if data_config is not None else 0)
  candidates = {c: QueryOnly(c, fn, ndim=3) for c, fn in candidates.items()}
  models = {name: QueryOnly(name, student, ndim=3),
            **{c: QueryOnly(c, fn, ndim=3) for c, fn in controls.items()}}
  context = LMProbeContext(data_config, num_inputs, seed, dict(probe_settings or {}))
  per_input: dict[str, dict] = {c: {} for c in candidates}
  probe_info = {}
  for probe_name in probes:
    prompts = LM_PROBES.get(probe_name)(context)
    options = {k: context.option(probe_name, k, v) for k, v in PROMPTS_DEFAULTS.items()
               if k in ("new_tokens", "temperature")}
    start = prompts.tokens.shape[1]
    generated = {m: sample_continuations(fn, prompts.tokens, options["new_tokens"], seed,
                                         options["temperature"], pad_id)
                 for m, fn in models.items()}
    own = {m: models[m](x) for m, x in generated.items()}
    for c, fn in candidates.items():
      per_input[c][probe_name] = {
          m: per_sequence_scores(own[m], fn(generated[m]), generated[m], start, temperatures)
          for m in models}
    probe_info[probe_name] = {"num_inputs": int(len(prompts.tokens)), "labels": False,
                              **_jsonable(dict(prompts.info)), **options,
                              "generated_tokens": int(options["new_tokens"]) * len(
                                  prompts.tokens)}
  return summarise(per_input, listed, student=_Named(name, student), controls=list(controls),
                   probe_info=probe_info, primary=pairs,
                   queries={c: fn.queries for c, fn in candidates.items()}, seed=seed,
                   alpha=alpha, bootstrap=bootstrap, contrast=contrast, t0=t0)


@dataclasses.dataclass(frozen=True)
class _Named:
  """The student as `summarise` reads it: its name and, when exported, its directory."""

  name: str
  model: Any

  @property
  def directory(self) -> str | None:
    return getattr(self.model, "directory", None)
