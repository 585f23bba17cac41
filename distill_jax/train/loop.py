"""The run: a session that trains a built `Run` in its workdir -> checkpoints, metrics,
result.json; and born-again chains of runs.

`train_and_evaluate(config, workdir)` is everything the CLI does: `train.build.build_run`
turns the config into a `Run` (the only step that reads it), then a session runs it. It
resumes from the latest checkpoint in `workdir/checkpoints` (state and data position), so a
killed run restarted with the same command ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from distill_jax import config as config_lib
from distill_jax import data as data_lib
from distill_jax import tasks
from distill_jax.common.backend import describe, environment
from distill_jax.common.model_io import CheckpointError, export_model
from distill_jax.train.build import Run, Stage, build_run, generation_configs, init_state, lr_jump
from distill_jax.train.checkpoint import Checkpointer, write_atomic
from distill_jax.train.console import Progress
from distill_jax.train.guard import NonFiniteGuard, host_scalars
from distill_jax.train.metrics import MetricWriter
from distill_jax.train.parallel import Parallel
from distill_jax.train.signals import Interrupted, StopSignals
from distill_jax.train.state import TrainState
from distill_jax.train.workdir import WorkdirLock, WorkdirWriteError

# Write errors that stop a run cleanly (one line; the workdir stays resumable).
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


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
  # The run's first line (after the CLI's provenance): what JAX runs on. Logged once the
  # config is valid, so a run refused at its start shows its `Error:` line alone.
  logging.info("%s", describe(environment()))
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0), StopSignals() as stop:
    try:
      return _train(workdir, run, stop, step_callback)
    except OSError as e:
      if e.errno not in DISK_ERRORS:
        raise
      raise WorkdirWriteError(
          f"Could not write in {workdir}: {e.strerror} ({e.filename or 'a file'}). Its last "
          "complete checkpoint is intact: fix the cause (e.g. free disk space) and rerun the "
          "same command to resume.") from e


def _train(workdir: str, run: Run, stop: StopSignals,
           step_callback: Callable[[int, dict], None] | None) -> dict[str, Any]:
  """The run proper, in a locked workdir (see `train_and_evaluate`): every stage in turn, from
  wherever the last checkpoint left off, then the final evaluation and `result.json`."""
  session = _Session.start(workdir, run)
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
  meta: dict[str, Any]
  last_saved: int | None
  seconds_before: float  # Training seconds of the earlier launches of this run.
  started: float = dataclasses.field(default_factory=time.time)  # This launch's.
  completed: bool = False  # `finish` wrote result.json.

  @property
  def best_key(self) -> str:
    return _best_key(self.run.task)

  @classmethod
  def start(cls, workdir: str, run: Run) -> _Session:
    """Resumes from the latest good checkpoint, or starts from the run's seed."""
    task, parallel, settings = run.task, run.parallel, run.settings
    train_iter = task.train_iterator(
        settings.data, global_batch_size=settings.batch_size, seed=settings.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        side_data=run.side_data["train"])
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                keep=settings.keep_checkpoints,
                                every_steps=run.durations.checkpoint_every)
    record = {"history": [], _best_key(task): -1.0 if task.higher_is_better else math.inf,
              "best_step": 0, "train_seconds": 0.0, "skipped_steps": 0, "consecutive_skips": 0}
    latest = checkpointer.latest_good_step()
    if latest is None:
      state = init_state(settings, run)
    else:
      state, data_state, saved_meta = _resume(run, checkpointer, latest)
      train_iter.set_state(data_state)
      record.update(saved_meta.get("record", {}))
      logging.info("Resumed from %s.", checkpointer.step_dir(latest))
    is_chief = jax.process_index() == 0
    if is_chief:
      write_atomic(os.path.join(workdir, "config.json"), settings.config_json)
    guard = NonFiniteGuard(settings.on_nonfinite, settings.max_consecutive_skips,
                           record["skipped_steps"], record["consecutive_skips"])
    teacher_vars = parallel.put_teachers(run.teacher_vars)
    state = parallel.put_state(jax.device_get(state))
    step = int(parallel.get(state).step)
    writer = MetricWriter(workdir, resume_step=step, writers=settings.log_writers,
                          settings=settings.log_settings,
                          run_config=json.loads(settings.config_json))
    total_steps = run.stages[-1].end
    logging.info("Training %s for %d steps (%s; %d per epoch) on %d %s device(s), mode %s.",
                 settings.student_name, total_steps,
                 ", ".join(f"{s.name}: {s.end - s.start}" for s in run.stages),
                 run.durations.steps_per_epoch, parallel.num_devices,
                 parallel.devices[0].platform, parallel.mode)
    return cls(workdir=workdir, run=run, state=state, step=step, record=record,
               teacher_vars=teacher_vars, train_iter=train_iter, checkpointer=checkpointer,
               writer=writer, guard=guard,
               bar=Progress(total_steps, step, enabled=is_chief,
                            show_bar=settings.progress_bar, headline=run.task.headline),
               meta={"student": settings.student_name, "config": settings.config_json},
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
        scalars = host_scalars(parallel.get(metrics))
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
    run, parallel, settings = self.run, self.run.parallel, self.run.settings
    scalars = evaluate(parallel, run.eval_step, self.state, self.teacher_vars, settings.data,
                       settings.eval_batch_size, run.side_data["eval"], task=run.task)
    if run.extras.sampler is not None:
      texts, extra = run.extras.sampler(parallel.get(self.state).student_variables(),
                                        parallel.get(self.teacher_vars), seed=settings.seed)
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
    run, task, record, step = self.run, self.run.task, self.record, self.step
    settings = run.settings
    history = record["history"]
    final = (history[-1] if history and history[-1]["step"] == step
             else {"step": step, **self.evaluate()})
    host_state = run.parallel.to_host(self.state)
    # Every process: the export is a collective save (process 0 writes the files).
    export_model(os.path.join(self.workdir, "model"), host_state.student_variables(), {
        "model": settings.student_name, "kwargs": settings.student_kwargs,
        "num_classes": run.num_classes, "input_shape": list(run.input_shape), "step": step})
    headline = final[f"eval/{task.headline}"]
    final_is_best = task.is_better(headline, record[self.best_key])
    result = {
        "student": settings.student_name,
        "teachers": {n: t.model for n, t in run.teachers.items()},
        "losses": list(settings.losses), "steps": step, "seed": settings.seed,
        "final": final, self.best_key: headline if final_is_best else record[self.best_key],
        "best_step": step if final_is_best else record["best_step"],
        "train_seconds": record["train_seconds"], "skipped_steps": self.guard.skipped,
        "environment": environment(),  # What this launch ran on (jax, backend, devices).
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


def evaluate(parallel: Parallel, eval_step: Callable, state: Any, teacher_vars: Any,
             data_config: Any, batch_size: int,
             side_data: dict[str, data_lib.SideData] | None = None, *,
             task: tasks.Task) -> dict[str, float]:
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


def _resume(run: Run, checkpointer: Checkpointer, step: int) -> tuple[TrainState, dict, dict]:
  """Restores checkpoint `step`, refusing (before anything is written) a config that differs
  from the checkpoint's unless `config.allow_config_change`, and always one that changes the
  state's structure."""
  settings = run.settings
  target = init_state(settings, run, stage_at(run.stages, step))
  try:
    state, data_state, meta = checkpointer.restore(step, target)
  except CheckpointError as e:
    saved = checkpointer.read_meta(step).get("config")
    changes = config_changes(saved, settings.config_json)
    if not changes:
      raise
    raise config_lib.ConfigError(state_mismatch(checkpointer.step_dir(step), saved,
                                                settings.student_name, changes)) from e
  changes = config_changes(meta.get("config"), settings.config_json)
  if changes and not settings.allow_config_change:
    raise config_lib.ConfigError(
        f"The config differs from the one {checkpointer.step_dir(step)} was written with: "
        f"{'; '.join(changes)}. Resume with the same config, or pass "
        "--config.allow_config_change=True to continue with the new values.")
  for change in changes:
    logging.warning("Resuming with a changed setting: %s", change)
  jump = lr_jump(meta.get("config"), run, step) if changes else None
  if jump:
    logging.warning(jump)
  return state, data_state, meta


def stage_at(stages: list[Stage], step: int) -> Stage:
  """The stage whose step ran last before global step `step` (the one a checkpoint at `step`
  was saved in); the first stage for step 0."""
  for stage in stages:
    if step <= stage.end and (step > stage.start or stage.start == 0):
      return stage
  return stages[-1]


# Settings whose change on resume is not a change of the run (where it runs, how it shows):
# these keys, and every key under these prefixes (the devices and processes a run is laid out
# on: a restore reshards the same state onto any layout, and a relaunch gets a new port; where
# metrics go: a tracker added on resume is sent the metrics so far; `fused_logits`: how the
# logits are computed, not what, so a checkpoint from before it existed resumes too).
IGNORED_CHANGES = ("allow_config_change", "allow_cpu", "progress_bar", "data.data_dir",
                   "fused_logits")
IGNORED_PREFIXES = ("parallel.", "log.")


def config_changes(saved_json: str | None, config_json: str) -> list[str]:
  """'key: old -> new' for every setting that differs between a checkpoint's config and this
  run's (both as JSON), but the `IGNORED_CHANGES` and `IGNORED_PREFIXES`."""
  if not saved_json:
    return []

  def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
      return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

  old, new = flat(json.loads(saved_json)), flat(json.loads(config_json))
  return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k not in IGNORED_CHANGES
          and not k.startswith(IGNORED_PREFIXES)]


def state_mismatch(step_dir: str, saved_json: str, student_name: str, changes: list[str],
                   show: int = 6) -> str:
  """Why the checkpoint in `step_dir` cannot be resumed by a run of model `student_name`, in
  one line: the model it was saved from and the one the config asks for (or, the same model,
  other parameter shapes), the first `show` changed settings, and what to do."""
  old = (json.loads(saved_json).get("student") or {}).get("name")
  new = student_name
  more = f"; and {len(changes) - show} more" if len(changes) > show else ""
  changed = f" (changed: {'; '.join(changes[:show])}{more})"
  if old and old != new:
    return (f"The checkpoint in {step_dir} was saved from model {old!r} and the config asks "
            f"for {new!r}{changed}: use another --workdir for {new!r}, or the same model "
            f"(--config.student.name={old}).")
  return (f"The checkpoint in {step_dir} was saved with other parameter shapes than this "
          f"config builds{changed}: use another --workdir for the new config, or the settings "
          "it was saved with.")


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
  chain = generation_configs(config, workdir)
  if len(chain) == 1:
    return train_and_evaluate(*chain[0], **kwargs)
  results = []
  for g, (gen_config, gen_workdir) in enumerate(chain):
    logging.info("Born-again generation %d of %d (gen%d).", g + 1, len(chain), g)
    results.append(train_and_evaluate(gen_config, gen_workdir, **kwargs))
  result = {**results[-1], "generations": [r["final"] for r in results]}
  if jax.process_index() == 0:
    write_atomic(os.path.join(workdir, "generations.json"),
                 json.dumps(result["generations"], indent=2, sort_keys=True))
    # The chain's result, where every run has it (sweeps and reports read it there).
    write_atomic(os.path.join(workdir, "result.json"), json.dumps(result, indent=2,
                                                                  sort_keys=True))
  return result
