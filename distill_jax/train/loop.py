"""The run: config -> builders -> compiled step -> loop -> checkpoints, metrics, result.json.

`train_and_evaluate(config, workdir)` is everything the CLI does. It resumes from the latest
checkpoint in `workdir/checkpoints` (state and data position), so a killed run restarted with
the same command ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from distill_jax import config as config_lib
from distill_jax import data as data_lib
from distill_jax import generate, models, optim, tasks
from distill_jax.data import batch_keys, teacher_cache, text
from distill_jax.features import ApplyFn, check_features, list_features, make_apply
from distill_jax.model_io import CheckpointError, export_model
from distill_jax.objective import Objective, build_objective
from distill_jax.teachers import Teacher, check_tokenizers, init_shapes, load_teachers
from distill_jax.train import step as step_lib
from distill_jax.train.checkpoint import Checkpointer, write_atomic
from distill_jax.train.console import Progress
from distill_jax.train.metrics import MetricWriter
from distill_jax.train.parallel import Parallel
from distill_jax.train.signals import Interrupted, StopSignals
from distill_jax.train.state import TrainState, create_train_state
from distill_jax.train.workdir import WorkdirLock, WorkdirWriteError


@dataclasses.dataclass(frozen=True)
class Durations:
  """Every duration of the run in steps, resolved once from the config's epochs and steps."""

  steps_per_epoch: int
  total_steps: int
  eval_every: int  # 0: only at the end.
  log_every: int
  checkpoint_every: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_train: int) -> Durations:
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch < 1:
      raise config_lib.ConfigError(f"batch_size {config.batch_size} is larger than the "
                                   f"{num_train} training examples.")
    total = (int(config.num_steps) if config.num_steps > 0
             else int(round(config.num_epochs * steps_per_epoch)))
    return cls(steps_per_epoch=steps_per_epoch, total_steps=total,
               eval_every=int(round(config.eval_every_epochs * steps_per_epoch)),
               log_every=max(1, int(config.log_every_steps)),
               checkpoint_every=int(config.checkpoint_every_steps))


class NonFiniteLossError(FloatingPointError):
  """A step's loss or update became NaN or infinite; the message names the step and terms."""


def stage_schedules(config: ml_collections.ConfigDict, durations: Durations
                    ) -> list[tuple[str, int, optax.Schedule]]:
  """(name, steps, learning-rate schedule of the stage's own step) of every stage, in the order
  they run: `config.stages` (constant LR: their `lr`, else optim.lr), then 'train' (optim's
  schedule over the run's total steps)."""
  plans = []
  for name, stage_config in config.stages.items():
    steps = (int(stage_config.num_steps) if stage_config.get("num_steps", 0) > 0 else
             int(round(stage_config.num_epochs * durations.steps_per_epoch)))
    plans.append((name, steps, optax.constant_schedule(
        float(stage_config.get("lr", 0.0) or config.optim.lr))))
  steps = durations.total_steps
  plans.append(("train", steps,
                optim.make_schedule(config.optim, durations.steps_per_epoch, steps)))
  return plans


def lr_at(config: ml_collections.ConfigDict, durations: Durations, step: int) -> float:
  """The learning rate of the step after global step `step` (the optimizer's count is `step`
  minus its stage's start) under `config`'s schedules; 0 past the last stage."""
  start = 0
  for _, steps, schedule in stage_schedules(config, durations):
    if step < start + steps:
      return float(schedule(step - start))
    start += steps
  return 0.0


def lr_jump(saved_json: str | None, config: ml_collections.ConfigDict, durations: Durations,
            step: int) -> str | None:
  """When resuming at `step` with a config whose schedule differs from the checkpoint's (e.g. a
  larger num_steps, which stretches a cosine over the longer run), a message with the next
  step's learning rate under each; None when they agree."""
  if not saved_json:
    return None
  saved = ml_collections.ConfigDict(json.loads(saved_json))
  saved_durations = dataclasses.replace(durations, total_steps=(
      int(saved.num_steps) if saved.num_steps > 0
      else int(round(saved.num_epochs * durations.steps_per_epoch))))
  old, new = lr_at(saved, saved_durations, step), lr_at(config, durations, step)
  if math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-12):
    return None
  return (f"The learning rate jumps at step {step + 1}: {old:.6g} under the checkpoint's "
          f"schedule (over {saved_durations.total_steps} steps), {new:.6g} under this "
          f"config's (over {durations.total_steps} steps). The run follows this config's "
          "schedule from here, as if it had been set from the start; it does not continue the "
          "checkpoint's decay.")


