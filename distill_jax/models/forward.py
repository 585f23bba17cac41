"""Wraps a Flax model into the one forward the objective consumes, tapping features by name.

`apply(variables, batch, train, rng) -> Outputs(logits, features, new_state)`. Any pure
function with that signature can be a student or a teacher.

A feature is named either by a stable name that built-in models `sow` ('stem', 'stage1', ...,
'pool'; a name sown inside a submodule by its path, e.g. 'block0/attn/probs'), or by a module
path ('stage2_block1', 'stage2_block1/conv2'): the output of that submodule's `__call__`,
captured with Linen's `capture_intermediates` and a filter that keeps only the requested paths,
so the model itself is never edited (torchdistill's forward hooks, done functionally). Only
requested features are kept; unused ones cost nothing once compiled. A model that computes a
feature only on request (`transformer_lm`'s attention probabilities, which its fused attention
never forms) has a method `for_features(features) -> module`: the module as it must run to
sow them (None: all of them, to list them); the forward runs that one.

Mixed precision is applied here, once for every model: with `dtype='bfloat16'` the forward
casts the floating parameters and the input to bfloat16 (so every layer computes in it; the
parameters the optimizer holds stay float32 and their gradients come back float32 through the
cast) and casts the logits and the tapped features back to float32, so every softmax, KL and
loss reduction downstream runs in float32. BatchNorm's statistics are reduced in float32 and
its running averages stay float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.common.outputs import Head, Outputs

ApplyFn = Callable[[Mapping[str, Any], Mapping[str, jax.Array], bool, jax.Array | None], Outputs]


class FeatureError(ValueError):
  """A requested feature does not exist; the message lists the model's tappable features."""


def _module_path(module: nn.Module) -> str:
  return "/".join(module.path)


def _lookup(sown: Mapping[str, Any], name: str) -> jax.Array | None:
  """The sown value `name`, or the captured output of module path `name`, or None."""
  value = sown.get(name)
  if isinstance(value, tuple):
    return value[-1]
  node: Any = sown
  for part in name.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  if isinstance(node, Mapping) and isinstance(node.get("__call__"), tuple):
    return node["__call__"][-1]
  if isinstance(node, tuple):  # A name sown inside a submodule ('block0/attn/probs').
    return node[-1]
  return None


DTYPES = ("float32", "bfloat16", "float16")


