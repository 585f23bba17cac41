"""Probe inputs: where the student and the candidates are asked for their outputs.

A probe is a registered function `fn(context) -> Probe` (`@register_probe('name')`); the audit
scores every candidate on every probe's inputs. Built in:

- `real`: held-out real inputs (the eval split of the student's data set, with labels), when the
  user has them.
- `synthetic`: data-free inputs made from the student alone, DeepInversion style (Yin et al.,
  CVPR 2020): Gaussian noise optimised (Adam, one jitted step applied again and again) so the
  student predicts chosen classes confidently, the batch statistics at the input of every
  BatchNorm of the student match its running statistics, and the images stay smooth (total
  variation) and bounded (L2). Reproducible from the seed. A student without BatchNorm is only
  driven by the class and the priors.
- `disagreement`: inputs on which the candidates disagree most: the synthetic inputs (or the
  probe named by its option `start`), then a
  seeded random search that asks the candidates only for outputs (no gradients, so query-only
  teachers work) and keeps each perturbation that raises the generalised Jensen-Shannon
  divergence between the candidates' predictions. Where candidates disagree, a student's
  answer says which of them it learnt from.
- `synthetic_mixup`: the synthesis driven to soft two-class targets (lam e_a + (1 - lam) e_b),
  the mixup objective of Shi et al. 2025. Both synthetic probes take `prior=PATH`: an
  auxiliary BatchNorm model whose statistics the inputs match, for a student without
  BatchNorm (else class, TV and L2 alone leave off-manifold prototypes).
- `mixup`: the real held-out inputs mixed in seeded pairs (lam ~ Beta(1, 1)): on the data's
  manifold, between its classes (whoever has controls has the data).
- `pair_disagreement`: the disagreement search between the two candidates closest to the
  student only (the pair hardest to tell apart), not among all K.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax.audit.subjects import AuditError, Exported
from distill_jax.common.registry import Registry

PROBES = Registry("probe")
register_probe = PROBES.register


@dataclasses.dataclass(frozen=True)
class Probe:
  """Probe inputs [N, H, W, C] (normalised like the training data), their labels [N] when
  known, and how they were made."""

  name: str
  images: np.ndarray
  labels: np.ndarray | None
  info: Mapping[str, Any]


@dataclasses.dataclass
class ProbeContext:
  """What a probe may use: the student's weights, the candidates' outputs, the data set."""

  student: Exported
  candidates: Mapping[str, Callable[[np.ndarray], np.ndarray]]
  input_shape: tuple[int, int, int]
  num_classes: int
  num_inputs: int
  seed: int
  data_config: Any = None  # The student's data config (for `real`), or None.
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Per-probe options.
  cache: dict = dataclasses.field(default_factory=dict)  # Probes made so far in this audit.

  def option(self, probe: str, key: str, default: Any) -> Any:
    return type(default)(self.settings.get(probe, {}).get(key, default))

  def probe(self, name: str) -> Probe:
    """Probe `name`, made once per audit (one probe may start from another's inputs)."""
    if name not in self.cache:
      self.cache[name] = PROBES.get(name)(self)
    return self.cache[name]


@register_probe("real")
def real_probe(context: ProbeContext) -> Probe:
  """The first `num_inputs` examples of the data set's eval split (held out from training)."""
  from distill_jax import data as data_lib

  if context.data_config is None:
    raise AuditError("--probe=real needs held-out data: give --data=NAME (and --data_dir) or "
                     "audit a run's workdir, whose config.json names its data set.")
  batches = data_lib.eval_batches(context.data_config, global_batch_size=256)
  images, labels, n = [], [], 0
  for batch in batches:
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
    n += int(keep.sum())
    if n >= context.num_inputs:
      break
  images = np.concatenate(images)[:context.num_inputs]
  labels = np.concatenate(labels)[:context.num_inputs].astype(np.int64)
  split = context.data_config.get("eval_split") or "test"
  return Probe("real", images, labels,
               {"data": context.data_config.name, "split": split, "num_inputs": len(images)})


def bn_statistics_loss(module: nn.Module, variables: Any, images: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """(logits, sum over the module's BatchNorm layers of ||mean_batch - running_mean||_2 +
  ||var_batch - running_var||_2), the batch statistics taken at each BatchNorm's input.

  The model runs in eval mode (running statistics, nothing updated); an interceptor reads each
  BatchNorm's input and running statistics on the way, so any Linen model with `nn.BatchNorm`
  works without changes.
  """
  terms = []

  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      h = args[0].astype(jnp.float32)
      axes = tuple(range(h.ndim - 1))
      mean, var = h.mean(axes), h.var(axes)
      running_mean = context.module.get_variable("batch_stats", "mean")
      running_var = context.module.get_variable("batch_stats", "var")
      terms.append(jnp.linalg.norm(mean - running_mean) + jnp.linalg.norm(var - running_var))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    logits = module.apply(variables, images, train=False)
  return logits, sum(terms, jnp.zeros((), jnp.float32))


def total_variation(images: jax.Array) -> jax.Array:
  """Mean absolute difference between neighbouring pixels (both directions)."""
  dh = jnp.abs(images[:, 1:] - images[:, :-1]).mean()
  dw = jnp.abs(images[:, :, 1:] - images[:, :, :-1]).mean()
  return dh + dw


def synthesis_step(images: jax.Array, opt_state: Any, variables: Any, targets: jax.Array,
                   prior_variables: Any = None, *, module: nn.Module,
                   optimizer: optax.GradientTransformation, bn_weight: float, tv_weight: float,
                   l2_weight: float, prior_module: nn.Module | None = None
                   ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """One DeepInversion update of `images` [B, H, W, C] towards the class distributions
  `targets` [B, K] (one-hot: a class; two classes mixed: the paper's mixup objective) under
  the student: soft cross-entropy + bn_weight x the BatchNorm statistics term + total
  variation + L2. The BatchNorm term is the student's, or with `prior_module` that model's
  (an auxiliary BatchNorm model, for a student without BatchNorm). `synthesize` jits it with
  the keyword-only settings bound (`variables` stay arguments, never baked into the program)."""

  def loss_fn(x):
    if prior_module is None:
      logits, bn = bn_statistics_loss(module, variables, x)
    else:
      logits = module.apply(variables, x, train=False)
      bn = bn_statistics_loss(prior_module, prior_variables, x)[1]
    ce = optax.softmax_cross_entropy(logits, targets).mean()
    total = ce + bn_weight * bn + tv_weight * total_variation(x) + l2_weight * jnp.mean(x * x)
    top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    return total, {"ce": ce, "bn": bn, "top1": top1}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(images)
  updates, opt_state = optimizer.update(grads, opt_state, images)
  return optax.apply_updates(images, updates), opt_state, {"loss": loss, **metrics}


def synthesize(student: Exported, input_shape: tuple[int, ...], num_classes: int,
               num_inputs: int, seed: int, *, steps: int = 200, lr: float = 0.1,
               batch_size: int = 128, bn_weight: float = 1.0, tv_weight: float = 0.1,
               l2_weight: float = 0.01, targets: np.ndarray | None = None,
               prior: Exported | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
  """`num_inputs` DeepInversion inputs of the student, in batches of `batch_size` (the last
  one padded and cut, so one compiled step serves all). `targets` [num_inputs, K]: the class
  distribution each input is driven to (default: one class each, cycling over the classes in
  a seeded order); `prior`: an auxiliary BatchNorm model whose statistics the inputs match
  instead of the student's. Returns (images, each target's top class, the last batch's final
  metrics)."""
  if targets is None:
    rng = np.random.default_rng(seed)
    labels = np.resize(rng.permutation(num_classes), num_inputs).astype(np.int32)
    rng.shuffle(labels)
    targets = np.eye(num_classes, dtype=np.float32)[labels]
  targets = np.asarray(targets, np.float32)
  size = min(batch_size, num_inputs)
  optimizer, step = _compiled_synthesis_step(
      student.module, float(lr), float(bn_weight), float(tv_weight), float(l2_weight),
      None if prior is None else prior.module)
  prior_variables = None if prior is None else prior.variables
  images, metrics = [], {}
  for b, start in enumerate(range(0, num_inputs, size)):
    batch_targets = jnp.asarray(np.resize(targets[start:start + size], (size, num_classes)))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), b)
    x = jax.random.normal(key, (size, *input_shape), jnp.float32)
    opt_state = optimizer.init(x)
    for _ in range(steps):
      x, opt_state, metrics = step(x, opt_state, student.variables, batch_targets,
                                   prior_variables)
    images.append(np.asarray(x)[:min(size, num_inputs - start)])
  return (np.concatenate(images), targets.argmax(-1).astype(np.int32),
          {k: float(v) for k, v in jax.device_get(metrics).items()})


@functools.lru_cache(maxsize=16)
def _compiled_synthesis_step(module: nn.Module, lr: float, bn_weight: float, tv_weight: float,
                             l2_weight: float, prior_module: nn.Module | None = None
                             ) -> tuple[optax.GradientTransformation, Callable]:
  """(Adam, the jitted `synthesis_step` with these settings bound), made once per settings so
  repeated syntheses (and their compiled programs) share one jit cache."""
  optimizer = optax.adam(lr)
  step = jax.jit(functools.partial(synthesis_step, module=module, optimizer=optimizer,
                                   bn_weight=bn_weight, tv_weight=tv_weight,
                                   l2_weight=l2_weight, prior_module=prior_module),
                 donate_argnums=(0, 1))
  return optimizer, step


def _prior(context: ProbeContext, probe: str) -> Exported | None:
  """The auxiliary BatchNorm model named by the probe's option `prior` (an export or a run's
  workdir), loaded once per audit; None without the option."""
  from distill_jax.audit.subjects import load_exported

  path = context.option(probe, "prior", "")
  if not path:
    return None
  key = ("prior", path)
  if key not in context.cache:
    context.cache[key] = load_exported(path, context.input_shape, flag=f"set={probe}.prior")
  return context.cache[key]


@register_probe("synthetic")
def synthetic_probe(context: ProbeContext) -> Probe:
  """DeepInversion inputs from the student alone (see `synthesize`); option `prior`: the
  BatchNorm statistics of that auxiliary model instead of the student's."""
  options = {k: context.option("synthetic", k, v) for k, v in SYNTHETIC_DEFAULTS.items()}
  images, targets, metrics = synthesize(context.student, context.input_shape,
                                        context.num_classes, context.num_inputs, context.seed,
                                        prior=_prior(context, "synthetic"), **options)
  # The target classes are the student's, not ground truth: no labels for the scores.
  return Probe("synthetic", images, None,
               {**options, "num_inputs": len(images), "final": metrics,
                "prior": context.option("synthetic", "prior", "") or None,
                "targets": np.bincount(targets, minlength=context.num_classes).tolist()})


def two_class_targets(num_inputs: int, num_classes: int, beta: float, seed: Any) -> np.ndarray:
  """[N, K]: lam e_a + (1 - lam) e_b with a != b drawn uniformly and lam ~ Beta(beta, beta),
  seeded: soft targets between two classes (the mixup objective of Shi et al. 2025)."""
  rng = np.random.default_rng(seed)
  a = rng.integers(num_classes, size=num_inputs)
  b = (a + 1 + rng.integers(num_classes - 1, size=num_inputs)) % num_classes
  lam = rng.beta(beta, beta, size=num_inputs)
  targets = np.zeros((num_inputs, num_classes), np.float32)
  targets[np.arange(num_inputs), a] += lam
  targets[np.arange(num_inputs), b] += 1 - lam
  return targets


@register_probe("synthetic_mixup")
def synthetic_mixup_probe(context: ProbeContext) -> Probe:
  """DeepInversion inputs driven to soft two-class targets (`two_class_targets`, option `beta`,
  default 1), so the student's outputs on them sit between two classes, where teachers'
  dark knowledge differs; the synthetic probe's options (and `prior`) apply."""
  options = {k: context.option("synthetic_mixup", k, v) for k, v in SYNTHETIC_DEFAULTS.items()}
  beta = context.option("synthetic_mixup", "beta", 1.0)
  if beta <= 0 or context.num_classes < 2:
    raise AuditError(f"--set=synthetic_mixup.beta={beta}: needs beta > 0 and at least 2 "
                     f"classes (got {context.num_classes}).")
  targets = two_class_targets(context.num_inputs, context.num_classes, beta,
                              [context.seed, 5])
  images, _, metrics = synthesize(context.student, context.input_shape, context.num_classes,
                                  context.num_inputs, context.seed, targets=targets,
                                  prior=_prior(context, "synthetic_mixup"), **options)
  return Probe("synthetic_mixup", images, None,
               {**options, "beta": beta, "num_inputs": len(images), "final": metrics,
                "prior": context.option("synthetic_mixup", "prior", "") or None})


SYNTHETIC_DEFAULTS = {"steps": 200, "lr": 0.1, "batch_size": 128, "bn_weight": 1.0,
                      "tv_weight": 0.1, "l2_weight": 0.01}


def js_divergence(logits: list[np.ndarray]) -> np.ndarray:
  """[N]: generalised Jensen-Shannon divergence of the models' softmaxes (entropy of the mean
  minus the mean entropy), in nats."""
  probs = []
  for x in logits:
    z = x - x.max(-1, keepdims=True)
    probs.append(np.exp(z) / np.exp(z).sum(-1, keepdims=True))
  probs = np.stack(probs).astype(np.float64)

  def entropy(p):
    return -np.sum(p * np.log(np.clip(p, 1e-30, None)), -1)

  return entropy(probs.mean(0)) - entropy(probs).mean(0)


def _disagreement_search(start: np.ndarray, candidates: list[Callable[[np.ndarray], np.ndarray]],
                         rounds: int, sigma: float, seed: Any) -> tuple[np.ndarray, float, float]:
  """(inputs, mean JS before, after): `start` pushed by a seeded random search that keeps each
  Gaussian perturbation (scale `sigma`) raising an input's JS divergence among `candidates`."""
  def divergence(x):
    return js_divergence([c(x) for c in candidates])

  rng = np.random.default_rng(seed)
  images = start.copy()
  score = divergence(images)
  initial = float(score.mean())
  for _ in range(rounds):
    proposal = images + sigma * rng.standard_normal(images.shape).astype(np.float32)
    new = divergence(proposal)
    better = new > score
    images[better], score[better] = proposal[better], new[better]
  return images, initial, float(score.mean())


@register_probe("disagreement")
def disagreement_probe(context: ProbeContext) -> Probe:
  """The synthetic inputs, pushed by a query-only random search towards the candidates'
  disagreement (see the module docstring)."""
  if len(context.candidates) < 2:
    raise AuditError("--probe=disagreement needs at least 2 candidates (it looks for inputs "
                     "where they disagree); use --probe=synthetic or real for one.")
  rounds = context.option("disagreement", "rounds", 20)
  sigma = context.option("disagreement", "sigma", 0.3)
  start_probe = context.option("disagreement", "start", "synthetic")
  start = context.probe(start_probe).images
  images, before, after = _disagreement_search(start, list(context.candidates.values()),
                                               rounds, sigma, [context.seed, 1])
  return Probe("disagreement", images, None,
               {"start": start_probe, "rounds": rounds, "sigma": sigma, "num_inputs": len(images),
                "js_before": before, "js_after": after})


@register_probe("mixup")
def mixup_probe(context: ProbeContext) -> Probe:
  """Mixups of the real held-out inputs (the `real` probe's): input i is lam_i x_i + (1 -
  lam_i) x_pi(i) with a seeded permutation pi and lam_i ~ Beta(`beta`, `beta`) (option, default
  1: uniform), so the inputs stay near the data's manifold but between its classes, where
  teachers differ most. No labels (the mix has two)."""
  beta = context.option("mixup", "beta", 1.0)
  if beta <= 0:
    raise AuditError(f"--set=mixup.beta={beta}: the Beta distribution's parameter must be > 0 "
                     "(1: lam uniform on [0, 1]).")
  real = context.probe("real").images
  images, lam = mix_inputs(real, beta, [context.seed, 2])
  return Probe("mixup", images, None, {"beta": beta, "num_inputs": len(images),
                                       "lam_mean": float(lam.mean())})


def mix_inputs(images: np.ndarray, beta: float, seed: Any) -> tuple[np.ndarray, np.ndarray]:
  """(mixed [N, ...], lam [N]): lam_i x_i + (1 - lam_i) x_perm(i), lam ~ Beta(beta, beta),
  the permutation and the draws seeded."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(images))
  lam = rng.beta(beta, beta, size=len(images))
  shape = (-1,) + (1,) * (images.ndim - 1)
  mixed = lam.reshape(shape) * images + (1 - lam.reshape(shape)) * images[perm]
  return mixed.astype(np.float32), lam


def closest_pair(student: np.ndarray, candidates: Mapping[str, np.ndarray]) -> tuple[str, str]:
  """The two candidates whose logits [N, K] have the highest mean Spearman correlation with
  the student's on the same inputs (ties: by name)."""
  from distill_jax.audit.scores import spearman

  rho = {c: float(np.nanmean(spearman(student, x))) for c, x in candidates.items()}
  first, second = sorted(rho, key=lambda c: (-rho[c], c))[:2]
  return first, second


@register_probe("pair_disagreement")
def pair_disagreement_probe(context: ProbeContext) -> Probe:
  """Disagreement between the two candidates closest to the student only (`closest_pair` on
  the `start` probe's inputs, default synthetic), not among all K: the inputs where the two
  hardest to tell apart differ (options `rounds`, `sigma`, `start` as `disagreement`)."""
  if len(context.candidates) < 2:
    raise AuditError("--probe=pair_disagreement needs at least 2 candidates (it looks for "
                     "inputs where the two closest disagree); use --probe=synthetic for one.")
  rounds = context.option("pair_disagreement", "rounds", 20)
  sigma = context.option("pair_disagreement", "sigma", 0.3)
  start_probe = context.option("pair_disagreement", "start", "synthetic")
  start = context.probe(start_probe).images
  pair = closest_pair(context.student(start),
                      {c: fn(start) for c, fn in context.candidates.items()})
  images, before, after = _disagreement_search(
      start, [context.candidates[c] for c in pair], rounds, sigma, [context.seed, 3])
  return Probe("pair_disagreement", images, None,
               {"start": start_probe, "pair": list(pair), "rounds": rounds, "sigma": sigma,
                "num_inputs": len(images), "js_before": before, "js_after": after})
