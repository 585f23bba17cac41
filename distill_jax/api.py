"""The Python API: everything the CLI does, from a notebook or a script, with a config object.

    from distill_jax import api

    config = api.get_config("configs/digits.py:teacher", overrides={"num_steps": 200})
    result = api.train(config, "runs/teacher")            # result.json's contents
    metrics = api.evaluate("runs/teacher")                # eval metrics of the exported model
    model = api.load_model("runs/teacher")                # logits = model(images)
    test = api.eval_examples(config, limit=16)            # {'image': [16, 8, 8, 1], 'label': ...}
    verdict = api.audit("runs/kd", candidates=["runs/teacher"], controls=["runs/c0", "runs/c1"])

Each function is the CLI's own code path (`train` is `distill-jax --config=... --workdir=...`,
`audit` is `distill-jax audit`), so a run started here resumes from the CLI and the other way
round. Mistakes raise the project's exceptions with the one-line message the CLI prints
(`ConfigError`, `CheckpointError`, `AuditError`, `UnknownNameError`); nothing exits the
interpreter. Loss terms and models registered in the session (a notebook cell with
`@register_loss`) are used by configs that name them; re-running the cell replaces them
(`distill_jax.common.registry`). See docs/python_api.md.

`config.parallel.cpu_devices` (the host CPU split into N devices) can only take effect before
JAX starts its backend: `train` applies it when nothing in the process has used a device yet
(a fresh notebook kernel), and otherwise raises ConfigError unless the CPU already has N
devices; `XLA_FLAGS=--xla_force_host_platform_device_count=N` in the environment before
starting Python always works.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from distill_jax.audit.subjects import AuditError, Exported
from distill_jax.common.model_io import CheckpointError
from distill_jax.common.registry import UnknownNameError
from distill_jax.config import ConfigError, lists_to_tuples

__all__ = ["AuditError", "CheckpointError", "ConfigError", "UnknownNameError", "audit",
           "eval_examples", "evaluate", "get_config", "load_model", "train"]


def get_config(spec: str, overrides: Mapping[str, Any] | None = None, *,
               validate: bool = True) -> ml_collections.ConfigDict:
  """A run config from a config file, as `--config=SPEC --config.KEY=VALUE ...` gives it.

  Args:
    spec: `path/to/file.py[:ARG]` (relative to the working directory), e.g.
      'configs/digits.py:kd' or 'configs/cifar_kd.py:kd,resnet56,resnet20'.
    overrides: dotted keys to values, e.g. {'optim.lr': 0.1, 'num_steps': 200}; a whole
      section may be given as a dict ({'losses': {'ce': {'weight': 1.0}}}).
    validate: check every name and range as a run does before it starts (imports
      `config.imports` first); False to check later, e.g. after editing the config further.
  Returns:
    The config, locked: values can be set (`config.optim.lr = 0.2`), new keys need
    `with config.unlocked():`.
  Raises:
    ConfigError: no such file, an ARG the file refuses, an unknown key ("config.optim has no
      key 'lrr' (did you mean 'lr'?); it has: ..."), a value of the wrong type, or (with
      `validate`) an invalid setting.
  """
  from distill_jax import config as config_lib

  config = config_lib.load_config_file(spec, dict(overrides or {}))
  if validate:
    config_lib.validate(config)
  return config


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the result.

  The CLI's training: validation and everything built before `workdir` is touched; the
  checkpoints, `metrics.jsonl`, TensorBoard events, the exported model (`workdir/model/`) and
  `result.json`; `config.generations > 1` runs a born-again chain. A start that fails removes
  the workdir it created, unless a checkpoint was written (then the same call resumes).

  Returns:
    The contents of `workdir/result.json`: 'final' (the last evaluation: 'eval/top1', ...
    and 'step'), 'best_<headline>' and 'best_step', 'steps', 'train_seconds', ...
  Raises:
    ConfigError, CheckpointError (a teacher's export), UnknownNameError, and the loop's own
    errors (a non-finite loss, a locked workdir) with the messages the CLI prints. A config or
    launcher that asked for accelerators (`parallel.backend`, a mesh larger than the host, a
    launcher's GPUs) on a host where JAX finds only the CPU raises ConfigError before anything
    is built, unless `config.allow_cpu` (`distill_jax.common.backend`).
  """
  from distill_jax.common import backend
  from distill_jax.common.xla_flags import set_cpu_devices
  from distill_jax.train import loop
  from distill_jax.train.parallel import initialize_distributed
  from distill_jax.train.workdir import remove_unless_checkpointed

  cpu_devices = int(config.parallel.get("cpu_devices") or 0)
  try:
    set_cpu_devices(cpu_devices)  # Possible until JAX starts its backend in this process.
  except RuntimeError as e:
    raise ConfigError(str(e)) from None
  initialize_distributed(config.parallel)  # A no-op unless several processes are configured.
  found = backend.environment()
  if not config.get("allow_cpu", False):
    refusal = backend.cpu_refusal(found, config.parallel, os.environ)
    if refusal:
      raise ConfigError(refusal)
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  try:
    return loop.train_generations(config, workdir)
  except BaseException:
    if created:
      remove_unless_checkpointed(workdir)
    raise


