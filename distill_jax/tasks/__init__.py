"""Tasks: what is specific to a kind of problem, chosen by `config.task`.

A task owns the input spec and example batch, the batch keys, the key a model reads, the
data iterators, the train and eval metrics, and the headline metric of `result.json`, and
through its hooks its own config checks, the weights the student starts from, what it
requires of teachers and what a run needs beyond the generic pieces (`Task.validate`,
`student_init`, `check_teachers`, `build_extras`); the step, objective, teachers, parallel
layer and loop call it and know no task. A task from outside the package registers itself
in `TASKS` from a module the config imports.

- `classification` (default): images [B, H, W, C] and labels [B]; top-1/top-5, CE, fidelity.
- `language_model` (a package: the task, sampling, on-policy rollout, eval samples): packed
  token rows [B, L] with next-token targets and per-token masks; perplexity, bits per byte,
  token top-1 agreement with the teachers, teacher-student KL.
"""

from distill_jax.common.registry import Registry
from distill_jax.tasks.base import Task, TaskExtras, TaskInfo
from distill_jax.tasks.classification import Classification
from distill_jax.tasks.language_model import LanguageModel

TASKS = Registry("task")
TASKS.register("classification")(Classification())
TASKS.register("language_model")(LanguageModel())
DEFAULT_TASK = "classification"


def get_task(name: str | None) -> Task:
  """The task `name` (None: classification); an unknown name lists the known ones."""
  return TASKS.get(name or DEFAULT_TASK)


__all__ = ["DEFAULT_TASK", "TASKS", "Task", "TaskExtras", "TaskInfo", "get_task"]
