"""The pure train and eval steps. Everything static is bound with functools.partial.

    state, metrics = train_step(state, teacher_vars, batch)

Teachers run in eval mode under stop_gradient; their variables are an argument (never closed
over), so they can be replicated or sharded like any input. The gradient is taken with
respect to `state.params` only (the student's and the objective's own). With `axis_name`
set (pmap), gradients and metrics are averaged across devices; under jit on a mesh XLA does
the same from the shardings, so the two give the single-device result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from distill_jax.common.outputs import Outputs
from distill_jax.data import batch_keys
from distill_jax.losses.objective import Objective
from distill_jax.models.forward import ApplyFn
from distill_jax.tasks.base import Task
from distill_jax.train.state import TrainState


def teacher_forward(teacher_applies: Mapping[str, ApplyFn], teacher_vars: Mapping[str, Any],
                    batch: Mapping[str, jax.Array]) -> dict[str, Outputs]:
  """Every teacher's eval-mode forward on the batch, with gradients stopped."""
  return {name: jax.lax.stop_gradient(apply(teacher_vars[name], batch, False))
          for name, apply in teacher_applies.items()}


def _global(student: Outputs, teachers: Mapping[str, Outputs], batch: Mapping[str, jax.Array],
            axis_name: str | None) -> tuple[Outputs, dict[str, Outputs], dict[str, jax.Array]]:
  """The outputs and batch of all devices along `axis_name` (unchanged when None)."""
  if axis_name is None:
    return student, dict(teachers), dict(batch)
  if student.lazy or any(t.lazy for t in teachers.values()):
    raise ValueError("Lazy logits (config.fused_logits) run under parallel.mode='jit' only: "
                     "pmap's step gathers whole logits.")
  gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
  outputs = lambda o: Outputs(gather(o.logits), jax.tree.map(gather, o.features), {})
  return (outputs(student), {n: outputs(t) for n, t in teachers.items()},
          jax.tree.map(gather, dict(batch)))


# What the finite guard checks, in the bit order of the `nonfinite` metric.
GUARDED_PARTS = ("loss", "params", "model_state", "objective_state", "opt_state")