def evaluate(path: str, config: ml_collections.ConfigDict | None = None) -> dict[str, float]:
  """The eval metrics of an exported model, as its run's evaluation computes them.

  Args:
    path: a finished run's workdir, or an export directory (holding model.json and
      variables/).
    config: what to evaluate on (data, eval split, teachers to compare with, devices); by
      default the config the run was trained with (`WORKDIR/config.json`). The model itself
      always comes from the export's model.json.
  Returns:
    {'eval/top1': ..., 'eval/top5': ..., 'eval/ce': ..., 'eval/agreement/TEACHER': ...,
    'step': the step it was exported at}: for a run's own export and config the same
    numbers as its `result.json` 'final'.
  Raises:
    CheckpointError: no export at `path`, or one that does not fit the model.
    ConfigError: no config given and none next to the export, or the config names a loss
      that is not registered in this session (a notebook cell's: run the cell first).
  """
  import jax

  from distill_jax.common.model_io import load_model_variables, read_model_meta
  from distill_jax.train import loop
  from distill_jax.train.build import build_run, init_state

  directory = _export_dir(path)
  meta = read_model_meta(directory)
  config = _run_config(directory) if config is None else config
  config = config.copy_and_resolve_references()
  config.student.name = meta["model"]
  config.student.kwargs = lists_to_tuples(meta.get("kwargs") or {})
  if config.student.get("init"):  # Open weights to start from: the export replaces them.
    config.student.init = ""
  run = build_run(config)
  state = init_state(config, run)
  variables = load_model_variables(directory, state.student_variables())
  state = state.replace(params={**state.params, "student": variables["params"]},
                        model_state={k: v for k, v in variables.items() if k != "params"})
  parallel = run.parallel
  scalars = loop.evaluate(parallel, run.eval_step, parallel.put_state(jax.device_get(state)),
                          parallel.put_teachers(run.teacher_vars), config.data,
                          config.eval_batch_size, run.side_data["eval"], task=run.task)
  return {**scalars, "step": meta.get("step")}


def load_model(path: str, input_shape: Sequence[int] | None = None) -> Exported:
  """An exported model, ready to call: `model(inputs) -> logits` in eval mode.

  Args:
    path: a finished run's workdir, or an export directory.
    input_shape: one example's input shape, to check the saved parameters against; by
      default from model.json (written by every run since it was added), else from the run's
      config.json.
  Returns:
    An `Exported`: `model(images [N, H, W, C])` (a language model: `model(token ids [N, L])`)
    -> float32 NumPy logits [N, K] ([N, L, V]), in fixed-size chunks that compile once;
    `model.meta` (model.json: model, kwargs, num_classes, input_shape, step), `model.module` and
    `model.variables` (Flax) for anything else.
  Raises:
    CheckpointError: no export at `path`, or one that does not fit its model.json.
    ConfigError: no `input_shape` known (give it).
  """
  from distill_jax import tasks
  from distill_jax.audit.subjects import load_exported
  from distill_jax.common.model_io import read_model_meta

  directory = _export_dir(path)
  meta = read_model_meta(directory)
  if input_shape is None:
    input_shape = meta.get("input_shape")
  if input_shape is None:
    config = _run_config(directory, hint="or pass input_shape=(H, W, C)")
    input_shape = tasks.get_task(config.get("task")).info(config.data).input_shape
  return load_exported(path, tuple(int(d) for d in input_shape))


