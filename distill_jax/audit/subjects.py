"""The models an audit looks at: the student (weights), candidates and controls (outputs).

- `Exported`: a model exported by a run (`WORKDIR/model/` or the export directory itself), with
  its weights: the student must be one, since the data-free probe optimises inputs through it.
- `QueryOnly`: a model seen only through `fn(images [N, H, W, C]) -> logits [N, K]` (a language
  model: `fn(token ids [N, L]) -> logits [N, L, V]`): how the
  audit treats every candidate teacher (an API, another lab's model) and every control. The
  audit never asks it for anything but outputs, and counts the inputs it was asked about.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from distill_jax import models
from distill_jax.common.model_io import load_model_variables, read_model_meta
from distill_jax.teachers import init_shapes, resolve_export_dir


class AuditError(ValueError):
  """Bad input to an audit; the message names the setting or file and what to do."""


@dataclasses.dataclass(frozen=True)
class Exported:
  """An exported model with its weights: Flax `module`, `variables` and `model.json` meta."""

  name: str
  module: Any
  variables: Any
  meta: dict
  directory: str  # The export directory (holding model.json and variables/).
  workdir: str | None  # The run's workdir when the export is its `model/`, else None.

  def __call__(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits [N, K] of `images` [N, H, W, C] (eval mode), in fixed-size padded chunks so
    one compiled forward serves every call."""
    return batched(_forward(self.module), self.variables, images, batch_size)

  def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray | None:
    """Penultimate features [N, D] of `images` (the `pool` the model sows, eval mode), or
    None for a model that sows none."""
    if not _sows_pool(self.module, self.variables, np.asarray(images[:1], np.float32)):
      return None
    return batched(_features_forward(self.module), self.variables, images, batch_size)


class QueryOnly:
  """A model seen only through its outputs; `queries` counts the inputs it was shown."""

  def __init__(self, name: str, fn: Callable[[np.ndarray], Any], ndim: int = 2,
               features: Callable[[np.ndarray], Any] | None = None):
    self.name = name
    self._fn = fn
    self._features = features  # The auditor's own models (controls): penultimate features.
    self.ndim = ndim  # 2: logits [N, K] (images); 3: [N, L, V] (token ids [N, L]).
    self.queries = 0

  def features(self, images: np.ndarray) -> np.ndarray | None:
    """Penultimate features [N, D], when the model was given with them (a control whose
    weights the auditor has), else None."""
    return None if self._features is None else self._features(images)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    self.queries += len(images)
    logits = np.asarray(self._fn(images), np.float32)
    if logits.ndim != self.ndim or len(logits) != len(images) or (
        self.ndim == 3 and logits.shape[1] != images.shape[1]):
      want = "[N, num_classes]" if self.ndim == 2 else "[N, L, vocab] for token ids [N, L]"
      raise AuditError(f"Query-only model {self.name!r} returned logits of shape "
                       f"{logits.shape} for inputs of shape {images.shape}; expected {want}.")
    return logits


def query_only(model: Exported, ndim: int = 2, features: bool = False) -> QueryOnly:
  """`model` seen only through its outputs (its weights stay inside the closure); `ndim` 3 for
  a language model (token ids [N, L] -> logits [N, L, V]); `features`: its penultimate
  features too (for the auditor's own controls, never for candidates)."""
  return QueryOnly(model.name, lambda inputs: model(inputs), ndim,
                   model.features if features else None)


def load_exported(path: str, input_shape: tuple[int, ...], name: str | None = None,
                  flag: str = "model") -> Exported:
  """Loads a run's workdir (its `model/` export) or an export directory.

  Args:
    path: the workdir or export directory.
    input_shape: (H, W, C) of the inputs, to check the saved parameters' shapes.
    name: what the report calls it (default: the path's last component).
    flag: the command-line setting it came from, for error messages.
  Raises:
    AuditError naming `flag` and the path when nothing is exported there.
  """
  if not os.path.exists(path):
    raise AuditError(f"--{flag}: {path} does not exist (give a finished run's workdir or "
                     "its model/ export directory).")
  directory = resolve_export_dir(path)
  if not os.path.exists(os.path.join(directory, "model.json")):
    raise AuditError(f"--{flag}: no exported model at {path} (neither "
                     f"{os.path.join(path, 'model', 'model.json')} nor "
                     f"{os.path.join(path, 'model.json')} exists); a run exports its model "
                     "when it finishes.")
  meta = read_model_meta(directory)
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in (meta.get("kwargs") or {}).items()}  # JSON lists -> hashable tuples.
  module = models.build_model(meta["model"], int(meta["num_classes"]), **kwargs)
  variables = load_model_variables(directory, init_shapes(module, tuple(input_shape)))
  workdir = os.path.dirname(directory) if directory != path.rstrip(os.sep) else None
  label = name or os.path.basename(os.path.normpath(path))
  return Exported(label, module, variables, meta, directory, workdir)


_FORWARDS: dict[int, tuple[Any, Callable]] = {}  # id -> (module, its jitted forward).


def _forward(module: Any) -> Callable:
  """The jitted eval forward of `module` (one per module object, compiled once per shape)."""
  key = id(module)
  if key not in _FORWARDS:
    _FORWARDS[key] = (module, jax.jit(
        lambda variables, x: module.apply(variables, x, train=False)))
  return _FORWARDS[key][1]


_FEATURES: dict[int, tuple[Any, Callable]] = {}  # id -> (module, its jitted feature forward).


def _sows_pool(module: Any, variables: Any, x: np.ndarray) -> bool:
  """Whether `module` sows the `pool` features (checked on an abstract trace: no compute)."""
  def tap(v, x):
    return module.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]

  return "pool" in jax.eval_shape(tap, variables, x)


def _features_forward(module: Any) -> Callable:
  """The jitted eval forward of `module` returning its sown `pool` [B, D]."""
  key = id(module)
  if key not in _FEATURES:
    def pool(variables, x):
      _, state = module.apply(variables, x, train=False, mutable=["intermediates"])
      return state["intermediates"]["pool"][0].reshape(len(x), -1)

    _FEATURES[key] = (module, jax.jit(pool))
  return _FEATURES[key][1]


def batched(forward: Callable, variables: Any, images: np.ndarray, batch_size: int
            ) -> np.ndarray:
  """`forward(variables, chunk)` over `images` in chunks of `batch_size` (the last one padded
  with zeros), concatenated as float32 NumPy."""
  images = np.asarray(images, np.float32)
  n = len(images)
  size = min(batch_size, max(n, 1))
  out = []
  for start in range(0, n, size):
    chunk = images[start:start + size]
    pad = size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(forward(variables, chunk), np.float32)[:size - pad])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
