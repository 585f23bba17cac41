"""Frozen teachers: built from the config and loaded from exported model directories.

    config.teachers = {'resnet56': {'model': 'resnet56', 'kwargs': {}, 'checkpoint': 'runs/t56'}}

`checkpoint` is a finished run's workdir (its `model/` export is used) or an export directory
itself. Loading checks that the file was saved from the same model and that every parameter's
path and shape match, and says which file and which parameter when they do not.

An open-weights teacher (a Hugging Face Llama-family directory, `models.hf`) is `model: 'hf'`
with the directory as `checkpoint`; its config.json gives the architecture, `kwargs` only how
it runs (`HF_TEACHER_KWARGS`: `attention_implementation`, `remat`; anything else is refused),
and `dtype` ('float32' or 'bfloat16') both its weights' and its forward's dtype:

    config.teachers = {'qwen': teacher_config('hf', checkpoint='/models/Qwen2.5-0.5B',
                                              dtype='bfloat16')}

Its tokenizer must be the data's (`config.data.tokenizer = 'hf:<a directory with the same
tokenizer.json>'`, the student's too): the language-model task's `check_teachers`
(`tasks.language_model.check_tokenizers`) refuses a run that pairs two, unless the teacher
names its own (`teachers.NAME.tokenizer='hf:<its directory>'`; cross-tokenizer distillation,
docs/cross_tokenizer.md). Any language-model teacher may have its own tokenizer that way: it
then predicts over that tokenizer's vocabulary (`load_teachers`) and reads the rows
re-tokenised for it.

Placement (`train/parallel.py`): a live teacher follows its model's tensor-parallel rules over
the mesh's `tensor` axis (`parallel.mesh.tensor > 1`; transformer_lm's Megatron split, so an
open-weights teacher whose layers do not fit one device can run), and
`parallel.teacher_sharding` ('replicated' or 'fsdp') says whether it is split over `fsdp` too.

`cache_teachers` runs a config's teachers once over its data and writes their output caches
(`data.teacher_cache`; the command line is `scripts/cache_teacher.py`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from distill_jax import models
from distill_jax.common.model_io import CheckpointError, load_model_variables, read_model_meta
from distill_jax.common.rules import ConfigError

HF_MODEL = "hf"  # config.teachers.NAME.model of an open-weights (Hugging Face) teacher.
# The transformer_lm kwargs an open-weights teacher takes from `teachers.NAME.kwargs`: how it
# runs, not what it computes (config.json gives the architecture; `bos_id` follows the student).
# With their defaults (transformer_lm's), the kwargs a teacher switched to 'hf' starts with.
HF_TEACHER_KWARGS = {"attention_implementation": None, "remat": False}


def check_hf_teacher_kwargs(name: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
  """`config.teachers.NAME.kwargs` of an open-weights teacher as a dict, refused (ConfigError,
  naming the keys and the ones it takes) unless every key is one of `HF_TEACHER_KWARGS`."""
  kwargs = dict(kwargs or {})
  unknown = sorted(set(kwargs) - set(HF_TEACHER_KWARGS))
  if unknown:
    raise ConfigError(
        f"config.teachers.{name}.kwargs has {', '.join(map(repr, unknown))}, which an "
        f"open-weights teacher (model 'hf') does not take: its config.json gives the "
        f"architecture. It takes {', '.join(HF_TEACHER_KWARGS)}.")
  return kwargs


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its Flax module and loaded variables (the forward is built per run, so
  it taps exactly the features the objective compares)."""

  name: str
  model: str
  module: Any
  variables: Any
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  checkpoint: str = ""  # The export directory it was loaded from.
  input_size: tuple[int, int] | None = None  # (H, W) it sees; None: the data's own size.
  dtype: str | None = None  # Its forward's compute dtype (None: float32).
  tokenizer: str | None = None  # An open-weights teacher's tokenizer.json.
  # config.teachers.NAME.tokenizer: it reads the rows re-tokenised in its own tokens
  # (cross-tokenizer distillation); None: the data's tokens.
  own_tokenizer: str | None = None

  def input_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (H, W, C) this teacher runs at, given the data's (H, W, C)."""
    return (*self.input_size, *data_shape[2:]) if self.input_size else tuple(data_shape)