def nonfinite_mask(parts: Sequence[Any]) -> jax.Array:
  """An int32 bit mask over `parts` (pytrees): bit i is set when a leaf of parts[i] holds a
  NaN or an infinity. One fused reduction, cheap beside the step; 0 means all finite."""
  mask = jnp.zeros((), jnp.int32)
  for i, part in enumerate(parts):
    leaves = [x for x in jax.tree.leaves(part) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if leaves:
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
      mask = mask | jnp.where(finite, 0, 1 << i).astype(jnp.int32)
  return mask


def nonfinite_parts(mask: int) -> list[str]:
  """The names of the parts whose bits `mask` sets (see `GUARDED_PARTS`)."""
  return [name for i, name in enumerate(GUARDED_PARTS) if int(mask) >> i & 1]


def _split(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B / k, ...]: micro-batch j holds rows j, j + k, j + 2k, ... (every
  device's rows take part in every micro-batch, so none sits idle)."""
  return {key: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
          for key, x in batch.items()}


def _micro_mean(tree: Any, weights: jax.Array | None) -> Any:
  """The mean over the leading (micro-batch) axis of every leaf of `tree`: with `weights` [k]
  (each micro-batch's `Task.loss_weight`), `sum_j w_j x_j / max(sum_j w_j, 1)`, which for a
  mean over kept tokens is the mean over the whole batch's kept tokens (see `train_step`);
  without, the plain mean (equal micro-batches of examples)."""
  if weights is None:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
  total = jnp.maximum(jnp.sum(weights), 1.0)

  def mean(x):
    w = weights.reshape(-1, *(1,) * (x.ndim - 1)).astype(x.dtype)
    return jnp.sum(w * x, axis=0) / total.astype(x.dtype)

  return jax.tree.map(mean, tree)


def train_step(state: TrainState, teacher_vars: Mapping[str, Any], batch: Mapping[str, jax.Array],
               *, student_apply: ApplyFn, teacher_applies: Mapping[str, ApplyFn],
               objective: Objective, tx: optax.GradientTransformation,
               axis_name: str | None = None, step_offset: int = 0, accumulate_steps: int = 1,
               skip_nonfinite: bool = False, task: Task, on_policy: Any = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update of the student (and the objective's parameters).

  `state.step` counts steps over all stages; the objective sees the step within its stage
  (`state.step - step_offset`), so warm-ups start with the stage. Only the teachers that a
  term reads run (a student trained alone, with teachers listed for eval, runs none).
  The metric `nonfinite` flags a NaN/inf in the loss or the new state (`nonfinite_mask`);
  with `skip_nonfinite` such an update is dropped (the step and RNG still advance).

  `accumulate_steps = k > 1` splits the batch into k micro-batches and runs forward (teachers
  included) and backward on one at a time in a `lax.scan`, then averages their gradients and
  metrics weighted by each micro-batch's share of what the batch's losses average over
  (`Task.loss_weight`: a language model's kept tokens, `sum(mask)`; for classification every
  micro-batch weighs alike, its examples). So a term that is a mean over the batch's examples
  or over its kept tokens (mask 0/1) gives the big-batch loss, gradients and update, with ~1/k
  of the activation memory, however unevenly the masks (EOS, prompts, padding) fall on the
  micro-batches: every `token_*` term but `token_sparse_topk_kd` (whose mean is over the kept
  positions that the file gave log-probabilities for), and every classification term of
  per-example means. Not exact: terms that relate the examples of a batch (SP, RKD, CC, CRD's
  normaliser relate those of a micro-batch); a per-example mean in a language model's
  objective (weighted by tokens, not examples); BatchNorm, which normalises each micro-batch
  with its own statistics and updates its running averages k times per step (as k smaller
  steps would).

  `on_policy` (the language model's `OnPolicy`, from `Task.build_extras`): first, with its
  probability, the batch becomes the student's own continuations of its rows' prompts (sampled from
  the current params, no gradient through the sampling; keys from `OnPolicy.keys(state.rng)`), which
  the teachers then score and the objective compares on the generated tokens (it gets the teachers'
  variables too: MiniLLM's teacher-mixed sampling decodes with a teacher). A batch key that would
  not follow the samples (`data.batch_keys`: a teacher cache, a black-box file's top-k, an
  undeclared key) is refused here, at trace time (`build_run` refuses the config before).
  """
  if on_policy is not None:
    stale = batch_keys.rollout_problems(batch, task.rollout_keys)
    if stale:
      raise ValueError("The on-policy step replaces the rows by the student's samples, but "
                       "these batch keys would still describe the original rows: "
                       + "; ".join(stale) + ".")
    batch = on_policy({"params": state.params["student"], **state.model_state}, batch,
                      state.rng, axis_name, teacher_vars=teacher_vars)
  rng, model_rng, loss_rng = jax.random.split(state.rng, 3)
  used = objective.teachers_used(tuple(teacher_applies))
  applies = {n: teacher_applies[n] for n in used}
  step = state.step - step_offset

  def micro_step(carry, inputs):
    model_state, objective_state = carry
    micro_batch, model_key, loss_key = inputs
    teachers = teacher_forward(applies, teacher_vars, micro_batch)

    def loss_fn(params):
      variables = {"params": params["student"], **model_state}
      student = student_apply(variables, micro_batch, True, model_key)
      # The objective sees the global batch in every mode: under pmap each device gathers the
      # others' outputs, so relational terms (SP, RKD, CRD, ...) relate the same examples as
      # on one device. all_gather's transpose sums the cotangents back onto each device's own
      # rows, so the pmean of gradients below is the single-device gradient.
      total, terms, new_objective_state = objective(
          params["objective"], objective_state,
          *_global(student, teachers, micro_batch, axis_name), step, loss_key)
      return total, (student, terms, new_objective_state)

    (loss, (student, terms, new_objective_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_model_state = student.new_state
    if axis_name is not None:
      new_model_state = jax.lax.pmean(new_model_state, axis_name)
    metrics = {"loss": loss, **{f"loss/{name}": value for name, value in terms.items()},
               **task.train_metrics(student, teachers, micro_batch)}
    # What the micro-batch weighs in the step's mean: the global one's, as the loss sees it.
    weight = task.loss_weight(micro_batch) if accumulate_steps > 1 else None
    if weight is not None and axis_name is not None:
      weight = jax.lax.psum(weight, axis_name)
    return (new_model_state, new_objective_state), (grads, metrics, weight)

  carry = (state.model_state, state.objective_state)
  if accumulate_steps == 1:
    (model_state, objective_state), (grads, metrics, _) = micro_step(
        carry, (batch, model_rng, loss_rng))
  else:
    keys = lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(accumulate_steps))
    (model_state, objective_state), (grads, metrics, weights) = jax.lax.scan(
        micro_step, carry, (_split(batch, accumulate_steps), keys(model_rng), keys(loss_rng)))
    grads, metrics = _micro_mean((grads, metrics), weights)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  updated = (params, model_state, objective_state, opt_state)
  metrics["nonfinite"] = nonfinite_mask((metrics["loss"], *updated))  # Same on every device.
  if skip_nonfinite:
    old = (state.params, state.model_state, state.objective_state, state.opt_state)
    updated = jax.tree.map(lambda new, prev: jnp.where(metrics["nonfinite"] == 0, new, prev),
                           updated, old)
  params, model_state, objective_state, opt_state = updated
  new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            objective_state=objective_state, opt_state=opt_state, rng=rng)
  return new_state, metrics


def eval_step(state: TrainState, teacher_vars: Mapping[str, Any], batch: Mapping[str, jax.Array],
              *, student_apply: ApplyFn, teacher_applies: Mapping[str, ApplyFn],
              task: Task, axis_name: str | None = None) -> dict[str, jax.Array]:
  """The task's metric sums over the (masked) batch (`Task.eval_sums`; for classification:
  correct top-1/top-5, CE, and fidelity to each teacher and their ensemble). Returns sums,
  not means, so the host can add batches (and devices) and divide once."""
  student = student_apply(state.student_variables(), batch, False)
  teachers = teacher_forward(teacher_applies, teacher_vars, batch)
  sums = task.eval_sums(student, teachers, batch)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums
