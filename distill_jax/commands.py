"""The sub-commands of `distill-jax` beside training: `losses`, `models`, `plot`, `sweep`,
`report`, `audit`, `collect`, and the text of `--help`.

Each is a function `fn(args)` registered with `@command(name, usage, help)`; `main.py` runs the
one the command line names (training, the default, has none), and `--help` lists them all. A new
command is one registered function here (its flags beside it); those that parse their own flags
(argparse) are named in `OWN_FLAGS`, so that `main.run` hands them their argv before absl parses
anything.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "curves.png", "For `plot`: the PNG file to write.")
flags.DEFINE_multi_string("metric", ["eval/top1"], "For `plot`: metrics to draw, one panel each "
                          "(keys of metrics.jsonl, e.g. eval/top1, train/loss).")


@dataclasses.dataclass(frozen=True)
class Command:
  """A sub-command: `usage` and `help` are shown by --help; `fn(args)` runs it."""

  usage: str
  help: str
  fn: Callable[[list[str]], None]


# Sub-commands by name; training is the default (no sub-command). New commands add an entry
# here (or with `command(...)`) and --help lists them.
COMMANDS: dict[str, Command] = {}


def command(name: str, usage: str, help: str) -> Callable:  # noqa: A002
  """Registers `fn(args)` as the sub-command `name`."""

  def register(fn: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    COMMANDS[name] = Command(usage, help, fn)
    return fn

  return register


class UsageError(Exception):
  """Bad command-line use; exits 2 with the message."""


def _no_args(name: str, args: list[str]) -> None:
  if args:
    raise UsageError(f"`distill-jax {name}` takes no arguments, got {args}.")


@command("losses", "distill-jax losses [--imports=MODULE,...]",
         "every registered loss term with its hyper-parameters and defaults")
def losses_command(args: list[str]) -> None:
  _no_args("losses", args)
  print(describe_losses())


@command("models", "distill-jax models [--imports=MODULE,...]",
         "every registered model with the kwargs it takes (config.student.kwargs) and defaults")
def models_command(args: list[str]) -> None:
  _no_args("models", args)
  print(describe_models())


@command("plot", "distill-jax plot WORKDIR... --out=FILE.png [--metric=eval/top1 ...]",
         "learning curves of one or several runs (their metrics.jsonl) to a PNG")
def plot_command(args: list[str]) -> None:
  if not args:
    raise UsageError("`distill-jax plot` needs one or more run workdirs, e.g. "
                     "`distill-jax plot runs/a runs/b --out=curves.png`.")
  from distill_jax import plots

  plots.plot_runs(args, FLAGS.metric, FLAGS.out)
  print(f"Wrote {FLAGS.out} ({', '.join(FLAGS.metric)} of {len(args)} run(s)).")


@command("sweep", "distill-jax sweep --config=SPEC.py[:ARG] --workdir=ROOT "
         "[--launcher=local|slurm] | sweep status ROOT",
         "run every trial of a sweep spec (local workers or a Slurm job array), or show them")
def sweep_command(args: list[str]) -> None:
  from distill_jax.sweep import cli

  sys.exit(cli.sweep_main(args))


@command("report", "distill-jax report ROOT [--rows=... --cols=... --expected=FILE --csv --png]",
         "one table (mean ± std over seeds, the paper's number and the gap) of a sweep's results")
def report_command(args: list[str]) -> None:
  from distill_jax.sweep import cli

  sys.exit(cli.report_main(args))


@command("audit", "distill-jax audit --student=RUN --candidates=A,B,C --controls=X,Y "
         "[--probe=synthetic,disagreement,real] [--out=DIR]",
         "was the student distilled from one of the candidates (or none)? a calibrated test")
def audit_command(args: list[str]) -> None:
  from distill_jax.audit import cli

  sys.exit(cli.main(args, banner=provenance()))


@command("collect", "distill-jax collect --endpoint=URL --model=NAME --prompts=FILE "
         "--out=FILE.jsonl [--api=completions|chat --top_logprobs=K --n=SAMPLES ...]",
         "a black-box teacher's answers from an OpenAI-compatible endpoint, as a JSONL file "
         "to train on (data.name='jsonl')")
def collect_command(args: list[str]) -> None:
  from distill_jax.endpoints import collect

  code = collect.main(args, banner=provenance())
  if code:  # Straight out: requests still in flight bring nothing that would be written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(0)


@command("serve", "distill-jax serve --model=RUN_OR_EXPORT_OR_HF_DIR [--host=127.0.0.1 "
         "--port=8000 --max_batch=8 --max_prompt_tokens=N --max_new_tokens=256]",
         "a language model behind an OpenAI-compatible endpoint (/v1/completions, "
         "/v1/chat/completions, /v1/models)")
def serve_command(args: list[str]) -> None:
  from distill_jax.endpoints import serve

  sys.exit(serve.main(args))


# Commands that parse their own flags (argparse): absl's `--config` is a config-file flag that
# would try to load a sweep spec as a run config, so `run` hands them their argv first.
OWN_FLAGS = ("sweep", "report", "audit", "collect", "serve")


def usage() -> str:
  """The text of `distill-jax --help`."""
  width = max(len(name) for name in COMMANDS)
  commands = "\n".join(f"  {name:<{width}}  {c.help}\n  {'':<{width}}  {c.usage}"
                       for name, c in COMMANDS.items())
  return f"""\
