"""The command line.

    distill-jax --config=configs/FILE.py[:ARG] --workdir=DIR [--config.key=value ...]
    distill-jax losses [--imports=my_pkg.my_losses,...]
    distill-jax models
    distill-jax sweep --config=SPEC.py[:ARG] --workdir=ROOT [--launcher=local|slurm] | status ROOT
    distill-jax report ROOT [--rows=... --cols=... --expected=FILE]

The first trains the config's student (with the config's teachers and loss terms) in
`workdir`, resuming from its latest checkpoint; everything happens in
`train.loop.train_and_evaluate` (`train_generations` for born-again chains). `losses` lists
every registered loss term with its hyper-parameters and defaults; `models` lists the
registered models. `sweep` and `report` (distill_jax/sweep/) run a grid of trainings and
tabulate their results.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':ARG' (see configs/).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and result.json.")
flags.DEFINE_list("imports", [], "For `losses`/`models`: modules to import first (e.g. yours).")


def _version() -> str:
  try:
    return importlib.metadata.version("distill-jax")
  except importlib.metadata.PackageNotFoundError:  # A checkout on PYTHONPATH, not installed.
    return "(not installed)"


def describe_losses() -> str:
  """Every registered loss term: name, kind, hyper-parameters with defaults, first doc line."""
  from distill_jax.losses import LOSSES, loss_hparams
  from distill_jax.losses.base import REQUIRED, is_module_loss

  lines = []
  for name in LOSSES.names():
    fn = LOSSES.get(name)
    hparams = ", ".join(f"{k}={'<required>' if v is REQUIRED else repr(v)}"
                        for k, v in loss_hparams(fn).items())
    kind = "module" if is_module_loss(fn) else "function"
    doc = (fn.__doc__ or "").strip().splitlines()
    lines.append(f"{name} ({kind}): {doc[0] if doc else ''}\n    {hparams or '(none)'}")
  return "\n".join(lines)


def describe_models() -> str:
  from distill_jax.models import MODELS

  return "\n".join(MODELS.names())


def main(argv: list[str]) -> None:
  logging.info("distill_jax %s from %s", _version(), os.path.dirname(os.path.abspath(__file__)))
  for module in FLAGS.imports:
    importlib.import_module(module)
  commands = {"losses": describe_losses, "models": describe_models}
  if len(argv) > 1:
    if argv[1] not in commands or len(argv) > 2:
      raise app.UsageError(f"Unexpected arguments {argv[1:]}; sub-commands: {sorted(commands)}.")
    print(commands[argv[1]]())
    return
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required to train.")
  from distill_jax.config import ConfigError
  from distill_jax.data.teacher_cache import CacheError
  from distill_jax.train.logging import quiet_library_logs
  from distill_jax.train.loop import train_generations

  quiet_library_logs()
  try:
    result = train_generations(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    logging.error("Invalid config: %s", e)
    sys.exit(f"Invalid config: {e}")
  except CacheError as e:
    logging.error("%s", e)
    sys.exit(str(e))
  logging.info("Done: eval top-1 %.4f (best %.4f).", result["final"]["eval/top1"],
               result["best_top1"])


def run() -> None:
  """Console-script entry point (`distill-jax`)."""
  if len(sys.argv) > 1 and sys.argv[1] in ("sweep", "report"):
    # Sub-commands with their own argparse flags (distill_jax/sweep/cli.py), before absl parses.
    from distill_jax.sweep import cli

    sys.exit({"sweep": cli.sweep_main, "report": cli.report_main}[sys.argv[1]](sys.argv[2:]))
  app.run(main)


if __name__ == "__main__":
  run()
