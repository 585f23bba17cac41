"""Building a run: config -> `Run` (the task, the devices, the student and teachers, the
stages with their compiled steps, the durations and the session's `RunSettings`).

`build_run` is the one place that reads a run's config; the session (`train.loop`) and the
tools take what they need from the `Run` it returns. It validates everything it can before
anything is compiled or written: a wrong setting fails here, in one line, naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from distill_jax import config as config_lib
from distill_jax import data as data_lib
from distill_jax import models, optim, tasks
from distill_jax.data import teacher_cache
from distill_jax.data.text import cross_tokenizer
from distill_jax.losses.objective import Objective, build_objective
from distill_jax.models.forward import ApplyFn
from distill_jax.teachers import Teacher, init_shapes, load_teachers, student_masks_documents
from distill_jax.train.compiled import build_applies, compile_steps, init_objective, trace_objective
from distill_jax.train.parallel import Parallel
from distill_jax.train.state import TrainState, create_train_state


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



@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The config's settings that the session reads as they are (seed, batch sizes, checkpoint
  keeping, what a non-finite step does, where metrics go, what `result.json` names), taken
  once by `build_run`, so that nothing after it reads the config."""

  seed: int
  batch_size: int
  eval_batch_size: int
  data: ml_collections.ConfigDict  # config.data, handed to the task's iterators unread.
  keep_checkpoints: int
  on_nonfinite: str  # 'stop' or 'skip' (config.train.on_nonfinite).
  max_consecutive_skips: int
  allow_config_change: bool
  progress_bar: bool
  log_writers: Any  # config.log.writers: the metric writers' names.
  log_settings: dict[str, Any]  # config.log as a dict: the writers' settings.
  student_name: str
  student_kwargs: dict[str, Any]
  losses: tuple[str, ...]  # The main stage's loss term names, sorted.
  config_json: str  # The whole config as JSON: config.json, checkpoint meta, resume checks.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> RunSettings:
    return cls(seed=config.seed, batch_size=config.batch_size,
               eval_batch_size=config.eval_batch_size, data=config.data,
               keep_checkpoints=config.keep_checkpoints,
               on_nonfinite=config.train.on_nonfinite,
               max_consecutive_skips=config.train.max_consecutive_skips,
               allow_config_change=bool(config.get("allow_config_change", False)),
               progress_bar=config.progress_bar, log_writers=config.log.writers,
               log_settings=config.log.to_dict(), student_name=config.student.name,
               student_kwargs=config.student.kwargs.to_dict(),
               losses=tuple(sorted(config.losses)), config_json=config_lib.to_json(config))


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


def lr_jump(saved_json: str | None, run: Run, step: int) -> str | None:
  """When resuming `run` at `step` from a checkpoint whose config (`saved_json`) schedules the
  learning rate differently (e.g. a smaller num_steps: a cosine over the shorter run), a
  message with the next step's learning rate under each; None when they agree."""
  if not saved_json:
    return None
  saved = ml_collections.ConfigDict(json.loads(saved_json))
  durations = run.durations
  saved_durations = dataclasses.replace(durations, total_steps=(
      int(saved.num_steps) if saved.num_steps > 0
      else int(round(saved.num_epochs * durations.steps_per_epoch))))
  old = lr_at(saved, saved_durations, step)
  new = next((float(s.schedule(step - s.start)) for s in run.stages if step < s.end), 0.0)
  if math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-12):
    return None
  return (f"The learning rate jumps at step {step + 1}: {old:.6g} under the checkpoint's "
          f"schedule (over {saved_durations.total_steps} steps), {new:.6g} under this "
          f"config's (over {durations.total_steps} steps). The run follows this config's "
          "schedule from here, as if it had been set from the start; it does not continue the "
          "checkpoint's decay.")


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
  it reads, how long it runs, and the settings the session reads. The loop, the tests and the
  tools take what they need from it.
  """

  task: tasks.Task
  input_shape: tuple[int, ...]  # One example's input (an image, or a row of token ids).
  num_classes: int  # The student's outputs (classes, or the vocabulary).
  parallel: Parallel
  student: Any  # The student's Flax module.
  student_init: Any  # Weights the student starts from (`Task.student_init`), or None.
  teachers: dict[str, Teacher]
  teacher_vars: dict[str, Any]  # {} for a teacher read from its cache.
  example: dict[str, jax.Array]  # An all-zeros global batch of the step's shapes.
  side_data: dict[str, dict[str, data_lib.SideData]]  # 'train'/'eval': per-example extras.
  objective: Objective  # Every stage's terms: what the state holds parameters for.
  durations: Durations
  stages: list[Stage]
  student_apply: ApplyFn
  teacher_applies: dict[str, ApplyFn]
  extras: tasks.TaskExtras  # The task's own: open weights, on-policy rollout, eval samples.
  eval_step: Callable
  data_counts: dict[str, Any]  # What reading the data counted (`TaskInfo.counts`), per split.
  settings: RunSettings

  @property
  def train_step(self) -> Callable:
    """The main stage's compiled train step."""
    return self.stages[-1].train_step


