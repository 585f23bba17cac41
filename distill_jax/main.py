"""The command line: `distill-jax --config=configs/FILE.py[:ARG] --workdir=DIR [--config.k=v]`.

Trains the config's student (with the config's teachers and loss terms) in `workdir`,
resuming from its latest checkpoint. Everything happens in `train.loop.train_and_evaluate`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':ARG' (see configs/).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and result.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from distill_jax.config import ConfigError
  from distill_jax.train.logging import quiet_library_logs
  from distill_jax.train.loop import train_and_evaluate

  quiet_library_logs()

  try:
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    logging.error("Invalid config: %s", e)
    sys.exit(f"Invalid config: {e}")
  logging.info("Done: eval top-1 %.4f (best %.4f).", result["final"]["eval/top1"],
               result["best_top1"])


def run() -> None:
  """Console-script entry point (`distill-jax`)."""
  app.run(main)


if __name__ == "__main__":
  run()