def _host_scalars(metrics: Any) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class NonFiniteGuard:
  """Reads the steps' `nonfinite` flags (see `step.nonfinite_mask`) and acts on them.

  The flags of the steps since the last check are fetched together, at the next log, eval or
  checkpoint step (so the host does not wait on every step), and always before a checkpoint
  is written: with 'stop' the run ends naming the first bad step, and nothing after the step
  before it is ever saved; with 'skip' the step dropped its update (in the compiled step) and
  is counted, and `max_consecutive` bad steps in a row stop the run.
  """

  action: str
  max_consecutive: int
  skipped: int = 0
  consecutive: int = 0
  pending: list = dataclasses.field(default_factory=list)

  def add(self, step: int, metrics: Any) -> None:
    self.pending.append((step, metrics))

  def check(self, last_saved: int | None) -> None:
    flags = jax.device_get([m["nonfinite"] for _, m in self.pending])
    pending, self.pending = self.pending, []
    for (step, metrics), flag in zip(pending, flags, strict=True):
      if not flag:
        self.consecutive = 0
        continue
      what = self.describe(step, int(flag), _host_scalars(metrics))
      if self.action == "skip":
        self.skipped += 1
        self.consecutive += 1
        logging.warning("%s; the update was skipped (%d in a row, %d in all).", what,
                        self.consecutive, self.skipped)
        if self.consecutive < self.max_consecutive:
          continue
        what += f" ({self.consecutive} skipped steps in a row)"
      kept = ("no checkpoint was written" if last_saved is None else
              f"the last checkpoint (step {last_saved}) is finite and kept")
      raise NonFiniteLossError(
          f"{what}. Training stopped; {kept}. Lower the learning rate, check the loss "
          "terms' settings, or set --config.train.on_nonfinite=skip.")

  @staticmethod
  def describe(step: int, flag: int, scalars: dict[str, float]) -> str:
    terms = [f"{k}={scalars[k]}" for k in sorted(scalars)
             if k.startswith("loss") and not math.isfinite(scalars[k])]
    parts = [p for p in step_lib.nonfinite_parts(flag) if p != "loss"]
    said = []
    if terms:
      said.append("loss " + ", ".join(terms))
    if parts:
      said.append("new " + ", ".join(parts))
    return f"Non-finite values at step {step}: " + "; ".join(said)


