"""The train state: every array that learns or advances, as one explicit pytree."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a train step updates.

  Attributes:
    step: scalar int32, the number of optimizer updates done.
    params: {'student': student params, 'objective': trainable parts of the loss terms}.
      The optimizer updates both; only the student's are exported as a model.
    model_state: the student's other variable collections (e.g. {'batch_stats': ...}).
    objective_state: the loss terms' non-trainable collections, by term (e.g. a connector's
      batch stats, CRD's memory bank).
    opt_state: optax state for `params`.
    rng: PRNG key for the step's randomness (dropout, stochastic losses).
  """

  step: jax.Array
  params: Any
  model_state: Any
  objective_state: Any
  opt_state: Any
  rng: jax.Array

  def student_variables(self) -> dict[str, Any]:
    return {"params": self.params["student"], **self.model_state}


def create_train_state(variables: dict[str, Any], objective_params: Any, objective_state: Any,
                       tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state from the student's initial `variables` (as returned by `model.init`) and
  the objective's initial parameters and state (from `Objective.init`)."""
  variables = dict(variables)
  params = {"student": variables.pop("params"), "objective": objective_params}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                    objective_state=objective_state, opt_state=tx.init(params), rng=rng)