def resolve_export_dir(checkpoint: str) -> str:
  """A run's workdir -> its `model/` export; an export directory stays as it is."""
  nested = os.path.join(checkpoint, "model")
  return nested if os.path.exists(os.path.join(nested, "model.json")) else checkpoint


def init_shapes(module: Any, input_shape: tuple[int, ...]) -> Any:
  """The variables pytree of `module` as ShapeDtypeStructs (no compute, no compile)."""
  dummy = jax.ShapeDtypeStruct((1, *input_shape), jax.numpy.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), dummy)


def load_teacher(name: str, settings: Mapping[str, Any], num_classes: int,
                 input_shape: tuple[int, ...], *, mask_documents: bool = False,
                 shardings: Any = None) -> Teacher:
  """Builds teacher `name` from its config entry and loads its exported variables.

  `input_shape` is the data's (H, W, C); a teacher with `input_size=(H', W')` is built (and its
  parameter shapes checked) at (H', W', C), and the step resizes the images for it.
  `mask_documents` and `shardings` are an open-weights teacher's (`load_hf_teacher`).
  """
  model_name = settings["model"]
  if model_name == HF_MODEL:
    return load_hf_teacher(name, settings, num_classes, mask_documents=mask_documents,
                           shardings=shardings)
  kwargs = dict(settings.get("kwargs") or {})
  module = models.build_model(model_name, num_classes, **kwargs)
  checkpoint = settings.get("checkpoint")
  if not checkpoint:
    raise CheckpointError(f"Teacher {name!r} has no checkpoint: set "
                          f"--config.teachers.{name}.checkpoint=<a teacher run's workdir>.")
  directory = resolve_export_dir(checkpoint)
  meta = read_model_meta(directory)
  if meta.get("model") != model_name or meta.get("num_classes") != num_classes:
    raise CheckpointError(
        f"Teacher {name!r} is configured as {model_name} with {num_classes} classes, but "
        f"{os.path.join(directory, 'model.json')} was saved from {meta.get('model')} with "
        f"{meta.get('num_classes')} classes.")
  input_size = settings.get("input_size")
  if input_size is not None:
    input_size = tuple(int(d) for d in input_size)
    if len(input_size) != 2 or min(input_size) < 1:
      raise CheckpointError(f"config.teachers.{name}.input_size must be (height, width), got "
                            f"{settings.get('input_size')!r}.")
  teacher = Teacher(name, model_name, module, None, kwargs, directory, input_size,
                    settings.get("dtype") or None)
  try:
    variables = load_model_variables(directory,
                                     init_shapes(module, teacher.input_shape(input_shape)))
  except CheckpointError as e:
    if input_size is not None:
      raise
    raise CheckpointError(f"{e}\nIf teacher {name!r} was trained on images of another size "
                          f"than the data's {tuple(input_shape[:2])}, set "
                          f"config.teachers.{name}.input_size=(H, W).") from None
  return dataclasses.replace(teacher, variables=variables)


def load_hf_teacher(name: str, settings: Mapping[str, Any], num_classes: int, *,
                    mask_documents: bool = False, shardings: Any = None) -> Teacher:
  """An open-weights teacher: a Hugging Face directory loaded into `transformer_lm`.

  `mask_documents`: the student's attention stops at document starts (its `bos_id` is set),
  so the teacher's does too, at its tokenizer's BOS (the data's: the tokenizers are checked
  equal), and both see the same packed rows. `shardings`: `hf.load_hf`'s (e.g.
  `Parallel.teacher_shardings_of`): the variables are read straight into their shards.
  `settings.kwargs` (`HF_TEACHER_KWARGS`, e.g. `attention_implementation='cudnn'`) are set on
  the module config.json builds.
  """
  from distill_jax.models import hf  # safetensors and tokenizers load only when used.
  directory = settings.get("checkpoint")
  if not directory:
    raise CheckpointError(f"Teacher {name!r} (model 'hf') needs the Hugging Face model "
                          f"directory: set --config.teachers.{name}.checkpoint=<directory>.")
  overrides = check_hf_teacher_kwargs(name, settings.get("kwargs"))
  dtype = settings.get("dtype") or "float32"
  kwargs, variables, tokenizer = hf.load_hf(directory, dtype, shardings)
  kwargs = {**kwargs, **overrides}
  if mask_documents:
    if tokenizer.bos_id is None:
      raise CheckpointError(
          f"Teacher {name!r} ({directory}): the student masks documents at a BOS token "
          "(config.student.kwargs.bos_id) but this tokenizer has no BOS token; set "
          "config.student.kwargs.bos_id=None.")
    kwargs = {**kwargs, "bos_id": tokenizer.bos_id}
  if tokenizer.vocab_size != num_classes:
    raise CheckpointError(
        f"Teacher {name!r} ({directory}) predicts over {tokenizer.vocab_size} tokens but the "
        f"data's tokenizer has {num_classes}: set --config.data.tokenizer=hf:{directory} (the "
        "student then shares the teacher's tokenizer).")
  module = models.build_model("transformer_lm", tokenizer.vocab_size, **kwargs)
  return Teacher(name, "transformer_lm", module, variables, kwargs, directory, None, dtype,
                 tokenizer.path)