def evaluate(parallel: Parallel, eval_step: Callable, state: Any, teacher_vars: Any,
             data_config: Any, batch_size: int,
             side_data: dict[str, data_lib.SideData] | None = None,
             task: tasks.Task = step_lib.CLASSIFICATION) -> dict[str, float]:
  """The task's eval metrics on the eval split (classification: top-1/top-5/CE of the student
  and fidelity to each teacher)."""
  totals: dict[str, float] = {}
  for batch in task.eval_batches(data_config, global_batch_size=batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count(),
                                 side_data=side_data):
    sums = parallel.get(eval_step(state, teacher_vars, parallel.put_batch(batch)))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {f"eval/{k}": v for k, v in task.eval_means(totals).items()}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: its objective, optimizer and global step range [start, end).

  Pre-training stages (`config.stages`, e.g. a connector's hint pre-training) run first, in
  order, then the main stage ('train'). Each stage starts from a fresh optimizer state, as the
  reference recipes do; parameters outside the stage's trainable set are frozen.
  """

  name: str
  objective: Objective
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  start: int
  end: int
  train_step: Callable


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a run is made of, built from the config by `build_run`: what is compiled, what
  it reads, and how long it runs. The loop, the tests and the tools take what they need from it.
  """

  task: tasks.Task
  input_shape: tuple[int, ...]  # One example's input (an image, or a row of token ids).
  num_classes: int  # The student's outputs (classes, or the vocabulary).
  parallel: Parallel
  student: Any  # The student's Flax module.
  student_init: Any  # Open weights to start the student from (config.student.init), or None.
  teachers: dict[str, Teacher]
  teacher_vars: dict[str, Any]  # {} for a teacher read from its cache.
  example: dict[str, jax.Array]  # An all-zeros global batch of the step's shapes.
  side_data: dict[str, dict[str, data_lib.SideData]]  # 'train'/'eval': per-example extras.
  objective: Objective  # Every stage's terms: what the state holds parameters for.
  durations: Durations
  stages: list[Stage]
  student_apply: ApplyFn
  teacher_applies: dict[str, ApplyFn]
  on_policy: Any  # A `generate.OnPolicy`, or None.
  eval_step: Callable
  data_counts: dict[str, Any]  # What reading the data counted (`TaskInfo.counts`), per split.

  @property
  def train_step(self) -> Callable:
    """The main stage's compiled train step."""
    return self.stages[-1].train_step


def build_run(config: ml_collections.ConfigDict) -> Run:
  """Builds everything the loop needs from the config; nothing below reads the config."""
  config_lib.validate(config)
  task = tasks.get_task(config.get("task"))  # validate() checked the name.
  task_info = task.info(config.data)
  input_shape = task_info.input_shape
  cached = [name for name, settings in config.teachers.items() if settings.get("cache")]
  if cached and not task.supports_teacher_cache:
    raise config_lib.ConfigError(
        f"config.teachers.{cached[0]}.cache: task {config.get('task')!r} cannot read teacher "
        "caches yet; unset the cache to run the teacher live.")
  parallel = Parallel(config.parallel.mode, config.parallel.num_devices,
                      **config_lib.parallel_layout(config))
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.eval_batch_size)
  remat = {"remat": True} if config.student.get("remat", False) else {}
  student = models.build_model(config.student.name, task_info.num_classes,
                               bn_axis_name=parallel.bn_axis_name, **remat,
                               **config.student.kwargs)
  student_init = None
  if config.student.get("init"):  # Open weights to start from (models.hf.student_config).
    from distill_jax.models import hf
    student_init = hf.load_student_init(config.student.init, config.student.name,
                                        config.student.kwargs, config.data.get("tokenizer")
                                        or "bytes")
  teachers = load_teachers(config.teachers, task_info.num_classes, input_shape)
  check_tokenizers(teachers, config.data.get("tokenizer"))
  splits = (config.data.train_split, config.data.eval_split)
  # Teachers with a cache: their logits come with the batches instead of from a forward.
  caches = {name: teacher_cache.open_cache(
      settings.cache, teachers[name], task, config.data, seed=config.seed, splits=splits,
      rebuild_hint=f"python scripts/cache_teacher.py --config=... --cache_dir="
                   f"{os.path.dirname(os.path.abspath(settings.cache))} (same data and "
                   "teacher settings as this run)")
      for name, settings in config.teachers.items() if settings.get("cache")}
  teacher_vars = {n: {} if n in caches else t.variables for n, t in teachers.items()}
  side_data = {split: {teacher_cache.batch_key(n): readers[split]
                       for n, readers in caches.items()} for split in splits}
  num_train = task_info.num_examples[config.data.train_split]
  if config.data.get("train_subset", 0):
    num_train = min(num_train, int(config.data.train_subset))
  durations = Durations.from_config(config, num_train)
  # The objective always sees the global batch (under pmap the step gathers it), so its
  # terms need no axis name: their statistics and memory updates are global by construction.
  context = {"num_examples": num_train}
  specs = [(name, stage.losses, stage.get("train", "all")) for name, stage in
           config.stages.items()] + [("train", config.losses, "all")]
  objectives = [build_objective(losses, list(teachers), context, durations.steps_per_epoch)
                for _, losses, _ in specs]
  objective = union_objective(objectives)
  check_cache_top_k(objective, tuple(teachers),
                    {name: (readers[splits[0]].top_k, config.teachers[name].cache)
                     for name, readers in caches.items()})
  student_apply, teacher_applies = build_applies(
      student, config.student.name, teachers, objective, input_shape, cached=tuple(caches),
      student_dtype=config.get("dtype", "float32"), input_key=task.input_key)
  example = task.example_batch(input_shape, config.batch_size,
                               {teacher_cache.batch_key(n): readers[splits[0]].output_shape
                                for n, readers in caches.items()})
  for key, (shape, dtype) in task_info.batch_extras.items():  # E.g. a black-box file's top-k.
    example[key] = jnp.zeros((config.batch_size, *shape), dtype)
  add_contrast_indices(objective, config, num_train, side_data[splits[0]], example)
  # Trace the objective once, abstractly (init and a call): a term whose features do not fit
  # (shapes, connectors) or whose settings are wrong fails here, naming the term and layers,
  # before anything is compiled or trained.
  jax.eval_shape(functools.partial(trace_objective, objective, student_apply, teacher_applies),
                 init_shapes(student, input_shape), teacher_vars, example,
                 jax.random.PRNGKey(0))

  on_policy = None
  if config.get("on_policy") is not None:
    try:
      on_policy = generate.on_policy_from_config(
          config.on_policy, student, text.get_tokenizer(config.data.get("tokenizer", "bytes")),
          int(input_shape[0]))
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
  if on_policy is not None:  # Side data must follow the samples (data.batch_keys).
    stale = batch_keys.rollout_problems(example, task.rollout_keys)
    if stale:
      raise config_lib.ConfigError(
          f"config.on_policy.fraction={on_policy.fraction} replaces the rows by the student's "
          "samples, but these batch keys would still describe the original rows: "
          + "; ".join(stale) + ".")
  accumulate_steps = int(config.optim.get("accumulate_steps", 1))
  parallel.check_batch_size(config.batch_size // accumulate_steps)
  stages, start = [], 0
  plans = stage_schedules(config, durations)
  for (name, _, trainable), stage_objective, (_, steps, schedule) in zip(
      specs, objectives, plans, strict=True):
    tx = optim.freeze_all_but(optim.make_optimizer(config.optim, schedule),
                              train_student=trainable == "all",
                              train_terms={t.name: tuple(getattr(t.fn, "frozen_params", ()))
                                           for t in stage_objective.terms})
    train_step, eval_step = compile_steps(
        parallel, student_apply, teacher_applies, stage_objective, tx, step_offset=start,
        accumulate_steps=accumulate_steps, skip_nonfinite=config.train.on_nonfinite == "skip",
        task=task, on_policy=on_policy if name == "train" else None)
    stages.append(Stage(name, stage_objective, tx, schedule, start, start + steps, train_step))
    start += steps
  return Run(task=task, input_shape=input_shape, num_classes=task_info.num_classes,
             parallel=parallel, student=student, student_init=student_init, teachers=teachers,
             teacher_vars=teacher_vars, example=example,
             side_data={"train": side_data[splits[0]], "eval": side_data[splits[1]]},
             objective=objective, durations=durations, stages=stages,
             student_apply=student_apply, teacher_applies=teacher_applies,
             on_policy=on_policy, eval_step=eval_step, data_counts=dict(task_info.counts))


def add_contrast_indices(objective: Objective, config: ml_collections.ConfigDict,
                         num_train: int, train_side_data: dict[str, data_lib.SideData],
                         example: dict[str, jax.Array]) -> None:
  """For a term that reads per-example contrast ids from the data (`crd` with
  negatives='other_class'), adds `contrast_idx` to the train batches (drawn from the labels,
  per seed) and to the example batch."""
  terms = [t for t in objective.terms if getattr(t.fn, "negatives", None) == "other_class"]
  if not terms:
    return
  if len({(t.fn.num_negatives, t.fn.positive) for t in terms}) > 1:
    raise config_lib.ConfigError(
        f"Loss terms {[t.name for t in terms]} draw negatives from other classes with "
        "different num_negatives/positive; the batch carries one contrast_idx for all.")
  fn = terms[0].fn
  try:
    fn.check_sampling()
  except ValueError as e:
    raise config_lib.ConfigError(f"Loss term {terms[0].name!r}: {e}") from None
  train_side_data["contrast_idx"] = data_lib.class_contrast_indices(
      data_lib.train_labels(config.data, num_train), fn.num_negatives, config.seed, fn.positive)
  example["contrast_idx"] = jnp.zeros((config.batch_size, fn.num_negatives + 1), jnp.int32)


def check_cache_top_k(objective: Objective, teacher_names: tuple[str, ...],
                      caches: dict[str, tuple[int, str]]) -> None:
  """Refuses a term that reads more of a cached teacher's most likely tokens than its cache
  holds: beyond the cache's k the rest of the mass is spread evenly, so the term would
  silently read another teacher. `caches`: {teacher: (its cache's top_k, 0 for all logits; its
  directory)} for the teachers of `teacher_names` that are read from a cache. A loss says
  which of its settings is that number with the attribute `teacher_top_k` (`token_topk_kd`:
  'k')."""
  for term in objective.terms:
    setting = getattr(term.fn, "teacher_top_k", None)
    if setting is None:
      continue
    k = int(term.hparams[setting])
    for name in (n for n in term.teachers_used(teacher_names) if n in caches):
      stored, directory = caches[name]
      if stored and k > stored:
        raise config_lib.ConfigError(
            f"Loss term {term.name!r} ({term.loss}) reads teacher {name!r}'s top {setting}={k} "
            f"tokens, but its cache {directory!r} holds only its top {stored} (the rest is an "
            f"even spread of the remaining mass): set losses.{term.name}.{setting} <= {stored}, "
            f"or rebuild the cache with scripts/cache_teacher.py --top_k={k} (or 0: all "
            "logits).")


def union_objective(objectives: list[Objective]) -> Objective:
  """The terms of all stages, once each by name: what the state must hold parameters for."""
  terms: dict[str, Any] = {}
  for objective in objectives:
    for term in objective.terms:
      if term.name in terms and terms[term.name].loss != term.loss:
        raise config_lib.ConfigError(
            f"Loss term {term.name!r} is loss {terms[term.name].loss!r} in one stage and "
            f"{term.loss!r} in another; a term name must mean one loss in every stage.")
      terms.setdefault(term.name, term)
  return Objective(tuple(terms.values()))


def build_applies(student: Any, student_name: str, teachers: dict[str, Teacher],
                  objective: Objective, input_shape: tuple[int, ...],
                  cached: tuple[str, ...] = (), student_dtype: str | None = None,
                  input_key: str = "image") -> tuple[ApplyFn, dict[str, ApplyFn]]:
  """The student's and teachers' forwards, tapping what the objective compares.

  `student_dtype` (and each teacher's `dtype`) is the forward's compute dtype (see
  `features.make_apply`): params and optimizer state stay float32.

  Every requested feature is checked against the model's tappable features first; an unknown
  name fails with the list of what can be tapped. A `cached` teacher's forward reads its
  logits from the batch, so no term may ask for its features.
  """
  student_vars = init_shapes(student, input_shape)
  check_features(f"Student {student_name}", objective.student_features,
                 list_features(student, student_vars, input_shape))
  for name, teacher in teachers.items():
    wanted = objective.teacher_features(name)
    if name in cached and wanted:
      users = [t.name for t in objective.terms if t.teacher_features.get(name)]
      raise config_lib.ConfigError(
          f"Teacher {name!r} is read from its cache (config.teachers.{name}.cache), which "
          f"holds logits only, but loss term(s) {users} compare its features {list(wanted)}. "
          f"Run it live (unset config.teachers.{name}.cache) or drop those terms.")
    check_features(f"Teacher {name!r} ({teacher.model})", wanted,
                   list_features(teacher.module, teacher.variables,
                                 teacher.input_shape(input_shape)))
  return (make_apply(student, input_key=input_key, features=objective.student_features,
                     dtype=student_dtype),
          {name: teacher_cache.cached_apply(name) if name in cached else
           make_apply(t.module, input_key=input_key, features=objective.teacher_features(name),
                      input_size=t.input_size, dtype=t.dtype)
           for name, t in teachers.items()})


def compile_steps(parallel: Parallel, student_apply: ApplyFn,
                  teacher_applies: dict[str, ApplyFn], objective: Objective,
                  tx: Any, step_offset: int = 0, accumulate_steps: int = 1,
                  skip_nonfinite: bool = False, task: tasks.Task = step_lib.CLASSIFICATION,
                  on_policy: Any = None) -> tuple[Callable, Callable]:
  """The compiled (train_step, eval_step) of the forwards and the objective, for `task`
  (with `on_policy`, a `generate.OnPolicy`, the train step samples on-policy batches)."""
  static = dict(student_apply=student_apply, teacher_applies=teacher_applies, task=task)
  policy = {"on_policy": on_policy} if on_policy is not None else {}
  return (parallel.compile_train_step(objective=objective, tx=tx, step_offset=step_offset,
                                      accumulate_steps=accumulate_steps,
                                      skip_nonfinite=skip_nonfinite, **policy, **static),
          parallel.compile_eval_step(**static))


def example_batch(image_shape: tuple[int, ...], batch_size: int,
                  cached_logits: dict[str, tuple[int, ...]] | None = None
                  ) -> dict[str, jax.Array]:
  """An all-zeros classification batch of the shapes the step sees, with `cached_logits`
  {batch key: one example's logits shape} for the teachers read from a cache
  (`tasks.Task.example_batch` for any task)."""
  return step_lib.CLASSIFICATION.example_batch(image_shape, batch_size, cached_logits)


def init_objective(objective: Objective, student_apply: ApplyFn,
                   teacher_applies: dict[str, ApplyFn], student_vars: Any, teacher_vars: Any,
                   batch: dict[str, jax.Array], rng: jax.Array) -> tuple[Any, Any]:
  """The objective's initial (params, state), from the forwards on an example batch."""
  student = student_apply(student_vars, batch, False)
  teachers = {n: apply(teacher_vars[n], batch, False) for n, apply in teacher_applies.items()}
  return objective.init(rng, student, teachers, batch)


def trace_objective(objective: Objective, student_apply: ApplyFn,
                    teacher_applies: dict[str, ApplyFn], student_vars: Any, teacher_vars: Any,
                    batch: dict[str, jax.Array], rng: jax.Array) -> Any:
  """Initialises the objective and evaluates it once (for `jax.eval_shape`: checks only)."""
  params, state = init_objective(objective, student_apply, teacher_applies, student_vars,
                                 teacher_vars, batch, rng)
  student = student_apply(student_vars, batch, False)
  teachers = {n: apply(teacher_vars[n], batch, False) for n, apply in teacher_applies.items()}
  return objective(params, state, student, teachers, batch, jnp.zeros((), jnp.int32), rng)


def init_state(config: ml_collections.ConfigDict, run: Run,
               stage: Stage | None = None) -> TrainState:
  """The initial state, derived from `config.seed` alone, with `stage`'s optimizer state
  (default: the first stage's)."""
  init_rng, objective_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  dummy = jnp.zeros((1, *run.input_shape), jnp.float32)
  variables = jax.jit(lambda r: run.student.init(r, dummy, train=False))(init_rng)
  if run.student_init is not None:  # config.student.init: open weights.
    variables = {**variables, "params": jax.tree.map(
        lambda new, old: jnp.asarray(new, old.dtype), run.student_init["params"],
        variables["params"])}
  objective_params, objective_state = {}, {}
  if any(term.is_module for term in run.objective.terms):
    objective_params, objective_state = jax.jit(functools.partial(
        init_objective, run.objective, run.student_apply, run.teacher_applies))(
            variables, run.teacher_vars, run.example, objective_rng)
  tx = (stage or run.stages[0]).tx
  return create_train_state(variables, objective_params, objective_state, tx, state_rng)


def stage_at(stages: list[Stage], step: int) -> Stage:
  """The stage whose step ran last before global step `step` (the one a checkpoint at `step`
  was saved in); the first stage for step 0."""
  for stage in stages:
    if step <= stage.end and (step > stage.start or stage.start == 0):
      return stage
  return stages[-1]


# Write errors that stop a run cleanly (one line; the workdir stays resumable).
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)