def _cast(tree: Any, dtype: Any) -> Any:
  """The floating leaves of `tree` in `dtype` (integer leaves untouched)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def for_features(module: nn.Module, features: Sequence[str] | None) -> nn.Module:
  """`module` as it must run to sow `features` (None: every feature it can): its own
  `for_features` when it has one (see the module docstring), itself otherwise."""
  select = getattr(module, "for_features", None)
  return module if select is None else select(features)


def make_apply(module: nn.Module, *, input_key: str, features: Sequence[str] = (),
               input_size: Sequence[int] | None = None, dtype: str | None = None,
               fused_chunk: int = 0) -> ApplyFn:
  """Returns the pure forward of `module` on `batch[input_key]` (the task's `input_key`:
  'image', 'tokens', ...), tapping `features`.

  `input_size=(H, W)` (an option for image inputs [B, H, W, C]) resizes the images
  (bilinear, antialiased when shrinking) before the forward: a teacher trained at another
  resolution than the student's data. `dtype` (one of `DTYPES`; None or 'float32': as the
  variables are) is the compute dtype: see the module docstring.

  `fused_chunk = C > 0` (`config.fused_logits`; a language model with a `head` method, as
  `transformer_lm`): the logits stay lazy. The forward stops at the final hidden states and
  returns `Outputs(logits=None, hidden=[B, L, D], head=Head(...))`, whose `logits_of` gives
  the float32 logits of any run of positions; token terms and the language-model task's
  metrics compute them C positions at a time, so the [B, L, V] logits never exist whole.
  """
  if dtype not in (None, *DTYPES):
    raise ValueError(f"Unknown compute dtype {dtype!r}; choose one of {list(DTYPES)}.")
  if fused_chunk < 0:
    raise ValueError(f"fused_chunk (config.fused_logits) must be >= 0, got {fused_chunk}.")
  if fused_chunk and not callable(getattr(module, "head", None)):
    raise ValueError(
        f"config.fused_logits={fused_chunk} needs a language model with an output `head` "
        f"method (transformer_lm, 'hf'); {type(module).__name__} has none: set "
        "config.fused_logits=0.")

  compute = None if dtype in (None, "float32") else jnp.dtype(dtype)

  def project(params: Any, hidden: jax.Array) -> jax.Array:
    # The head's params stay float32 in `Head` and are cast here, per chunk, so the gradient a
    # scan over chunks accumulates for them is float32, as the params' own.
    if compute is not None:
      params = _cast(params, compute)
    return module.apply({"params": params}, hidden, method="head")
  features = tuple(dict.fromkeys(features))
  paths = frozenset(features)
  module = for_features(module, features)

  def keep(mdl: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and _module_path(mdl) in paths

  def apply(variables: Mapping[str, Any], batch: Mapping[str, jax.Array], train: bool,
            rng: jax.Array | None = None) -> Outputs:
    mutable = [c for c in variables if c != "params"] if train else []
    if features:
      mutable.append("intermediates")
    rngs = {"dropout": rng} if rng is not None else {}
    x = batch[input_key]
    if input_size is not None and tuple(x.shape[1:3]) != tuple(input_size):
      x = jax.image.resize(x, (x.shape[0], *input_size, *x.shape[3:]), method="bilinear")
    params = variables["params"]
    if compute is not None:
      variables = {**variables, "params": _cast(params, compute)}
      x = _cast(x, compute)
    fused = {"return_hidden": True} if fused_chunk else {}
    out = module.apply(variables, x, train=train, rngs=rngs, **fused,
                       mutable=mutable or False, capture_intermediates=keep if features else False)
    logits, new_state = out if mutable else (out, {})
    new_state = dict(new_state)
    sown = new_state.pop("intermediates", {})
    tapped = {}
    for name in features:
      value = _lookup(sown, name)
      if value is None:
        raise FeatureError(f"{type(module).__name__} has no feature {name!r}.")
      tapped[name] = value
    if compute is not None:
      tapped = _cast(tapped, jnp.float32)
      if not fused_chunk:
        logits = logits.astype(jnp.float32)
      new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state,
                               {k: variables[k] for k in new_state})
    if fused_chunk:  # `logits` are the hidden states, in the compute dtype.
      size = getattr(module, "num_classes", None) or jax.eval_shape(
          project, params, logits[:, :1]).shape[-1]
      head = Head(params, project, size, fused_chunk)
      return Outputs(None, tapped, new_state, hidden=logits, head=head)
    return Outputs(logits, tapped, new_state)

  return apply


def list_features(module: nn.Module, variables: Any, input_shape: Sequence[int]
                  ) -> dict[str, tuple[int, ...]]:
  """Every tappable feature of `module` -> its shape for one example (batch axis dropped).

  Sown names come first, then every submodule path, in call order. Costs one abstract
  (shape-only) forward: nothing is computed or compiled.
  """
  module = for_features(module, None)
  def forward(variables, x):
    _, state = module.apply(variables, x, train=False, mutable=["intermediates"],
                            capture_intermediates=True)
    return state["intermediates"]

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  tree = jax.eval_shape(forward, variables, x)
  sown, paths = {}, {}

  def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
    for key, value in node.items():
      if key == "__call__":
        if prefix:
          paths["/".join(prefix)] = tuple(value[-1].shape[1:])
      elif isinstance(value, tuple):
        if prefix:  # Sown inside a submodule: tappable by its path.
          paths["/".join((*prefix, key))] = tuple(value[-1].shape[1:])
        else:
          sown[key] = tuple(value[-1].shape[1:])
      elif isinstance(value, Mapping):
        walk(value, (*prefix, key))

  walk(tree, ())
  return {**sown, **paths}


def check_features(model_desc: str, requested: Sequence[str],
                   available: Mapping[str, tuple[int, ...]]) -> None:
  """Raises FeatureError naming every unknown feature and listing the tappable ones."""
  unknown = [name for name in requested if name not in available]
  if not unknown:
    return
  listing = ", ".join(f"{n} {s}" for n, s in available.items())
  raise FeatureError(
      f"{model_desc} has no feature(s) {unknown}. Tappable features (name or module path, "
      f"shape per example): {listing}.")
