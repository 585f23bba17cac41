"""The run: config -> builders -> compiled step -> loop -> checkpoints, metrics, result.json.

`train_and_evaluate(config, workdir)` is everything the CLI does. It resumes from the latest
checkpoint in `workdir/checkpoints` (state and data position), so a killed run restarted with
the same command ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
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
from tqdm import tqdm

from distill_jax import config as config_lib
from distill_jax import data as data_lib
from distill_jax import models
from distill_jax.data import teacher_cache
from distill_jax.features import ApplyFn, check_features, list_features, make_apply
from distill_jax.objective import Objective, build_objective
from distill_jax.teachers import Teacher, init_shapes, load_teachers
from distill_jax.train import optim
from distill_jax.train.checkpoint import Checkpointer, export_model
from distill_jax.train.metrics import MetricWriter
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


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the terms."""


def _host_scalars(metrics: Any) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, scalars: dict[str, float]) -> None:
  bad = sorted(k for k, v in scalars.items() if k.startswith("loss") and not math.isfinite(v))
  if bad:
    raise NonFiniteLossError(
        f"Non-finite loss at step {step}: " + ", ".join(f"{k}={scalars[k]}" for k in bad) +
        ". No checkpoint was written with it; lower the learning rate or check the loss term.")


def evaluate(parallel: Parallel, eval_step: Callable, state: Any, teacher_vars: Any,
             data_config: Any, batch_size: int,
             side_data: dict[str, data_lib.SideData] | None = None) -> dict[str, float]:
  """Top-1/top-5/CE of the student and fidelity to each teacher on the eval split."""
  totals: dict[str, float] = {}
  for batch in data_lib.eval_batches(data_config, global_batch_size=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     side_data=side_data):
    sums = parallel.get(eval_step(state, teacher_vars, parallel.put_batch(batch)))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count"), 1.0)
  return {f"eval/{k}": v / count for k, v in totals.items()}


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


def build_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Builds everything the loop needs from the config; nothing below reads the config."""
  config_lib.validate(config)
  info = data_lib.get_info(config.data)
  parallel = Parallel(config.parallel.mode, config.parallel.num_devices)
  parallel.check_batch_size(config.batch_size)
  parallel.check_batch_size(config.eval_batch_size)
  student = models.build_model(config.student.name, info.num_classes,
                               bn_axis_name=parallel.bn_axis_name, **config.student.kwargs)
  teachers = load_teachers(config.teachers, info.num_classes, info.image_shape)
  splits = (config.data.train_split, config.data.eval_split)
  # Teachers with a cache: their logits come with the batches instead of from a forward.
  caches = {name: teacher_cache.open_cache(
      settings.cache, teachers[name], config.data, seed=config.seed, splits=splits,
      rebuild_hint=f"python scripts/cache_teacher.py --config=... --cache_dir="
                   f"{os.path.dirname(os.path.abspath(settings.cache))} (same data and "
                   "teacher settings as this run)")
      for name, settings in config.teachers.items() if settings.get("cache")}
  teacher_vars = {n: {} if n in caches else t.variables for n, t in teachers.items()}
  side_data = {split: {teacher_cache.batch_key(n): readers[split]
                       for n, readers in caches.items()} for split in splits}
  num_train = info.num_examples[config.data.train_split]
  if config.data.get("train_subset", 0):
    num_train = min(num_train, int(config.data.train_subset))
  durations = Durations.from_config(config, num_train)
  # The objective always sees the global batch (under pmap the step gathers it), so its
  # terms need no axis name: their statistics and memory updates are global by construction.
  context = {"axis_name": None, "num_examples": num_train}
  specs = [(name, stage.losses, stage.get("train", "all")) for name, stage in
           config.stages.items()] + [("train", config.losses, "all")]
  objectives = [build_objective(losses, list(teachers), context, durations.steps_per_epoch)
                for _, losses, _ in specs]
  objective = union_objective(objectives)
  student_apply, teacher_applies = build_applies(
      student, config.student.name, teachers, objective, info.image_shape, cached=tuple(caches))
  example = example_batch(info.image_shape, config.batch_size,
                          {teacher_cache.batch_key(n): info.num_classes for n in caches})
  add_contrast_indices(objective, config, num_train, side_data[splits[0]], example)
  # Trace the objective once, abstractly (init and a call): a term whose features do not fit
  # (shapes, connectors) or whose settings are wrong fails here, naming the term and layers,
  # before anything is compiled or trained.
  jax.eval_shape(functools.partial(trace_objective, objective, student_apply, teacher_applies),
                 init_shapes(student, info.image_shape), teacher_vars, example,
                 jax.random.PRNGKey(0))

  stages, start = [], 0
  for (name, _, trainable), stage_objective in zip(specs, objectives, strict=True):
    if name == "train":
      steps = durations.total_steps
      schedule = optim.make_schedule(config.optim, durations.steps_per_epoch, steps)
    else:
      stage_config = config.stages[name]
      steps = (int(stage_config.num_steps) if stage_config.get("num_steps", 0) > 0 else
               int(round(stage_config.num_epochs * durations.steps_per_epoch)))
      schedule = optax.constant_schedule(float(stage_config.get("lr", 0.0) or config.optim.lr))
    tx = optim.freeze_all_but(optim.make_optimizer(config.optim, schedule),
                              train_student=trainable == "all",
                              train_terms={t.name: tuple(getattr(t.fn, "frozen_params", ()))
                                           for t in stage_objective.terms})
    train_step, eval_step = compile_steps(parallel, student_apply, teacher_applies,
                                          stage_objective, tx, step_offset=start)
    stages.append(Stage(name, stage_objective, tx, schedule, start, start + steps, train_step))
    start += steps
  return dict(info=info, parallel=parallel, student=student, teachers=teachers,
              teacher_vars=teacher_vars, example=example,
              side_data={"train": side_data[splits[0]], "eval": side_data[splits[1]]},
              objective=objective, durations=durations, stages=stages, tx=stages[0].tx,
              student_apply=student_apply, teacher_applies=teacher_applies,
              train_step=stages[-1].train_step,
              eval_step=eval_step)


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
                  cached: tuple[str, ...] = ()) -> tuple[ApplyFn, dict[str, ApplyFn]]:
  """The student's and teachers' forwards, tapping what the objective compares.

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
  return (make_apply(student, features=objective.student_features),
          {name: teacher_cache.cached_apply(name) if name in cached else
           make_apply(t.module, features=objective.teacher_features(name),
                      input_size=t.input_size)
           for name, t in teachers.items()})