# Settings whose change on resume is not a change of the run (where it runs, how it shows):
# these keys, and every key under these prefixes (the devices and processes a run is laid out
# on: a restore reshards the same state onto any layout, and a relaunch gets a new port; where
# metrics go: a tracker added on resume is sent the metrics so far).
IGNORED_CHANGES = ("allow_config_change", "progress_bar", "data.data_dir")
IGNORED_PREFIXES = ("parallel.", "log.")


def config_changes(saved_json: str | None, config: ml_collections.ConfigDict) -> list[str]:
  """'key: old -> new' for every setting that differs between a checkpoint's config (JSON)
  and `config`, but the `IGNORED_CHANGES` and `IGNORED_PREFIXES`."""
  if not saved_json:
    return []

  def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
      return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

  old, new = flat(json.loads(saved_json)), flat(json.loads(config_lib.to_json(config)))
  return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k not in IGNORED_CHANGES
          and not k.startswith(IGNORED_PREFIXES)]


def state_mismatch(step_dir: str, saved_json: str, config: ml_collections.ConfigDict,
                   changes: list[str], show: int = 6) -> str:
  """Why the checkpoint in `step_dir` cannot be resumed with `config`, in one line: the model
  it was saved from and the one the config asks for (or, the same model, other parameter
  shapes), the first `show` changed settings, and what to do."""
  old = (json.loads(saved_json).get("student") or {}).get("name")
  new = config.student.name
  more = f"; and {len(changes) - show} more" if len(changes) > show else ""
  changed = f" (changed: {'; '.join(changes[:show])}{more})"
  if old and old != new:
    return (f"The checkpoint in {step_dir} was saved from model {old!r} and the config asks "
            f"for {new!r}{changed}: use another --workdir for {new!r}, or the same model "
            f"(--config.student.name={old}).")
  return (f"The checkpoint in {step_dir} was saved with other parameter shapes than this "
          f"config builds{changed}: use another --workdir for the new config, or the settings "
          "it was saved with.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: Callable[[int, dict], None] | None = None
                       ) -> dict[str, Any]:
  """Trains (resuming if `workdir` has checkpoints), evaluates, and writes `result.json`.

  The config is validated and everything is built before `workdir` is created or touched; the
  workdir is then locked for this run (`train.workdir`). SIGTERM/SIGINT stop the run at the
  next step boundary after a checkpoint (`train.signals.Interrupted`).

  Args:
    config: a run config (see `distill_jax.config.base_config`).
    workdir: the run's directory; created if missing.
    step_callback: called as `fn(step, metrics)` after every step (metrics are device
      arrays); for instrumentation and tests.
  Returns:
    The result dict also written to `workdir/result.json`.
  """
  workdir = os.path.abspath(workdir)
  run = build_run(config)  # Validates the config first; writes nothing.
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0), StopSignals() as stop:
    try:
      return _train(config, workdir, run, stop, step_callback)
    except OSError as e:
      if e.errno not in DISK_ERRORS:
        raise
      raise WorkdirWriteError(
          f"Could not write in {workdir}: {e.strerror} ({e.filename or 'a file'}). Its last "
          "complete checkpoint is intact: fix the cause (e.g. free disk space) and rerun the "
          "same command to resume.") from e