distill-jax: knowledge distillation in JAX/Flax.

Train (the default command; resumes from WORKDIR's latest checkpoint):
  distill-jax --config=FILE.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

  --config   (required) a config file; ':ARG' selects a variant of it
  --workdir  (required) the run's directory: checkpoints, metrics.jsonl, tb/, result.json

  e.g. distill-jax --config=configs/digits.py:teacher --workdir=runs/digits/teacher
       distill-jax --config=configs/digits.py:kd --workdir=runs/digits/kd \\
           --config.teachers.teacher.checkpoint=runs/digits/teacher --config.optim.lr=0.1

Other commands:
{commands}

  --imports=MODULE,...  import your modules first (to register losses or models)
  --verbosity=1         show the traceback of an error

Every flag, including every --config.KEY of a config: distill-jax --config=FILE.py --helpfull
"""


def describe_losses() -> str:
  """Every registered loss term: name, kind, first doc line, hyper-parameters with defaults and
  the ranges the loss declares (`register_loss(..., ranges=...)`)."""
  from distill_jax.losses import LOSSES, loss_hparams
  from distill_jax.losses.base import REQUIRED, is_module_loss, loss_ranges

  lines = []
  for name in LOSSES.names():
    fn = LOSSES.get(name)
    ranges = loss_ranges(fn)
    hparams = ", ".join(
        f"{k}={'<required>' if v is REQUIRED else repr(v)}"
        + (f" ({ranges[k][0]})" if k in ranges else "") for k, v in loss_hparams(fn).items())
    kind = "module" if is_module_loss(fn) else "function"
    doc = (fn.__doc__ or "").strip().splitlines()
    lines.append(f"{name} ({kind}): {doc[0] if doc else ''}\n    {hparams or '(none)'}")
  return "\n".join(lines)


def describe_models() -> str:
  """Every registered model: name, first doc line, and the kwargs it takes with their defaults
  (what `config.student.kwargs` / `config.teachers.NAME.kwargs` may set)."""
  from distill_jax.models import MODELS, model_kwargs

  lines = []
  for name in MODELS.names():
    doc = " ".join((MODELS.get(name).__doc__ or "").strip().split("\n\n")[0].split())
    kwargs = model_kwargs(name)
    listing = ("(not known)" if kwargs is None else
               ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "(none)")
    lines.append(f"{name}: {doc}\n    kwargs: {listing}")
  return "\n".join(lines)


def provenance() -> str:
  """`distill_jax VERSION from PACKAGE_DIR`: which installation is running."""
  from importlib import metadata

  import distill_jax

  try:
    version = metadata.version("distill-jax")
  except metadata.PackageNotFoundError:
    version = "(not installed)"
  return f"distill_jax {version} from {os.path.dirname(os.path.abspath(distill_jax.__file__))}"