def build_run(config: ml_collections.ConfigDict) -> Run:
  """Builds everything the session needs from the config, checking it on the way (every
  check before anything is compiled); nothing after this reads the config."""
  config_lib.validate(config)
  task = tasks.get_task(config.get("task"))  # validate() checked the name.
  task_info = task.info(config.data)
  input_shape = task_info.input_shape
  _check_cache_support(config, task)
  parallel = Parallel(config.parallel.mode, config.parallel.num_devices,
                      **config_lib.parallel_layout(config))
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.eval_batch_size)
  student = _build_student(config, task_info.num_classes, parallel)
  student_init = task.student_init(config)  # E.g. open weights (config.student.init).
  # Open-weights teachers are read straight into the shards the step takes them in (jit).
  teachers = load_teachers(
      config.teachers, task_info.num_classes, input_shape,
      mask_documents=student_masks_documents(config),
      shardings=parallel.teacher_shardings_of if parallel.mode == "jit" else None)
  task.check_teachers(teachers, config)
  splits = (config.data.train_split, config.data.eval_split)
  caches = _open_caches(config, teachers, task, splits)
  # The models' tensor-parallel rules (a live teacher's too; a cached one runs no forward).
  parallel.declare_models(student, {n: t.module for n, t in teachers.items() if n not in caches})
  teacher_vars = {n: {} if n in caches else t.variables for n, t in teachers.items()}
  side_data = {split: {teacher_cache.batch_key(n): readers[split]
                       for n, readers in caches.items()} for split in splits}
  # Teachers with their own tokenizer: their rows and alignment (side data), vocabulary maps.
  cross = cross_tokenizer.from_config(config.teachers, config.data, splits)
  for split in splits:
    side_data[split].update(cross.side_data.get(split, {}))
  num_train = task_info.num_examples[config.data.train_split]
  if config.data.get("train_subset", 0):
    num_train = min(num_train, int(config.data.train_subset))
  durations = Durations.from_config(config, num_train)
  specs, objectives = _stage_objectives(config, list(teachers), num_train,
                                        durations.steps_per_epoch)
  objective = union_objective(objectives)
  check_cache_top_k(objective, tuple(teachers),
                    {name: (readers[splits[0]].top_k, config.teachers[name].cache)
                     for name, readers in caches.items()})
  student_apply, teacher_applies = build_applies(
      student, config.student.name, teachers, objective, input_shape, cached=tuple(caches),
      student_dtype=config.get("dtype", "float32"), input_key=task.input_key,
      fused_logits=config.get("fused_logits", 0), vocab_maps=cross.vocab_maps,
      cache_top_k={n: (task_info.num_classes, readers[splits[0]].top_k)
                   for n, readers in caches.items() if readers[splits[0]].top_k})
  example = _example(config, task, task_info, {
      teacher_cache.batch_key(n): readers[splits[0]].batch_shape for n, readers in caches.items()})
  for key, (shape, dtype) in cross.shapes.items():
    example[key] = jnp.zeros((config.batch_size, *shape), dtype)
  add_side_data(objective, config, num_train, side_data[splits[0]], example)
  # Trace the objective once, abstractly (init and a call): a term whose features do not fit
  # (shapes, connectors) or whose settings are wrong fails here, naming the term and layers,
  # before anything is compiled or trained.
  jax.eval_shape(functools.partial(trace_objective, objective, student_apply, teacher_applies),
                 init_shapes(student, input_shape), teacher_vars, example,
                 jax.random.PRNGKey(0))
  extras = task.build_extras(config, student, example=example, teacher_applies=teacher_applies,
                             teachers=teachers)
  stages, eval_step = _build_stages(config, task, parallel, specs, objectives, durations,
                                    student_apply, teacher_applies, extras.on_policy)
  return Run(task=task, input_shape=input_shape, num_classes=task_info.num_classes,
             parallel=parallel, student=student, student_init=student_init, teachers=teachers,
             teacher_vars=teacher_vars, example=example,
             side_data={"train": side_data[splits[0]], "eval": side_data[splits[1]]},
             objective=objective, durations=durations, stages=stages,
             student_apply=student_apply, teacher_applies=teacher_applies, extras=extras,
             eval_step=eval_step, data_counts=dict(task_info.counts),
             settings=RunSettings.from_config(config))


def _check_cache_support(config: ml_collections.ConfigDict, task: tasks.Task) -> None:
  """Refuses a teacher cache under a task that cannot read one."""
  cached = [name for name, settings in config.teachers.items() if settings.get("cache")]
  if cached and not task.supports_teacher_cache:
    raise config_lib.ConfigError(
        f"config.teachers.{cached[0]}.cache: task {config.get('task')!r} cannot read teacher "
        "caches yet; unset the cache to run the teacher live.")


def _build_student(config: ml_collections.ConfigDict, num_classes: int, parallel: Parallel
                   ) -> Any:
  """The student's Flax module (the task's `student_init` may give weights to start it
  from)."""
  remat = {"remat": True} if config.student.get("remat", False) else {}
  return models.build_model(config.student.name, num_classes,
                            bn_axis_name=parallel.bn_axis_name, **remat, **config.student.kwargs)