def _resume(config: ml_collections.ConfigDict, run: Run, checkpointer: Checkpointer,
            step: int) -> tuple[TrainState, dict, dict]:
  """Restores checkpoint `step`, refusing (before anything is written) a config that differs
  from the checkpoint's unless `config.allow_config_change`, and always one that changes the
  state's structure."""
  target = init_state(config, run, stage_at(run.stages, step))
  try:
    state, data_state, meta = checkpointer.restore(step, target)
  except CheckpointError as e:
    saved = checkpointer.read_meta(step).get("config")
    changes = config_changes(saved, config)
    if not changes:
      raise
    raise config_lib.ConfigError(state_mismatch(checkpointer.step_dir(step), saved, config,
                                                changes)) from e  # The library's text: -v.
  changes = config_changes(meta.get("config"), config)
  if changes and not config.get("allow_config_change", False):
    raise config_lib.ConfigError(
        f"The config differs from the one {checkpointer.step_dir(step)} was written with: "
        f"{'; '.join(changes)}. Resume with the same config, or pass "
        "--config.allow_config_change=True to continue with the new values.")
  for change in changes:
    logging.warning("Resuming with a changed setting: %s", change)
  jump = lr_jump(meta.get("config"), config, run.durations, step) if changes else None
  if jump:
    logging.warning(jump)
  return state, data_state, meta