def compile_steps(parallel: Parallel, student_apply: ApplyFn,
                  teacher_applies: dict[str, ApplyFn], objective: Objective,
                  tx: Any, step_offset: int = 0) -> tuple[Callable, Callable]:
  """The compiled (train_step, eval_step) of the forwards and the objective."""
  static = dict(student_apply=student_apply, teacher_applies=teacher_applies)
  return (parallel.compile_train_step(objective=objective, tx=tx, step_offset=step_offset,
                                      **static),
          parallel.compile_eval_step(**static))


def example_batch(image_shape: tuple[int, ...], batch_size: int,
                  cached_logits: dict[str, int] | None = None) -> dict[str, jax.Array]:
  """An all-zeros batch of the shapes the step sees (one device's share of the batch), with
  `cached_logits` {batch key: number of classes} for the teachers read from a cache."""
  batch = {"image": jnp.zeros((batch_size, *image_shape), jnp.float32),
           "label": jnp.zeros((batch_size,), jnp.int32),
           "id": jnp.zeros((batch_size,), jnp.int32)}
  for key, num_classes in (cached_logits or {}).items():
    batch[key] = jnp.zeros((batch_size, num_classes), jnp.float32)
  return batch


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


def init_state(config: ml_collections.ConfigDict, run: dict[str, Any],
               stage: Stage | None = None) -> TrainState:
  """The initial state, derived from `config.seed` alone, with `stage`'s optimizer state
  (default: the first stage's)."""
  init_rng, objective_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  dummy = jnp.zeros((1, *run["info"].image_shape), jnp.float32)
  variables = jax.jit(lambda r: run["student"].init(r, dummy, train=False))(init_rng)
  objective_params, objective_state = {}, {}
  if any(term.is_module for term in run["objective"].terms):
    objective_params, objective_state = jax.jit(functools.partial(
        init_objective, run["objective"], run["student_apply"], run["teacher_applies"]))(
            variables, run["teacher_vars"], run["example"], objective_rng)
  tx = (stage or run["stages"][0]).tx
  return create_train_state(variables, objective_params, objective_state, tx, state_rng)


