"""An objective's program, from plain objects (no config): the student's and teachers'
forwards that tap what it compares, its initialisation and abstract trace, and the compiled
train and eval steps.

`train.build.build_run` assembles a run from these; benchmarks and tests that build their own
pieces call them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import config as config_lib
from distill_jax import tasks
from distill_jax.data import teacher_cache
from distill_jax.losses import cross_tokenizer as xtok
from distill_jax.losses.objective import Objective
from distill_jax.models.forward import ApplyFn, check_features, list_features, make_apply
from distill_jax.teachers import Teacher, init_shapes
from distill_jax.train.parallel import Parallel


def build_applies(student: Any, student_name: str, teachers: dict[str, Teacher],
                  objective: Objective, input_shape: tuple[int, ...],
                  input_key: str, cached: tuple[str, ...] = (),
                  student_dtype: str | None = None, fused_logits: int = 0,
                  vocab_maps: Mapping[str, np.ndarray] | None = None,
                  cache_top_k: Mapping[str, tuple[int, int]] | None = None
                  ) -> tuple[ApplyFn, dict[str, ApplyFn]]:
  """The student's and teachers' forwards on `batch[input_key]` (the task's `input_key`),
  tapping what the objective compares.

  `student_dtype` (and each teacher's `dtype`) is the forward's compute dtype (see
  `models.forward.make_apply`): params and optimizer state stay float32.
  `fused_logits = C > 0` (`config.fused_logits`): the student's and the live teachers'
  logits are lazy (`make_apply`'s `fused_chunk`), for models with an output `head`.

  Every requested feature is checked against the model's tappable features first; an unknown
  name fails with the list of what can be tapped. A `cached` teacher's forward reads its
  logits from the batch, so no term may ask for its features; `cache_top_k` {teacher:
  (num_classes, k)} names those read from a top-k cache, whose packed records the forward
  decodes on the device (`data.teacher_cache.cached_apply`; lazily with `fused_logits`).

  `vocab_maps` {teacher: int32 [its vocabulary]}: the teachers with their own tokenizer
  (cross-tokenizer distillation): each reads its own ids (`xtok/NAME/tokens`) and its outputs
  carry its map onto the student's vocabulary (`losses.cross_tokenizer.with_vocab_map`).
  """
  vocab_maps = dict(vocab_maps or {})
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
  if fused_logits:
    live = {f"teacher {n!r} ({t.model})": t.module for n, t in teachers.items() if n not in cached}
    for desc, module in {f"student {student_name}": student, **live}.items():
      if not callable(getattr(module, "head", None)):
        raise config_lib.ConfigError(
            f"config.fused_logits={fused_logits} computes logits from the final hidden states "
            f"through the model's `head`, which the {desc} lacks (a language model such as "
            "transformer_lm or 'hf' has one); set config.fused_logits=0.")
  def teacher_apply(name: str, t: Teacher) -> ApplyFn:
    if name in cached:
      return teacher_cache.cached_apply(name, *(cache_top_k or {}).get(name, (0, 0)),
                                        fused_chunk=fused_logits)
    key = xtok.batch_key(name, "tokens") if name in vocab_maps else input_key
    apply = make_apply(t.module, input_key=key, features=objective.teacher_features(name),
                       input_size=t.input_size, dtype=t.dtype, fused_chunk=fused_logits)
    return xtok.with_vocab_map(apply, vocab_maps[name]) if name in vocab_maps else apply

  return (make_apply(student, input_key=input_key, features=objective.student_features,
                     dtype=student_dtype, fused_chunk=fused_logits),
          {name: teacher_apply(name, t) for name, t in teachers.items()})


def compile_steps(parallel: Parallel, student_apply: ApplyFn,
                  teacher_applies: dict[str, ApplyFn], objective: Objective,
                  tx: Any, *, task: tasks.Task, step_offset: int = 0,
                  accumulate_steps: int = 1, skip_nonfinite: bool = False,
                  on_policy: Any = None) -> tuple[Callable, Callable]:
  """The compiled (train_step, eval_step) of the forwards and the objective, for `task`
  (with `on_policy`, e.g. the language model's `OnPolicy`, the train step first replaces
  the batch by what it returns)."""
  static = dict(student_apply=student_apply, teacher_applies=teacher_applies, task=task)
  policy = {"on_policy": on_policy} if on_policy is not None else {}
  return (parallel.compile_train_step(objective=objective, tx=tx, step_offset=step_offset,
                                      accumulate_steps=accumulate_steps,
                                      skip_nonfinite=skip_nonfinite, **policy, **static),
          parallel.compile_eval_step(**static))


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
