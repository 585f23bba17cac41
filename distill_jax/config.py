"""The run config: defaults every config file starts from, and validation before building.

Config files in `configs/` are Python: `get_config(arg) -> ConfigDict`, starting from
`base_config()`. `validate(config)` checks every name (model, loss, data set, optimizer,
schedule, parallel mode) and every loss hyper-parameter before anything is built or compiled,
so a typo fails in a second with a message that lists what is allowed. Every numeric setting
has its allowed range declared once: the run's in `SETTING_RANGES` here, a loss term's beside
its loss (`register_loss(..., ranges=...)`) and the objective's (`objective.TERM_RANGES`), all
checked by the same `validate`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
from typing import Any

import ml_collections

from distill_jax import models, optim, tasks
from distill_jax.common.backend import check_backend_setting
from distill_jax.common.layout import DEFAULT_MIN_SHARD_SIZE, check_layout
from distill_jax.common.rules import (
  FRACTION,
  NON_NEGATIVE,
  NON_NEGATIVE_INT,
  POSITIVE,
  POSITIVE_INT,
  ConfigError,
  Rule,
  check_range,
)
from distill_jax.config_cli import switch_models
from distill_jax.data import default_data_config
from distill_jax.losses import LOSSES
from distill_jax.losses.objective import build_objective, term_ranges
from distill_jax.models.forward import DTYPES
from distill_jax.models.tokenizers import get_tokenizer
from distill_jax.teachers import HF_MODEL, check_hf_teacher_kwargs
from distill_jax.train.metrics import check_writers

NONFINITE_ACTIONS = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
  """Defaults for a run: a small CNN trained with cross-entropy on the embedded digits."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.imports = ()  # Modules to import first, e.g. ('my_pkg.my_losses',) to register losses.
  c.data = default_data_config("digits")
  # kwargs: the model's own constructor settings (`distill-jax models` lists each model's with
  # its defaults; `--config.student.name=X` brings X's). remat: recompute the student's blocks
  # in the backward pass (less memory, same numbers).
  c.student = ml_collections.ConfigDict({"name": "cnn", "kwargs": {}, "remat": False})
  # The student's compute dtype: 'bfloat16' runs its forward and backward in bf16 with
  # float32 params, optimizer state, softmaxes and loss reductions (models.forward.make_apply).
  # Each teacher has its own (config.teachers.NAME.dtype).
  c.dtype = "float32"
  # C > 0: lazy logits for language models. The student's and live teachers' forwards stop at
  # the final hidden states, and the token terms and the task's metrics compute the logits C
  # positions at a time inside one rematerialised scan (a term's own chunk_size wins), so the
  # [B, L, vocab] logits never exist whole, forward or backward. 0: whole logits, as before.
  c.fused_logits = 0
  # name -> teacher_config(model, kwargs, checkpoint, cache): see `teacher_config`.
  c.teachers = ml_collections.ConfigDict()
  # term name -> {'loss': registered name (default: the term name), 'weight', hparams...}.
  c.losses = ml_collections.ConfigDict({"ce": {"weight": 1.0}})
  # Stages run before the main training, in order: name -> {'num_epochs' (or 'num_steps'),
  # 'losses' (as above), 'train': 'all' | 'objective' (connectors only), 'lr' (0: optim.lr)}.
  # E.g. FitNet's hint pre-training: {'hint': {'num_epochs': 30, 'train': 'objective',
  # 'losses': {'fitnet': {}}}}; a term of the same name in `losses` keeps the trained connector.
  c.stages = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict({
      "name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
      "schedule": "step", "decay_epochs": (150, 180, 210), "decay_factor": 0.1,
      "warmup_epochs": 0.0,
      # k > 1: the step runs k micro-batches of batch_size / k and averages their gradients.
      "accumulate_steps": 1})
  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_epochs = 240.0
  c.num_steps = 0  # > 0 overrides num_epochs.
  c.eval_every_epochs = 1.0  # 0: evaluate only at the end.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000  # A checkpoint is also written at the end.
  c.keep_checkpoints = 3
  # Devices (num_devices 0: all) and their mesh: the batch is split over data x fsdp; state
  # arrays of at least min_shard_size elements are split over fsdp (train/parallel.py), the
  # teachers too with teacher_sharding='fsdp'; tensor > 1 splits the student's and the live
  # teachers' layers by their model's rules (Megatron-style; transformer_lm only, jit only).
  # One axis may be -1: the devices left.
  c.parallel = ml_collections.ConfigDict({
      "mode": "jit", "num_devices": 0, "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
      "min_shard_size": DEFAULT_MIN_SHARD_SIZE, "teacher_sharding": "replicated",
      # Several processes (hosts): process 0's 'host:port', the count and this one's id
      # (train/parallel.py:initialize_distributed); empty: from Slurm, or one process.
      "coordinator": "", "num_processes": 0, "process_id": -1,
      "init_timeout_seconds": 300, "heartbeat_timeout_seconds": 100,
      # > 0: split the host CPU into this many XLA devices (set by the CLI before JAX starts).
      "cpu_devices": 0,
      # 'gpu' or 'tpu': the run needs that backend and stops if JAX finds another (a CPU
      # unless allow_cpu); '': whatever JAX finds (common/backend.py).
      "backend": ""})
  c.progress_bar = True
  # Where metrics go (train/metrics.py, train/trackers.py): 'jsonl' (WORKDIR/metrics.jsonl,
  # always), 'tensorboard' (WORKDIR/tb), 'wandb', 'mlflow' (optional extras). Empty tracker
  # settings leave the choice to the library and its environment variables (WANDB_MODE,
  # WANDB_PROJECT, MLFLOW_TRACKING_URI, ...). README's "Experiment trackers" says more.
  c.log = ml_collections.ConfigDict({
      "writers": ("jsonl", "tensorboard"),
      "wandb": {"project": "", "entity": "", "mode": "", "name": "", "group": "", "tags": (),
                "dir": ""},
      "mlflow": {"tracking_uri": "", "experiment": "", "run_name": ""}})
  # Born-again networks: > 1 runs that many distillations in a row in WORKDIR/gen0, gen1, ...;
  # generation g > 0 distills the student's architecture from generation g - 1 (one teacher,
  # named 'teacher', replaces config.teachers), with the same loss terms.
  c.generations = 1
  # What a train step with a non-finite loss or update does: 'stop' the run (naming the step;
  # nothing non-finite is ever saved) or 'skip' the update (the state stays as it was) and stop
  # only after `max_consecutive_skips` skipped steps in a row.
  c.train = ml_collections.ConfigDict({"on_nonfinite": "stop", "max_consecutive_skips": 10})
  # Resuming with a config that differs from the checkpoint's is refused unless this is True
  # (then the differences are logged); a change of the state's structure is always refused.
  # The resumed run follows the new config's LR schedule (a longer num_steps stretches a
  # cosine: the LR jumps up at the restored step, and the log gives both values).
  c.allow_config_change = False
  # A run that asked for accelerators (parallel.backend, a mesh larger than the host, a
  # launcher's GPUs) but finds only a CPU stops with the fix; True runs on the CPU anyway.
  c.allow_cpu = False
  return c


