"""Image classification: images [B, H, W, C], integer labels [B], per-example masks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax import data as data_lib
from distill_jax.common.outputs import Outputs
from distill_jax.common.rules import ConfigError
from distill_jax.losses.base import masked_sum, teacher_log_probs
from distill_jax.losses.logits import kd_divergence
from distill_jax.tasks.base import Task, TaskInfo


def _top1(logits: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class Classification(Task):
  """Top-1 accuracy is the headline; fidelity to the teachers is reported beside it."""

  input_key: str = "image"
  headline: str = "top1"
  higher_is_better: bool = True
  supports_teacher_cache: bool = True

  def validate(self, config: Any) -> None:
    """`data.augment` (how the training images are augmented) is one of the data's
    `AUGMENTATIONS`."""
    augment = config.data.get("augment", "none")
    if augment not in data_lib.AUGMENTATIONS:
      raise ConfigError(f"config.data.augment is {augment!r}; choose one of "
                        f"{list(data_lib.AUGMENTATIONS)}.")

  def info(self, data_config: Any) -> TaskInfo:
    info = data_lib.get_info(data_config)
    return TaskInfo(info.num_classes, tuple(info.image_shape), dict(info.num_examples), info)

  def train_iterator(self, data_config: Any, **kwargs: Any) -> Any:
    return data_lib.train_iterator(data_config, **kwargs)

  def eval_batches(self, data_config: Any, **kwargs: Any) -> Any:
    return data_lib.eval_batches(data_config, **kwargs)

  def input_fingerprint(self, data_config: Any, split: str, seed: int, augmented: bool
                        ) -> dict[str, Any]:
    """The split's content (SHA-256 of the stored images and labels), its normalisation and,
    for augmented (train) inputs, the augmentation settings and seed."""
    info = data_lib.get_info(data_config)
    fingerprint = {
        "data": data_config.name, "split": split, "num_examples": info.num_examples[split],
        "sha256": data_lib.split_digest(data_config, split),
        "image_shape": list(info.image_shape), "pixel_max": info.pixel_max,
        "mean": list(info.mean), "std": list(info.std),
        "augment": data_config.get("augment", "none") if augmented else "none"}
    if fingerprint["augment"] != "none":
      fingerprint.update(crop_padding=int(data_config.crop_padding),
                         augment_seed=data_lib.augment_seed(data_config, seed),
                         augment_period=int(data_config.get("augment_period", 0)))
    return fingerprint

  def example_batch(self, input_shape: tuple[int, ...], batch_size: int,
                    cached_logits: Mapping[str, tuple[int, ...]] | None = None
                    ) -> dict[str, jax.Array]:
    batch = {"image": jnp.zeros((batch_size, *input_shape), jnp.float32),
             "label": jnp.zeros((batch_size,), jnp.int32),
             "id": jnp.zeros((batch_size,), jnp.int32)}
    for key, shape in (cached_logits or {}).items():
      batch[key] = jnp.zeros((batch_size, *shape), jnp.float32)
    return batch

  def train_metrics(self, student: Outputs, teachers: Mapping[str, Outputs],
                    batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """`top1` on the batch's labels and, with teachers, `agreement` with their ensemble."""
    metrics = {"top1": jnp.mean(_top1(student.logits) == batch["label"])}
    if teachers:
      ensemble = teacher_log_probs(teachers, 1.0)
      metrics["agreement"] = jnp.mean(_top1(student.logits) == _top1(ensemble))
    return metrics

  def eval_sums(self, student: Outputs, teachers: Mapping[str, Outputs],
                batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Correct top-1/top-5, CE, and fidelity to the teachers, summed over the masked batch
    (`masked_sum`: a NaN or inf in a padded row is dropped, never multiplied by 0).

    Fidelity (top-1, agreement, KL at T = 1) is reported per teacher and, with several, for
    'ensemble': the equal-weight mixture of their probabilities, whatever aggregation the loss
    terms use.
    """
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    logits = student.logits
    logp = jax.nn.log_softmax(logits)
    k = min(5, logits.shape[-1])
    in_top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    sums = {
        "count": jnp.sum(mask),
        "top1": masked_sum(_top1(logits) == labels, mask),
        "top5": masked_sum(in_top5, mask),
        "ce": -masked_sum(jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0], mask),
    }
    targets = dict(teachers)
    if len(teachers) > 1:
      targets["ensemble"] = None
    for name in targets:
      t_logp = teacher_log_probs(teachers, 1.0, None if name == "ensemble" else name)
      t_pred = jnp.argmax(t_logp, axis=-1)
      sums[f"teacher_top1/{name}"] = masked_sum(t_pred == labels, mask)
      sums[f"agreement/{name}"] = masked_sum(t_pred == _top1(logits), mask)
      sums[f"kl/{name}"] = masked_sum(kd_divergence(logits, t_logp, temperature=1.0), mask)
    return sums
