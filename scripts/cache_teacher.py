r"""Writes every teacher's logits per example once, so training reads them instead of running
the teachers (`distill_jax.teachers.cache_teachers`; the cache's format is described in
`distill_jax/data/teacher_cache.py`).

Takes the same config and overrides as the run that will use the cache, so the data, its
augmentation and the teachers' checkpoints are the run's:

    python scripts/cache_teacher.py --config=configs/digits.py:kd --cache_dir=runs/cache \
        --config.teachers.teacher.checkpoint=runs/digits/teacher --config.data.augment=none
    distill-jax --config=configs/digits.py:kd --workdir=runs/kd_cached \
        --config.teachers.teacher.checkpoint=runs/digits/teacher --config.data.augment=none \
        --config.teachers.teacher.cache=runs/cache/teacher

Inputs must repeat for a cache to make sense: `data.augment=none`, or `data.augment_period=P`
(P versions of each example, reused every P epochs; fix `data.augment_seed` to share one cache
between seeds). `--top_k=K` stores the K largest probabilities and the remaining mass instead
of all logits (an approximation; for many classes).

Language models (`configs/lm.py`) cache per token: each packed row's [L, K] top-K
log-probabilities and the remaining mass per position. Top-k KD with the same K then trains
exactly as with the live teacher:

    python scripts/cache_teacher.py --config=configs/lm.py:topk --cache_dir=runs/lm/cache \
        --config.teachers.teacher.checkpoint=runs/lm/teacher --top_k=16
    distill-jax --config=configs/lm.py:topk --workdir=runs/lm/topk_cached \
        --config.teachers.teacher.checkpoint=runs/lm/teacher \
        --config.teachers.teacher.cache=runs/lm/cache/teacher
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file (':ARG' allowed).",
                                lock_config=True)
flags.DEFINE_string("cache_dir", None, "Directory to write; each teacher gets cache_dir/NAME.")
flags.DEFINE_list("teachers", [], "Teachers to cache (default: every teacher of the config).")
flags.DEFINE_integer("top_k", 0, "0: all logits; K: the K largest log-probs + remaining mass.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage type of full logits.")
flags.DEFINE_integer("batch_size", 256, "Teacher forward batch size.")


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None or FLAGS.cache_dir is None:
    raise app.UsageError("--config and --cache_dir are required.")
  from distill_jax.common.model_io import CheckpointError
  from distill_jax.config import ConfigError, validate
  from distill_jax.data.teacher_cache import CacheError
  from distill_jax.teachers import cache_teachers
  from distill_jax.train.console import quiet_library_logs

  quiet_library_logs()
  try:
    validate(FLAGS.config)
    written = cache_teachers(FLAGS.config, FLAGS.cache_dir, names=FLAGS.teachers,
                             top_k=FLAGS.top_k, dtype=FLAGS.dtype, batch_size=FLAGS.batch_size,
                             progress_bar=FLAGS.config.progress_bar)
  except (ConfigError, CacheError, CheckpointError) as e:
    sys.exit(f"cache_teacher: {e}")
  print("Cached. Train from the cache with:")
  print(" ".join(f"--config.teachers.{name}.cache={path}" for name, path in written.items()))


if __name__ == "__main__":
  app.run(main)