# Every numeric run setting with its allowed range (dotted key -> (range, meaning)); `validate`
# checks them all, so each range is declared once, here.
SETTING_RANGES: dict[str, Rule] = {
    "seed": (NON_NEGATIVE_INT, "the seed every RNG derives from"),
    "optim.lr": (POSITIVE, "the peak learning rate"),
    "optim.momentum": (FRACTION, "SGD momentum (0: none)"),
    "optim.weight_decay": (NON_NEGATIVE, "the weight decay"),
    "optim.decay_factor": (POSITIVE, "the step schedule's factor at each decay epoch"),
    "optim.warmup_epochs": (NON_NEGATIVE, "the linear warm-up, in epochs"),
    "batch_size": (POSITIVE_INT, "the global train batch size"),
    "eval_batch_size": (POSITIVE_INT, "the global eval batch size"),
    "num_epochs": (NON_NEGATIVE, "training length in epochs (if num_steps is 0)"),
    "num_steps": (NON_NEGATIVE_INT, "training length in steps (0: use num_epochs)"),
    "eval_every_epochs": (NON_NEGATIVE, "epochs between evaluations (0: only at the end)"),
    "log_every_steps": (POSITIVE_INT, "steps between metric lines"),
    "checkpoint_every_steps": (POSITIVE_INT, "steps between checkpoints"),
    "keep_checkpoints": (POSITIVE_INT, "how many checkpoints are kept"),
    "generations": (POSITIVE_INT, "born-again generations"),
    "parallel.num_devices": (NON_NEGATIVE_INT, "devices to use (0: all)"),
    "parallel.min_shard_size": (NON_NEGATIVE_INT, "the smallest array split over fsdp"),
    "parallel.init_timeout_seconds": (POSITIVE, "how long processes wait for each other"),
    "parallel.heartbeat_timeout_seconds": (POSITIVE, "when a silent peer ends the run"),
    "parallel.cpu_devices": (NON_NEGATIVE_INT, "XLA devices the host CPU is split into"),
    "optim.accumulate_steps": (POSITIVE_INT, "micro-batches per step"),
    "train.max_consecutive_skips": (POSITIVE_INT, "non-finite steps skipped in a row before "
                                    "the run stops"),
}
STAGE_SETTING_RANGES: dict[str, Rule] = {
    "num_epochs": (NON_NEGATIVE, "the stage's length in epochs"),
    "num_steps": (NON_NEGATIVE_INT, "the stage's length in steps"),
    "lr": (NON_NEGATIVE, "the stage's learning rate (0: optim.lr)"),
}


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Checks every setting of `SETTING_RANGES`, every stage setting of `STAGE_SETTING_RANGES`
  and every loss term's settings: the objective's (`objective.TERM_RANGES`: weight, warm-up)
  and those its loss declares beside itself (`register_loss(..., ranges=...)`)."""
  for key, rule in SETTING_RANGES.items():
    node: Any = config
    for part in key.split("."):
      node = node.get(part) if hasattr(node, "get") else None
    if node is not None:
      check_range(key, node, rule)
  sections = [("losses", config.losses)] + [
      (f"stages.{name}.losses", stage.get("losses", {})) for name, stage in
      config.stages.items()]
  for prefix, losses in sections:
    for term, settings in losses.items():
      rules = term_ranges((settings or {}).get("loss", term))
      for key, value in (settings or {}).items():
        if key in rules:
          check_range(f"{prefix}.{term}.{key}", value, rules[key])
  for name, stage in config.stages.items():
    for key, rule in STAGE_SETTING_RANGES.items():
      if stage.get(key) is not None:
        check_range(f"stages.{name}.{key}", stage[key], rule)


TEACHER_KEYS = ("model", "kwargs", "checkpoint", "cache", "input_size", "dtype", "tokenizer",
                "seq_len")


def teacher_config(model: str, kwargs: dict[str, Any] | None = None, checkpoint: str = "",
                   cache: str | None = None, input_size: tuple[int, int] | None = None,
                   dtype: str = "float32", tokenizer: str | None = None,
                   seq_len: int = 0) -> ml_collections.ConfigDict:
  """One entry of `config.teachers`, with every key present so each can be overridden:

  `model` and `kwargs` build it, `checkpoint` is a teacher run's workdir (or its `model/`
  export), `cache` (optional) a directory written by `scripts/cache_teacher.py` for this
  teacher (training then reads its logits from there instead of running it), and
  `input_size=(H, W)` (optional) the image size it was trained at, when not the data's: its
  inputs are resized to it; `dtype` its forward's compute dtype ('bfloat16' halves its
  memory and time on accelerators).

  A language-model teacher with its own tokenizer (`tokenizer`: a `data.tokenizer` name such
  as 'bpe'; cross-tokenizer distillation, `data/text/cross_tokenizer.py`) reads the rows
  re-tokenised for it, `seq_len` tokens each (0: the data's `seq_len`); only then are the two
  keys present (so the configs of teachers that share the data's tokenizer stay as they were).
  """
  placeholder = ml_collections.config_dict.placeholder
  entry = {
      "model": model, "kwargs": dict(kwargs or {}), "checkpoint": checkpoint,
      "cache": placeholder(str) if cache is None else cache,
      "input_size": placeholder(tuple) if input_size is None else tuple(input_size),
      "dtype": dtype}
  if tokenizer is not None:
    entry.update(tokenizer=tokenizer, seq_len=int(seq_len))
  return ml_collections.ConfigDict(entry)


def import_modules(config: ml_collections.ConfigDict) -> None:
  """Imports `config.imports` (user modules that register losses or models)."""
  for name in config.get("imports", ()):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f"config.imports names {name!r}, which cannot be imported: {e}") from e


def _check_teacher_tokenizer(config: ml_collections.ConfigDict, name: str,
                             teacher: ml_collections.ConfigDict) -> None:
  """A teacher's own tokenizer (`teachers.NAME.tokenizer`): a known one, for a language model,
  read live (a cache holds logits of the data's rows), at a row length >= 0."""
  tokenizer = teacher.get("tokenizer")
  if not tokenizer:
    return
  if (config.get("task") or tasks.DEFAULT_TASK) != "language_model":
    raise ConfigError(f"config.teachers.{name}.tokenizer={tokenizer!r}: a teacher's own "
                      "tokenizer is for language models (config.task='language_model').")
  try:
    get_tokenizer(tokenizer)
  except ValueError as e:
    raise ConfigError(f"config.teachers.{name}.tokenizer: {e}") from None
  if teacher.get("cache"):
    raise ConfigError(f"config.teachers.{name}: a teacher with its own tokenizer runs live "
                      f"(its cache would hold the data's rows); unset "
                      f"config.teachers.{name}.cache.")
  seq_len = teacher.get("seq_len", 0)
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
    raise ConfigError(f"config.teachers.{name}.seq_len must be an integer >= 0 (0: the "
                      f"data's seq_len), got {seq_len!r}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first invalid setting. Imports `config.imports` first; the
  task's own settings are its `Task.validate`'s (e.g. classification's `data.augment`)."""
  import_modules(config)
  _check_name("task", config.get("task") or tasks.DEFAULT_TASK, tasks.TASKS)
  _check_name("student.name", config.student.name, models.MODELS)
  _check_kwargs("student", config.student.name, config.student.get("kwargs"))
  for name, teacher in config.teachers.items():
    for key in ("model", "checkpoint"):
      if key not in teacher:
        raise ConfigError(f"config.teachers.{name} needs {key!r}.")
    unknown = sorted(set(teacher) - set(TEACHER_KEYS))
    if unknown:
      raise ConfigError(f"config.teachers.{name} has unknown key(s) {unknown}; a teacher takes "
                        f"{list(TEACHER_KEYS)}.")
    if teacher.model == HF_MODEL:  # An open-weights directory: kwargs only how it runs.
      check_hf_teacher_kwargs(name, teacher.get("kwargs"))
    else:
      _check_name(f"teachers.{name}.model", teacher.model, models.MODELS)
      _check_kwargs(f"teachers.{name}", teacher.model, teacher.get("kwargs"))
    _check_choice(f"teachers.{name}.dtype", teacher.get("dtype", "float32"), DTYPES)
    _check_teacher_tokenizer(config, name, teacher)
  try:
    build_objective(config.losses, list(config.teachers))
  except (KeyError, ValueError) as e:
    raise ConfigError(f"config.losses: {e}") from e
  for name, stage in config.stages.items():
    if name == "train":
      raise ConfigError("config.stages.train: 'train' names the main stage (config.losses); "
                        "give the pre-training stage another name.")
    unknown = sorted(set(stage) - {"num_epochs", "num_steps", "losses", "train", "lr"})
    if unknown or "losses" not in stage:
      raise ConfigError(f"config.stages.{name} needs 'losses' and takes 'num_epochs' or "
                        f"'num_steps', 'train', 'lr'; got {sorted(stage)}.")
    _check_choice(f"stages.{name}.train", stage.get("train", "all"), ("all", "objective"))
    if stage.get("num_epochs", 0) <= 0 and stage.get("num_steps", 0) <= 0:
      raise ConfigError(f"config.stages.{name}: set num_epochs or num_steps > 0.")
    try:
      build_objective(stage.losses, list(config.teachers))
    except (KeyError, ValueError) as e:
      raise ConfigError(f"config.stages.{name}.losses: {e}") from e
  _check_choice("optim.name", config.optim.name, optim.OPTIMIZERS)
  _check_choice("optim.schedule", config.optim.schedule, optim.SCHEDULES)
  _check_parallel(config)
  _check_fused_logits(config)
  _check_choice("dtype", config.get("dtype", "float32"), DTYPES)
  k = config.optim.get("accumulate_steps", 1)
  if not isinstance(k, int) or k < 1 or config.batch_size % k:
    raise ConfigError(f"config.optim.accumulate_steps is {k!r}; give a positive integer that "
                      f"divides batch_size {config.batch_size}.")
  tasks.get_task(config.get("task")).validate(config)  # The task's own checks.
  if "train" in config:
    _check_choice("train.on_nonfinite", config.train.on_nonfinite, NONFINITE_ACTIONS)
  if "log" in config:
    try:
      check_writers(list(config.log.writers), config.log.to_dict())
    except ValueError as e:
      raise ConfigError(f"config.log.writers: {e}") from e
  check_ranges(config)
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("Set config.num_epochs or config.num_steps to a positive number.")


def parallel_layout(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `Parallel` layout settings of `config.parallel` (defaults for keys a config lacks)."""
  p = config.parallel
  return {"mesh": dict(p.get("mesh", None) or {"data": -1, "fsdp": 1, "tensor": 1}),
          "min_shard_size": int(p.get("min_shard_size", DEFAULT_MIN_SHARD_SIZE)),
          "teacher_sharding": p.get("teacher_sharding", "replicated")}


def _check_parallel(config: ml_collections.ConfigDict) -> None:
  """The layout's rules that need no devices (`layout.check_layout`) and the backend's name;
  the mesh's product is checked against the devices when `Parallel` is built, and the backend
  against the one found when the run starts (`common.backend.cpu_refusal`)."""
  layout = parallel_layout(config)
  check_layout(config.parallel.mode, layout["mesh"], layout["teacher_sharding"])
  check_backend_setting(config.parallel.get("backend", ""))


def _check_fused_logits(config: ml_collections.ConfigDict) -> None:
  """`config.fused_logits` is a chunk length >= 0; when > 0, every loss term (of every stage)
  reads logits chunk by chunk (`register_loss(..., fused_logits=True)`) and the step is jit's
  (pmap's gather of whole logits is refused). Whether the models have a `head` is checked when
  the forwards are built (`train.compiled.build_applies`)."""
  chunk = config.get("fused_logits", 0)
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ConfigError(f"config.fused_logits is {chunk!r}; give 0 (whole logits) or a chunk "
                      "length C > 0 (positions per chunk, e.g. 128).")
  if not chunk:
    return
  if config.parallel.mode == "pmap":
    raise ConfigError("config.fused_logits needs parallel.mode='jit' (pmap gathers whole "
                      "logits across devices); set --config.parallel.mode=jit or "
                      "config.fused_logits=0.")
  groups = {"losses": config.losses, **{f"stages.{n}.losses": st.losses
                                        for n, st in config.stages.items()}}
  for key, losses in groups.items():
    for term in build_objective(losses, list(config.teachers)).terms:
      if not getattr(LOSSES.get(term.loss), "fused_logits", False):
        fused = sorted(n for n in LOSSES.names() if getattr(LOSSES.get(n), "fused_logits", 0))
        raise ConfigError(
            f"config.{key}.{term.name} ({term.loss}) does not work with lazy logits "
            f"(config.fused_logits={chunk} builds no whole logits; a term says it does with "
            f"register_loss(..., fused_logits=True)): use {fused}, or set "
            "config.fused_logits=0.")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _check_name(key: str, name: Any, registry: Any) -> None:
  if name not in registry:
    raise ConfigError(f"config.{key}: {registry.unknown_message(name)}")


def _check_kwargs(key: str, model: str, kwargs: Any) -> None:
  """Every key of `config.KEY.kwargs` is one that `model` takes (`models.model_kwargs`)."""
  takes = models.model_kwargs(model)
  unknown = sorted(set(kwargs or {}) - set(takes or {}))
  if takes is None or not unknown:
    return
  listing = ", ".join(f"{k}={v!r}" for k, v in takes.items()) or "none"
  raise ConfigError(
      f"config.{key}.kwargs has {', '.join(map(repr, unknown))}, which model {model!r} does "
      f"not take; it takes: {listing}. Drop {', '.join(unknown)} (a model's kwargs are its "
      f"own: `distill-jax models` lists each model's).")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f"config.{key} is {value!r}; choose one of {list(choices)}.")


def load_config_file(spec: str, overrides: dict[str, Any] | None = None
                     ) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` as the CLI does, then applies dotted-key `overrides`.

  `overrides={'optim.lr': 0.1}` is the programmatic form of `--config.optim.lr=0.1`; a whole
  section may be replaced too (`{'losses': {'ce': {'weight': 1.0}}}`). Returns the config
  locked (no new keys; values may still be set). Raises ConfigError for a missing file, an
  `arg` the file's `get_config` refuses, an unknown key (with the CLI's message: the keys at
  that level and the closest match) or a value of the wrong type. A model named anew brings
  its own kwargs, as on the command line (`switch_models`).
  """
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("distill_jax_config_file", path)
  if module_spec is None or not os.path.exists(path):
    raise ConfigError(f"No config file at {path!r} (relative to {os.getcwd()}).")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(arg or None) if arg else module.get_config()
  except (ValueError, KeyError, TypeError) as e:  # The file's own check of its arg.
    raise ConfigError(str(e.args[0] if e.args else e)) from e
  switch_models(config, overrides or {})
  for key, value in (overrides or {}).items():
    problem = missing_key(config, key)
    if problem:
      raise ConfigError(f"overrides[{key!r}]: {problem}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"overrides[{key!r}] = {value!r}: {e}") from e
  config.lock()
  return config


def missing_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """Why dotted `key` (e.g. 'optim.lrr') names no setting of `config`, as the CLI says it
  ("config.optim has no key 'lrr' (did you mean 'lr'?); it has: ..."), or None if it does."""
  node, path = config, []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = "config." + ".".join(path) if path else "config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      listing = f"; it has: {', '.join(known)}" if known else ""
      return f"{where} has no key {part!r}{hint}{listing}."
    node, path = node[part], [*path, part]
  return None


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a finished (or started) run was trained with: `workdir/config.json`, its JSON
  lists back to tuples (model kwargs, layer lists), locked. Raises ConfigError naming the file
  when it is missing or unreadable."""
  path = os.path.join(os.path.abspath(workdir), "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"No run config at {path}: give a run's workdir (it holds config.json), "
                      "or pass the config.") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"Unreadable run config {path}: {e}") from e
  config = ml_collections.ConfigDict(lists_to_tuples(saved))
  config.lock()
  return config


def lists_to_tuples(x: Any) -> Any:
  """JSON's lists back to the tuples a config holds (model kwargs must be hashable)."""
  if isinstance(x, dict):
    return {k: lists_to_tuples(v) for k, v in x.items()}
  return tuple(lists_to_tuples(v) for v in x) if isinstance(x, list) else x
