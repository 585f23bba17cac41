"""The task interface: what the config check, the run's build, the step and the loop ask of a
kind of problem."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from distill_jax.common.outputs import Outputs


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What building a run needs to know of the data, whatever the task.

  `num_classes` is the models' output size (classes, or the vocabulary), `input_shape` one
  example's input without the batch axis ((H, W, C) images, (L,) token rows), `num_examples`
  the examples (rows) per split, `data` the data module's own description, `batch_extras` the
  per-example arrays the data's batches carry beyond the task's own keys ({key: (shape without
  the batch axis, dtype name)}, e.g. a black-box teacher's top-k log-probabilities), and
  `counts` what the data counted while reading it, as JSON ({split: {name: number}}, e.g. a
  black-box file's records and unmapped alternatives): a run writes it to `result.json` under
  "data" when there is any.
  """

  num_classes: int
  input_shape: tuple[int, ...]
  num_examples: dict[str, int]
  data: Any
  batch_extras: Mapping[str, tuple[tuple[int, ...], str]] = dataclasses.field(
      default_factory=dict)
  counts: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TaskExtras:
  """What a run needs beyond the generic pieces, built by `Task.build_extras` (None: nothing).

  `on_policy` is applied by the main stage's train step to each batch first
  (`on_policy(variables, batch, rng, axis_name, teacher_vars=) -> batch`, static: hashable;
  `variables` the student's, `teacher_vars` {name: variables} of the teachers); `sampler` runs
  at each evaluation (`sampler(student_vars, teacher_vars, seed) -> (texts, metrics)`).
  """

  on_policy: Any = None
  sampler: Any = None


class Task:
  """A kind of problem. Subclasses are stateless frozen dataclasses (static in the step).

  A new task subclasses this, sets the attributes below and implements `info`, the iterators,
  `example_batch`, `train_metrics` and `eval_sums` (and `input_fingerprint` with a teacher
  cache); it is registered with `tasks.TASKS.register(name)(instance)` and chosen by
  `config.task`. Four hooks do nothing by default: `validate` (its own config checks),
  `student_init` (weights the student starts from), `check_teachers` (what it requires of
  loaded teachers) and `build_extras` (what a run needs beyond the generic pieces).

  Attributes:
    input_key: the batch key a model reads.
    headline: the eval metric that `result.json` tracks as `best_<headline>`.
    higher_is_better: whether a larger headline is better.
    supports_teacher_cache: whether teachers can be read from `data.teacher_cache` caches
      (the task then defines `input_fingerprint`).
    rollout_keys: the task's batch keys that stay valid when the on-policy step replaces the
      rows by the student's samples (the rollout rewrites them, or they describe the row, not
      its tokens). Every other key must be declared in `data.batch_keys`; a run refuses a
      rollout over a key that would not follow the samples.
  """

  input_key: str = "image"
  headline: str = "top1"
  higher_is_better: bool = True
  supports_teacher_cache: bool = False
  rollout_keys: tuple[str, ...] = ()

  def validate(self, config: Any) -> None:
    """Raises `rules.ConfigError` (one line, naming the setting) on a setting of `config` that
    this task cannot run; `config.validate` calls it after the generic checks. Default: none."""
    del config

  def student_init(self, config: Any) -> Any:
    """Weights ({'params': ...}) the student starts from instead of its seed's initialisation,
    or None (the default); raises on weights that do not fit the student's settings. Called
    right after the student is built, before the teachers are loaded."""
    del config
    return None

  def check_teachers(self, teachers: Mapping[str, Any], config: Any) -> None:
    """Raises when the loaded `teachers` ({name: `teachers.Teacher`}) cannot teach under
    `config` (e.g. a language model's tokenizers differ). Default: any teacher fits."""
    del teachers, config

  def build_extras(self, config: Any, student: Any, *, example: Mapping[str, jax.Array],
                   teacher_applies: Mapping[str, Any],
                   teachers: Mapping[str, Any] | None = None) -> TaskExtras:
    """What a run needs beyond the generic pieces (`TaskExtras`), from `config`, the student's
    module, the all-zeros global batch `example`, the teachers' forwards and the loaded
    `teachers` ({name: `teachers.Teacher`}, e.g. a module to decode with); raises
    `rules.ConfigError` on a setting that does not fit. Default: nothing."""
    del config, student, example, teacher_applies, teachers
    return TaskExtras()

  def info(self, data_config: Any) -> TaskInfo:
    raise NotImplementedError

  def train_iterator(self, data_config: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    raise NotImplementedError

  def eval_batches(self, data_config: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    raise NotImplementedError

  def input_fingerprint(self, data_config: Any, split: str, seed: int, augmented: bool
                        ) -> dict[str, Any]:
    """Everything that decides what a teacher sees of `split` (augmented: as training reads
    it), as JSON: a teacher cache is used only where this is unchanged. It holds at least
    `num_examples` and `augment` ('none', or the augmentation with its `augment_period`)."""
    raise NotImplementedError

  def example_batch(self, input_shape: tuple[int, ...], batch_size: int,
                    cached_logits: Mapping[str, tuple[int, ...]] | None = None
                    ) -> dict[str, jax.Array]:
    """An all-zeros batch of the shapes the step sees, with `cached_logits` {batch key: one
    example's logits shape} for the teachers read from a cache."""
    raise NotImplementedError

  def loss_weight(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
    """How much a (micro-)batch weighs in a mean over a bigger batch: what its losses average
    over, summed (traced). Gradient accumulation weighs micro-batch j's gradients and metrics
    by `loss_weight_j / sum_j loss_weight_j`, so that means over it equal the big batch's.
    None (the default, classification): every micro-batch weighs alike (as many examples)."""
    del batch
    return None

  def train_metrics(self, student: Outputs, teachers: Mapping[str, Outputs],
                    batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Scalars logged beside the loss for one (micro-)batch (traced, in the step)."""
    raise NotImplementedError

  def eval_sums(self, student: Outputs, teachers: Mapping[str, Outputs],
                batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the batch's kept examples or tokens, with their number as 'count' (traced):
    the host adds them over batches and devices and `eval_means` divides once."""
    raise NotImplementedError

  def eval_means(self, totals: Mapping[str, float]) -> dict[str, float]:
    """The eval metrics (without the 'eval/' prefix) from the summed `eval_sums`."""
    count = max(totals["count"], 1.0)
    return {k: v / count for k, v in totals.items() if k != "count"}

  def is_better(self, value: float, best: float | None) -> bool:
    """Whether headline `value` beats `best` (None: nothing yet)."""
    if best is None:
      return True
    return value > best if self.higher_is_better else value < best