def _open_caches(config: ml_collections.ConfigDict, teachers: dict[str, Teacher],
                 task: tasks.Task, splits: tuple[str, str]) -> dict[str, Any]:
  """{teacher: {split: its cache's reader}} for the teachers with a cache: their logits come
  with the batches instead of from a forward."""
  return {name: teacher_cache.open_cache(
      settings.cache, teachers[name], task, config.data, seed=config.seed, splits=splits,
      rebuild_hint=f"python scripts/cache_teacher.py --config=... --cache_dir="
                   f"{os.path.dirname(os.path.abspath(settings.cache))} (same data and "
                   "teacher settings as this run)")
      for name, settings in config.teachers.items() if settings.get("cache")}


def _stage_objectives(config: ml_collections.ConfigDict, teacher_names: list[str],
                      num_train: int, steps_per_epoch: int
                      ) -> tuple[list[tuple[str, Any, str]], list[Objective]]:
  """Every stage's (name, loss configs, what it trains: 'all' or the objective's own
  parameters) and objective, in the order they run: `config.stages`, then 'train'."""
  # The objective always sees the global batch (under pmap the step gathers it), so its
  # terms need no axis name: their statistics and memory updates are global by construction.
  context = {"num_examples": num_train}
  specs = [(name, stage.losses, stage.get("train", "all")) for name, stage in
           config.stages.items()] + [("train", config.losses, "all")]
  return specs, [build_objective(losses, teacher_names, context, steps_per_epoch)
                 for _, losses, _ in specs]


def _example(config: ml_collections.ConfigDict, task: tasks.Task, task_info: Any,
             cached_logits: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
  """The all-zeros global batch of the step's shapes: the task's keys, the cached teachers'
  logits, and the data's extras (e.g. a black-box file's top-k)."""
  example = task.example_batch(task_info.input_shape, config.batch_size, cached_logits)
  for key, (shape, dtype) in task_info.batch_extras.items():
    example[key] = jnp.zeros((config.batch_size, *shape), dtype)
  return example


def _build_stages(config: ml_collections.ConfigDict, task: tasks.Task, parallel: Parallel,
                  specs: list[tuple[str, Any, str]], objectives: list[Objective],
                  durations: Durations, student_apply: ApplyFn,
                  teacher_applies: dict[str, ApplyFn], on_policy: Any
                  ) -> tuple[list[Stage], Callable]:
  """Every stage with its optimizer and compiled train step, in order, and the compiled eval
  step (on-policy sampling in the main stage only)."""
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
  return stages, eval_step


def add_side_data(objective: Objective, config: ml_collections.ConfigDict, num_train: int,
                  train_side_data: dict[str, data_lib.SideData],
                  example: dict[str, jax.Array]) -> None:
  """Adds the per-example data that the objective's terms declare (a loss's `side_data()`,
  `losses.base.SideDataNeed`; e.g. `crd` with negatives='other_class' reads `contrast_idx`,
  drawn from the labels per seed) to the train batches and to the example batch. Terms that
  read one batch key must declare it alike: the batch carries one array per key."""
  needs: dict[str, tuple[Any, list[str]]] = {}
  for term in objective.terms:
    declare = getattr(term.fn, "side_data", None)
    try:
      declared = declare() if declare is not None else ()
    except ValueError as e:
      raise config_lib.ConfigError(f"Loss term {term.name!r}: {e}") from None
    for need in declared:
      first, names = needs.setdefault(need.key, (need, []))
      names.append(term.name)
      if need != first:
        raise config_lib.ConfigError(
            f"Loss terms {names} read batch key {need.key!r} with different settings "
            f"({dict(first.settings)} vs {dict(need.settings)}); the batch carries one "
            f"{need.key} for all.")
  for key, (need, _) in needs.items():
    train_side_data[key] = data_lib.build_side_data(
        need.builder, dict(need.settings), config.data, num_train, config.seed)
    example[key] = jnp.zeros((config.batch_size, *need.shape), need.dtype)


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


def init_state(config: ml_collections.ConfigDict | RunSettings, run: Run,
               stage: Stage | None = None) -> TrainState:
  """The initial state of `run`, derived from the seed alone (`config.seed`: the run's config,
  or its `run.settings`), with `stage`'s optimizer state (default: the first stage's)."""
  init_rng, objective_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  dummy = jnp.zeros((1, *run.input_shape), jnp.float32)
  variables = jax.jit(lambda r: run.student.init(r, dummy, train=False))(init_rng)
  if run.student_init is not None:  # The task's (open weights: config.student.init).
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


def generation_configs(config: ml_collections.ConfigDict, workdir: str
                       ) -> list[tuple[ml_collections.ConfigDict, str]]:
  """The (config, workdir) of every run of a born-again chain (`config.generations`): just
  `(config, workdir)` for one generation; else generation 0 runs the config as it is in
  `workdir/gen0`, and generation g distills the same student architecture from generation
  g - 1's exported model in `workdir/gen{g}`."""
  generations = int(config.get("generations", 1))
  if generations == 1:
    return [(config, workdir)]
  chain = []
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
    chain.append((gen_config, os.path.join(workdir, f"gen{g}")))
  return chain