def _train(config: ml_collections.ConfigDict, workdir: str, run: Run, stop: StopSignals,
           step_callback: Callable[[int, dict], None] | None) -> dict[str, Any]:
  """The run proper, in a locked workdir (see `train_and_evaluate`): every stage in turn, from
  wherever the last checkpoint left off, then the final evaluation and `result.json`."""
  session = _Session.start(config, workdir, run)
  try:
    for stage in run.stages:
      session.train_stage(stage, stop, step_callback)
    session.bar.close()
    return session.finish()
  finally:
    session.close()


def _best_key(task: tasks.Task) -> str:
  """The `result.json` key of the best headline: 'best_top1' for classification."""
  return f"best_{task.headline}"


@dataclasses.dataclass
class _Session:
  """A run under way in its workdir: the state and where it is, and what it reads and writes
  (data position, checkpoints, metrics, progress). `record` is what the run has done besides its
  state (eval history, best headline, time, skipped steps); every checkpoint's meta holds it."""

  config: ml_collections.ConfigDict
  workdir: str
  run: Run
  state: TrainState
  step: int
  record: dict[str, Any]
  teacher_vars: Any
  train_iter: Any
  checkpointer: Checkpointer
  writer: MetricWriter
  guard: NonFiniteGuard
  bar: Progress
  sampler: Any
  meta: dict[str, Any]
  last_saved: int | None
  seconds_before: float  # Training seconds of the earlier launches of this run.
  started: float = dataclasses.field(default_factory=time.time)  # This launch's.
  completed: bool = False  # `finish` wrote result.json.

  @property
  def best_key(self) -> str:
    return _best_key(self.run.task)

  @classmethod
  def start(cls, config: ml_collections.ConfigDict, workdir: str, run: Run) -> _Session:
    """Resumes from the latest good checkpoint, or starts from `config.seed`."""
    task, parallel = run.task, run.parallel
    train_iter = task.train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        side_data=run.side_data["train"])
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                keep=config.keep_checkpoints,
                                every_steps=run.durations.checkpoint_every)
    record = {"history": [], _best_key(task): -1.0 if task.higher_is_better else math.inf,
              "best_step": 0, "train_seconds": 0.0, "skipped_steps": 0, "consecutive_skips": 0}
    latest = checkpointer.latest_good_step()
    if latest is None:
      state = init_state(config, run)
    else:
      state, data_state, saved_meta = _resume(config, run, checkpointer, latest)
      train_iter.set_state(data_state)
      record.update(saved_meta.get("record", {}))
      logging.info("Resumed from %s.", checkpointer.step_dir(latest))
    is_chief = jax.process_index() == 0
    if is_chief:
      write_atomic(os.path.join(workdir, "config.json"), config_lib.to_json(config))
    guard = NonFiniteGuard(config.train.on_nonfinite, config.train.max_consecutive_skips,
                           record["skipped_steps"], record["consecutive_skips"])
    teacher_vars = parallel.put_teachers(run.teacher_vars)
    state = parallel.put_state(jax.device_get(state))
    step = int(parallel.get(state).step)
    writer = MetricWriter(workdir, resume_step=step, writers=config.log.writers,
                          settings=config.log.to_dict(),
                          run_config=json.loads(config_lib.to_json(config)))
    total_steps = run.stages[-1].end
    logging.info("Training %s for %d steps (%s; %d per epoch) on %d %s device(s), mode %s.",
                 config.student.name, total_steps,
                 ", ".join(f"{s.name}: {s.end - s.start}" for s in run.stages),
                 run.durations.steps_per_epoch, parallel.num_devices,
                 parallel.devices[0].platform, parallel.mode)
    sampler = generate.EvalSampler.from_config(config, run.student, run.teacher_applies,
                                               run.on_policy)
    return cls(config=config, workdir=workdir, run=run, state=state, step=step, record=record,
               teacher_vars=teacher_vars, train_iter=train_iter, checkpointer=checkpointer,
               writer=writer, guard=guard,
               bar=Progress(total_steps, step, enabled=is_chief,
                            show_bar=config.progress_bar),
               sampler=sampler,
               meta={"student": config.student.name, "config": config_lib.to_json(config)},
               last_saved=latest, seconds_before=record["train_seconds"])

  def train_stage(self, stage: Stage, stop: StopSignals,
                  step_callback: Callable[[int, dict], None] | None) -> None:
    """Runs `stage` from the current step to its end: a step per batch; logs, evals and
    checkpoints on their schedules; a stop signal ends the run at a checkpointed step."""
    run, parallel = self.run, self.run.parallel
    if self.step >= stage.end:
      return
    if self.step == stage.start:  # Entering the stage: a fresh optimizer state, as in the recipes.
      host = parallel.to_host(self.state)
      self.state = parallel.put_state(host.replace(opt_state=stage.tx.init(host.params)))
    is_main = stage is run.stages[-1]
    prefix = "train" if is_main else stage.name
    eval_every, total_steps = run.durations.eval_every, run.stages[-1].end
    self.bar.stage(prefix)
    while self.step < stage.end:
      batch = next(self.train_iter)
      self.state, metrics = stage.train_step(self.state, self.teacher_vars,
                                             parallel.put_batch(batch))
      self.step += 1
      step = self.step
      self.bar.step()
      self.guard.add(step, parallel.get(metrics))
      if step_callback is not None:
        step_callback(step, metrics)
      log = step % run.durations.log_every == 0 or step == stage.end
      eval_here = is_main and ((eval_every and (step - stage.start) % eval_every == 0)
                               or step == total_steps)
      # A signal is acted on at the step where it is first seen, so the step it stops at is the
      # step it saved (one arriving during this step's logs or eval waits for the next).
      stopping = stop.requested
      save = self.checkpointer.should_save(step) or step == stage.end or stopping
      if not (log or eval_here or save):
        continue
      self.guard.check(self.last_saved)  # Nothing non-finite gets past this line.
      if log:
        scalars = _host_scalars(parallel.get(metrics))
        scalars["lr"] = float(stage.schedule(step - 1 - stage.start))
        self.writer.write(step, {f"{prefix}/{k}": v for k, v in scalars.items()})
        self.bar.train(scalars)
      if eval_here:
        self.evaluate_and_record()
      if save:
        self.save()
      if stopping:
        raise Interrupted(stop.signum, step)

  def evaluate(self) -> dict[str, float]:
    """The eval metrics at the current step (and, for language models, a few samples, with
    the on-policy metrics), written to the metrics."""
    run, parallel, config = self.run, self.run.parallel, self.config
    scalars = evaluate(parallel, run.eval_step, self.state, self.teacher_vars, config.data,
                       config.eval_batch_size, run.side_data["eval"], task=run.task)
    if self.sampler is not None:
      texts, extra = self.sampler(parallel.get(self.state).student_variables(),
                                  parallel.get(self.teacher_vars), seed=config.seed)
      scalars.update({f"eval/{k}": v for k, v in extra.items()})
      for i, sample_text in enumerate(texts):
        logging.info("Sample %d at step %d: %r", i, self.step, sample_text)
      self.writer.write_texts(self.step, {f"samples/{i}": t for i, t in enumerate(texts)})
    self.writer.write(self.step, scalars)
    return scalars

  def evaluate_and_record(self) -> None:
    """`evaluate`, shown, added to the history, and the best headline kept."""
    task, record = self.run.task, self.record
    scalars = self.evaluate()
    self.bar.eval(self.step, scalars)
    record["history"].append({"step": self.step, **scalars})
    if task.is_better(scalars[f"eval/{task.headline}"], record[self.best_key]):
      record[self.best_key], record["best_step"] = scalars[f"eval/{task.headline}"], self.step

  def save(self) -> None:
    """A checkpoint of the state, the data position and the record at the current step."""
    self.record.update(train_seconds=self.seconds_before + time.time() - self.started,
                       skipped_steps=self.guard.skipped,
                       consecutive_skips=self.guard.consecutive)
    self.checkpointer.save(self.step, self.run.parallel.get(self.state),
                           self.train_iter.get_state(), {**self.meta, "record": self.record})
    self.last_saved = self.step

  def finish(self) -> dict[str, Any]:
    """The final eval (unless the last step had one), the exported student, `result.json`."""
    config, run, task, record, step = self.config, self.run, self.run.task, self.record, self.step
    history = record["history"]
    final = (history[-1] if history and history[-1]["step"] == step
             else {"step": step, **self.evaluate()})
    host_state = run.parallel.to_host(self.state)
    # Every process: the export is a collective save (process 0 writes the files).
    export_model(os.path.join(self.workdir, "model"), host_state.student_variables(), {
        "model": config.student.name, "kwargs": config.student.kwargs.to_dict(),
        "num_classes": run.num_classes, "input_shape": list(run.input_shape), "step": step})
    headline = final[f"eval/{task.headline}"]
    final_is_best = task.is_better(headline, record[self.best_key])
    result = {
        "student": config.student.name,
        "teachers": {n: t.model for n, t in run.teachers.items()},
        "losses": sorted(config.losses), "steps": step, "seed": config.seed,
        "final": final, self.best_key: headline if final_is_best else record[self.best_key],
        "best_step": step if final_is_best else record["best_step"],
        "train_seconds": record["train_seconds"], "skipped_steps": self.guard.skipped,
    }
    if run.data_counts:  # E.g. a black-box file's records and unmapped alternatives.
      result["data"] = run.data_counts
    if jax.process_index() == 0:
      write_atomic(os.path.join(self.workdir, "result.json"),
                   json.dumps(result, indent=2, sort_keys=True))
    self.completed = True
    return result

  def close(self) -> None:
    self.bar.close()
    self.writer.close(completed=self.completed)
    self.checkpointer.close()