def eval_examples(config: ml_collections.ConfigDict, limit: int | None = None
                  ) -> dict[str, np.ndarray]:
  """The config's eval split as its evaluation sees it (normalised images, or token rows),
  without padding: {'image' or 'tokens': [N, ...], 'label' or 'targets': ..., 'mask': ...}
  as NumPy, the first `limit` examples (all when None)."""
  from distill_jax import tasks

  task = tasks.get_task(config.get("task"))
  parts: dict[str, list[np.ndarray]] = {}
  count = 0
  for batch in task.eval_batches(config.data, global_batch_size=config.eval_batch_size):
    mask = np.asarray(batch["mask"])
    keep = mask.reshape(len(mask), -1).any(-1)  # Padding rows are all-zero.
    for key, value in batch.items():
      parts.setdefault(key, []).append(np.asarray(value)[keep])
    count += int(keep.sum())
    if limit is not None and count >= limit:
      break
  return {key: np.concatenate(values)[:limit] for key, values in parts.items()}


def audit(student: str, candidates: Sequence[str] | Mapping[str, str],
          controls: Sequence[str] | Mapping[str, str], *,
          probes: Sequence[str] | None = None, primary: str | None = None,
          num_inputs: int = 256, seed: int = 0, alpha: float = 0.05, data: str | None = None,
          data_dir: str | None = None,
          settings: Mapping[str, Mapping[str, Any]] | None = None,
          out: str | None = None, decoys: Sequence[str] | Mapping[str, str] = (),
          shadows: Sequence[str] = (), precision: float | None = None) -> dict[str, Any]:
  """Was `student` distilled from one of `candidates`? `distill-jax audit`, from Python.

  Args:
    student: the student's run workdir or export (its weights are used).
    candidates: the candidate teachers (workdirs or exports; only their outputs are used):
      paths (named by their last component, or 'NAME=PATH') or {name: path}.
    controls: at least 2 students trained like the student without the candidates; as
      `candidates`.
    probes, primary, num_inputs, seed, alpha, data, data_dir: the CLI's --probe (as a
      list), --primary, --num_inputs, --seed, --alpha, --data, --data_dir (docs/audit.md).
    settings: probe options, {probe: {key: value}}, e.g. {'synthetic': {'steps': 50}}
      (the CLI's --set=synthetic.steps=50).
    out: a directory to write the report to (audit.md, audit.json, a plot), as the CLI does;
      None writes nothing.
    decoys, shadows, precision: the CLI's --decoys (as `candidates`), --shadows (a list of
      'SOURCE:PATH' or 'SOURCE:NAME=PATH') and --precision.
  Returns:
    The audit's result (docs/audit.md): 'answer' (the named candidate, a set 'A or B', or
    'none'), 'named', 'answer_set', 'adjusted_p', 'pairwise_p', 'iut_p', 'primary' (the
    deciding statistic of the student and each control, per candidate, with its p-value),
    'scores' (every score on every probe), 'baseline' (the paper's method), ...; the
    per-input scores under '_per_input'.
  Raises:
    AuditError (bad input, naming the flag), UnknownNameError (a probe), CheckpointError.
  """
  from distill_jax.audit import cli, write_report

  def named(models: Sequence[str] | Mapping[str, str], flag: str) -> list[tuple[str, str]]:
    if isinstance(models, str):
      models = models.split(",")
    elif isinstance(models, Mapping):
      models = [f"{name}={path}" for name, path in models.items()]
    return cli._named(models, flag)

  result = cli.audit_paths(student, named(candidates, "candidates"), named(controls, "controls"),
                           probes=probes, primary=primary, num_inputs=num_inputs, seed=seed,
                           alpha=alpha, data=data, data_dir=data_dir, settings=settings,
                           decoys=named(decoys, "decoys"), shadows=cli._shadows(shadows),
                           precision=precision)
  if out is not None:
    write_report(result, out)
  return result


def _export_dir(path: str) -> str:
  """`path`'s export directory (a workdir's `model/`, or `path` itself); CheckpointError when
  `path` does not exist."""
  from distill_jax.teachers import resolve_export_dir

  if not os.path.exists(path):
    raise CheckpointError(f"No exported model at {path}: it does not exist (give a finished "
                          "run's workdir or its model/ directory).")
  return resolve_export_dir(path)


def _run_config(export_dir: str, hint: str = "or pass config=") -> ml_collections.ConfigDict:
  """The config of the run whose export `export_dir` is (its workdir's config.json)."""
  from distill_jax.config import load_run_config

  workdir = os.path.dirname(os.path.abspath(export_dir))
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise ConfigError(f"{export_dir} is not a run's model/ export (no {workdir}/config.json "
                      f"says what it was trained on): give the run's workdir, {hint}.")
  return load_run_config(workdir)

