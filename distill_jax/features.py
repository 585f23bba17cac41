"""Wraps a Flax model into the one forward signature the objective consumes.

`apply(variables, batch, train, rng) -> Outputs(logits, features, new_state)`. Any pure
function with that signature can be a student or a teacher. Built-in models `sow` stable
feature names ('stem', 'stage1', ..., 'pool') into the 'intermediates' collection; the
wrapper returns the ones asked for, so an unused feature costs nothing after compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from distill_jax.outputs import Outputs

ApplyFn = Callable[[Mapping[str, Any], Mapping[str, jax.Array], bool, jax.Array | None], Outputs]


def make_apply(module: nn.Module, *, input_key: str = "image",
               features: Sequence[str] = ()) -> ApplyFn:
  """Returns the pure forward of `module` on `batch[input_key]`, tapping `features`."""
  features = tuple(features)

  def apply(variables: Mapping[str, Any], batch: Mapping[str, jax.Array], train: bool,
            rng: jax.Array | None = None) -> Outputs:
    mutable = [c for c in variables if c != "params"] if train else []
    if features:
      mutable.append("intermediates")
    rngs = {"dropout": rng} if rng is not None else {}
    out = module.apply(variables, batch[input_key], train=train, rngs=rngs,
                       mutable=mutable or False)
    logits, new_state = out if mutable else (out, {})
    new_state = dict(new_state)
    sown = new_state.pop("intermediates", {})
    tapped = {}
    for name in features:
      if name not in sown:
        raise KeyError(f"Feature {name!r} is not sown by {type(module).__name__}; it sows "
                       f"{sorted(sown)}.")
      tapped[name] = sown[name][-1]
    return Outputs(logits, tapped, new_state)

  return apply