def stage_at(stages: list[Stage], step: int) -> Stage:
  """The stage whose step ran last before global step `step` (the one a checkpoint at `step`
  was saved in); the first stage for step 0."""
  for stage in stages:
    if step <= stage.end and (step > stage.start or stage.start == 0):
      return stage
  return stages[-1]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: Callable[[int, dict], None] | None = None
                       ) -> dict[str, Any]:
  """Trains (resuming if `workdir` has checkpoints), evaluates, and writes `result.json`.

  Args:
    config: a run config (see `distill_jax.config.base_config`).
    workdir: the run's directory; created if missing.
    step_callback: called as `fn(step, metrics)` after every step (metrics are device
      arrays); for instrumentation and tests.
  Returns:
    The result dict also written to `workdir/result.json`.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  run = build_run(config)
  parallel, durations, stages = run["parallel"], run["durations"], run["stages"]
  total_steps = stages[-1].end
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))

  train_iter = data_lib.train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      side_data=run["side_data"]["train"])
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.keep_checkpoints,
                              every_steps=durations.checkpoint_every)
  meta = {"student": config.student.name, "config": config_lib.to_json(config)}
  latest = checkpointer.latest_step()
  if latest is None:
    state = init_state(config, run)
  else:
    target = init_state(config, run, stage_at(stages, latest))
    state, data_state, _ = checkpointer.restore(latest, target)
    train_iter.set_state(data_state)
    logging.info("Resumed from %s/%d.", checkpointer.directory, latest)

  teacher_vars = parallel.put_replicated(run["teacher_vars"])
  state = parallel.put_replicated(jax.device_get(state))
  writer = MetricWriter(workdir)
  step = int(parallel.get(state).step)
  logging.info("Training %s for %d steps (%s; %d per epoch) on %d %s device(s), mode %s.",
               config.student.name, total_steps,
               ", ".join(f"{s.name}: {s.end - s.start}" for s in stages),
               durations.steps_per_epoch, parallel.num_devices, parallel.devices[0].platform,
               parallel.mode)

  def eval_now(step):
    scalars = evaluate(parallel, run["eval_step"], state, teacher_vars, config.data,
                       config.eval_batch_size, run["side_data"]["eval"])
    writer.write(step, scalars)
    return scalars

  history, best_top1 = [], -1.0
  bar = tqdm(total=total_steps, initial=step, disable=not (is_chief and config.progress_bar),
             desc="train", unit="step", dynamic_ncols=True)
  t0 = time.time()
  for stage in stages:
    if step >= stage.end:
      continue
    if step == stage.start:  # Entering the stage: a fresh optimizer state, as in the recipes.
      host = jax.device_get(parallel.get(state))
      state = parallel.put_replicated(host.replace(opt_state=stage.tx.init(host.params)))
    prefix = "train" if stage is stages[-1] else stage.name
    bar.set_description(prefix)
    while step < stage.end:
      batch = next(train_iter)
      state, metrics = stage.train_step(state, teacher_vars, parallel.put_batch(batch))
      step += 1
      bar.update(1)
      if step_callback is not None:
        step_callback(step, metrics)
      last = step == total_steps
      if (step % durations.log_every == 0 or step == stage.end
          or checkpointer.should_save(step)):
        scalars = _host_scalars(parallel.get(metrics))
        _check_finite(step, scalars)
        scalars["lr"] = float(stage.schedule(step - 1 - stage.start))
        writer.write(step, {f"{prefix}/{k}": v for k, v in scalars.items()})
        bar.set_postfix(loss=f"{scalars['loss']:.4f}", top1=f"{scalars['top1']:.3f}")
      if stage is stages[-1] and ((durations.eval_every and
                                   (step - stage.start) % durations.eval_every == 0) or last):
        scalars = eval_now(step)
        history.append({"step": step, **scalars})
        best_top1 = max(best_top1, scalars["eval/top1"])
      if checkpointer.should_save(step) or step == stage.end:
        checkpointer.save(step, parallel.get(state), train_iter.get_state(), meta)
  bar.close()

  final = history[-1] if history else eval_now(step)
  host_state = jax.device_get(parallel.get(state))
  if is_chief:
    export_model(os.path.join(workdir, "model"), host_state.student_variables(), {
        "model": config.student.name, "kwargs": dict(config.student.kwargs),
        "num_classes": run["info"].num_classes, "step": step})
  result = {
      "student": config.student.name, "teachers": {n: t.model for n, t in run["teachers"].items()},
      "losses": sorted(config.losses), "steps": step, "seed": config.seed,
      "final": final, "best_top1": max(best_top1, final["eval/top1"]),
      "train_seconds": time.time() - t0,
  }
  if is_chief:
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  writer.close()
  checkpointer.close()
  return result



def train_generations(config: ml_collections.ConfigDict, workdir: str, **kwargs: Any
                      ) -> dict[str, Any]:
  """`train_and_evaluate`, or with `config.generations > 1` born-again networks.

  Generation 0 runs the config as it is (e.g. distilled from its teacher, or trained alone);
  generation g distills the same student architecture from generation g - 1's exported model.
  Each generation lives in `workdir/gen{g}` and resumes like any run, so an interrupted chain
  continues where it stopped. Returns the last generation's result; `workdir/generations.json`
  lists every generation's final metrics.
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
    results.append(train_and_evaluate(gen_config, os.path.join(workdir, f"gen{g}"), **kwargs))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "generations.json"), "w") as f:
      json.dump([r["final"] for r in results], f, indent=2, sort_keys=True)
  return results[-1]