def load_teachers(teachers_config: Mapping[str, Any], num_classes: int,
                  input_shape: tuple[int, ...], *, mask_documents: bool = False,
                  shardings: Any = None) -> dict[str, Teacher]:
  """`load_teacher` for each entry of `config.teachers`; a teacher with its own tokenizer
  (`teachers.NAME.tokenizer`) predicts over that tokenizer's vocabulary, not `num_classes`."""
  from distill_jax.models.tokenizers import get_tokenizer

  loaded = {}
  for name, settings in teachers_config.items():
    own = settings.get("tokenizer") or None
    classes = get_tokenizer(own).vocab_size if own else num_classes
    teacher = load_teacher(name, settings, classes, input_shape,
                           mask_documents=mask_documents, shardings=shardings)
    loaded[name] = dataclasses.replace(teacher, own_tokenizer=own)
  return loaded


def student_masks_documents(config: Any) -> bool:
  """Whether the run's student attends within documents only (`student.kwargs.bos_id` set):
  its open-weights teachers then do too (`load_hf_teacher`)."""
  return (config.student.get("kwargs") or {}).get("bos_id") is not None


def cache_teachers(config: Any, cache_dir: str, *, names: Sequence[str] = (), top_k: int = 0,
                   dtype: str = "float32", batch_size: int = 256, progress_bar: bool = False
                   ) -> dict[str, str]:
  """Writes `cache_dir/NAME` (`data.teacher_cache`) for each of the run config's teachers
  (default: all of them), on the config's train and eval splits with its data settings and
  seed. Returns {name: dir}. `scripts/cache_teacher.py` is its command line.

  It lives here, not in the data layer, because it reads a whole run config and builds the
  task and the teachers; the cache module itself knows only records and fingerprints.
  """
  from tqdm import tqdm

  from distill_jax import tasks
  from distill_jax.data.teacher_cache import CacheError, num_slots, write_cache

  task = tasks.get_task(config.get("task"))
  info = task.info(config.data)
  names = list(names) or list(config.teachers)
  unknown = sorted(set(names) - set(config.teachers))
  if unknown:
    raise CacheError(f"No teacher(s) {unknown} in the config; it has {sorted(config.teachers)}.")
  splits = (config.data.train_split, config.data.eval_split)
  train = task.input_fingerprint(config.data, splits[0], config.seed, augmented=True)
  per_teacher = (num_slots(train) * train["num_examples"]
                 + info.num_examples[splits[1]])
  written = {}
  with tqdm(total=per_teacher * len(names), disable=not progress_bar, unit="ex",
            desc="cache") as bar:
    for name in names:
      teacher = load_teacher(name, config.teachers[name], info.num_classes, info.input_shape,
                             mask_documents=student_masks_documents(config))
      directory = os.path.join(cache_dir, name)
      write_cache(directory, teacher, task, config.data, seed=config.seed, splits=splits,
                  batch_size=batch_size, top_k=top_k, dtype=dtype,
                  checkpoint=teacher.checkpoint, progress=bar.update)
      written[name] = directory
  return written