def train_generations(config: ml_collections.ConfigDict, workdir: str, **kwargs: Any
                      ) -> dict[str, Any]:
  """`train_and_evaluate`, or with `config.generations > 1` born-again networks.

  Generation 0 runs the config as it is (e.g. distilled from its teacher, or trained alone);
  generation g distills the same student architecture from generation g - 1's exported model.
  Each generation lives in `workdir/gen{g}` and resumes like any run, so an interrupted chain
  continues where it stopped. Returns the last generation's result, with `generations` (every
  generation's final metrics), also written to `workdir/result.json` (and the list alone to
  `workdir/generations.json`).
  """
  generations = int(config.get("generations", 1))
  if generations == 1:
    return train_and_evaluate(config, workdir, **kwargs)
  results = []
  for g in range(generations):
    gen_config = ml_collections.ConfigDict(config.to_dict())
    if g > 0:
      gen_config.teachers = ml_collections.ConfigDict({"teacher": config_lib.teacher_config(
          config.student.name, config.student.kwargs.to_dict(),
          os.path.join(workdir, f"gen{g - 1}"))})
      for term in gen_config.losses.values():
        if term.get("teacher") is not None:
          term.teacher = "teacher"
    gen_config.generations = 1
    gen_config.lock()
    logging.info("Born-again generation %d of %d (gen%d).", g + 1, generations, g)
    results.append(train_and_evaluate(gen_config, os.path.join(workdir, f"gen{g}"), **kwargs))
  result = {**results[-1], "generations": [r["final"] for r in results]}
  if jax.process_index() == 0:
    write_atomic(os.path.join(workdir, "generations.json"),
                 json.dumps(result["generations"], indent=2, sort_keys=True))
    # The chain's result, where every run has it (sweeps and reports read it there).
    write_atomic(os.path.join(workdir, "result.json"), json.dumps(result, indent=2,
                                                                  sort_keys=True))
  return result
