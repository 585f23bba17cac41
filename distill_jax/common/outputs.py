"""`Outputs`: what every model forward returns to the objective."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class Outputs(NamedTuple):
  """One model's forward on one batch.

  Attributes:
    logits: [B, K] unnormalised class scores.
    features: {name: array} of tapped intermediates (stable sown names such as 'stage2',
      'pool', or module paths); empty when no loss term asks for features.
    new_state: the model's updated mutable collections (e.g. {'batch_stats': ...}) after a
      training-mode forward; empty for eval-mode forwards and teachers.
  """

  logits: jax.Array
  features: dict[str, jax.Array]
  new_state: dict[str, Any]
