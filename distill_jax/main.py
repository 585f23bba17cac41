"""The command line (`distill-jax`, the same as `python -m distill_jax.main`).

    distill-jax --config=configs/FILE.py[:ARG] --workdir=DIR [--config.key=value ...]
    distill-jax losses [--imports=my_pkg.my_losses,...]
    distill-jax models [--imports=...]
    distill-jax plot WORKDIR... --out=FILE.png [--metric=eval/top1 ...]
    distill-jax sweep --config=SPEC.py[:ARG] --workdir=ROOT [--launcher=local|slurm] | status ROOT
    distill-jax report ROOT [--rows=... --cols=... --expected=FILE]
    distill-jax collect --endpoint=URL --model=NAME --prompts=FILE --out=FILE.jsonl [...]

Training is the default command: it trains the config's student (with the config's teachers
and loss terms) in `workdir`, resuming from its latest checkpoint; everything happens in
`train.loop.train_generations`. The other commands (`losses`, `models`, `plot`, `sweep`,
`report`, `audit`, `collect`) live in `commands.py`, one registered function each; those that
parse their own flags (argparse) get their argv from `run` before absl parses anything.

A user's mistake (a config typo, a missing checkpoint or data set, an unreadable file) ends the
run with one line, `Error: ...`, on stderr: exit code 2 for usage and config errors, 1 for
failures while running, 128 + the signal for SIGTERM/SIGINT (143, 130) after the run saved a
checkpoint at a step boundary; `--verbosity=1` adds the traceback. A start that fails
removes the workdir it created (one that existed, or that holds a checkpoint, is kept).
"""

from __future__ import annotations

import difflib
import importlib
import logging as py_logging
import os
import re
import signal
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_dict

from distill_jax import config_cli
from distill_jax.commands import COMMANDS, OWN_FLAGS, UsageError, provenance, usage
from distill_jax.train.workdir import latest_checkpoint, remove_unless_checkpointed

FLAGS = flags.FLAGS
config_cli.define_config_flag(FLAGS)  # --config and its --config.KEY=VALUE overrides.
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and result.json.")
flags.DEFINE_list("imports", [], "Modules to import first (e.g. yours, registering losses).")

USAGE_EXIT, FAILURE_EXIT, INTERRUPT_EXIT = 2, 1, 130


def train(config: config_dict.ConfigDict, workdir: str) -> None:
  """Trains (`distill_jax.api.train`: a start that fails removes the workdir it created, unless
  it holds a checkpoint) and logs the headline."""
  from distill_jax import api
  from distill_jax.train.console import quiet_library_logs

  quiet_library_logs()
  workdir = os.path.abspath(workdir)
  if not os.path.exists(workdir):
    _created_workdirs.append(workdir)  # For Ctrl-C before the run's own handler is set.
  result = api.train(config, workdir)
  best = next(k for k in result if k.startswith("best_") and k != "best_step")  # The task's.
  headline = best[len("best_"):]  # The task's headline metric, e.g. top1 or perplexity.
  logging.info("Done: eval %s %.4f (best %s %.4f); results in %s.", headline,
               result["final"][f"eval/{headline}"], headline, result[best],
               os.path.join(workdir, "result.json"))


_created_workdirs: list[str] = []  # The workdir this process created, if it did.


def _remove_created_workdirs() -> None:
  """After a failed start: removes the workdir this run created, unless it holds a checkpoint."""
  for workdir in _created_workdirs:
    remove_unless_checkpointed(workdir)


def main(argv: list[str]) -> None:
  # Which installation runs: a training run's first log line; a listing command's output is
  # its listing alone (the line shows with --verbosity=1).
  is_command = len(argv) > 1
  (logging.debug if is_command else logging.info)("%s", provenance())
  for module in FLAGS.imports:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise UsageError(f"--imports names {module!r}, which cannot be imported ({e}); run "
                       "from the folder that holds it or put its package on PYTHONPATH.") from e
  if is_command:
    if argv[1] not in COMMANDS:
      raise UsageError(f"Unknown command {argv[1]!r}"
                       f"{_did_you_mean(argv[1], list(COMMANDS))}; the commands are "
                       f"{', '.join(COMMANDS)} (training needs none). See distill-jax --help.")
    COMMANDS[argv[1]].fn(argv[2:])
    return
  missing = [f"--{name}" for name in ("config", "workdir") if FLAGS[name].value is None]
  if missing:
    raise UsageError(f"{' and '.join(missing)} required to train, e.g. distill-jax "
                     "--config=configs/digits.py:teacher --workdir=runs/digits/teacher "
                     "(see distill-jax --help).")
  train(FLAGS.config, FLAGS.workdir)


# --- Errors as one line -------------------------------------------------------------------

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-?")


def _did_you_mean(name: str, known: list[str]) -> str:
  close = difflib.get_close_matches(name, known, n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _kwargs_owner(argv: list[str], config: config_dict.ConfigDict, key: str) -> str:
  """' (the kwargs of model X; ...)' when dotted `key` fails right below a section's `kwargs`:
  the model as the command line names it, else as the config file does; '' otherwise."""
  node, path, parent = config, [], None
  for part in key.split("."):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      break
    node, path, parent = node[part], [*path, part], node
  if path[-1:] != ["kwargs"]:
    return ""
  section, names = ".".join(path[:-1]), config_cli.model_names(argv)
  model = names.get(f"{section}.name", names.get(f"{section}.model")) or parent.get(
      "name", parent.get("model"))
  return (f" (the kwargs of model {model!r}; `distill-jax models` lists each model's)"
          if isinstance(model, str) else "")


def _verbose() -> bool:
  """Whether --verbosity (or -v) >= 1: the parsed flag, or before parsing the command line."""
  if FLAGS.is_parsed():
    return FLAGS.verbosity >= 1
  for arg in sys.argv[1:]:
    match = re.fullmatch(r"--?(?:verbosity|v)=(-?\d+)", arg)
    if match:
      return int(match.group(1)) >= 1
  return False


def _fail(message: str, code: int) -> None:
  """Prints `Error: message` as one line (the traceback first with --verbosity=1), exits."""
  if _verbose():
    traceback.print_exc()
  line = " ".join(part.strip() for part in str(message).strip().splitlines() if part.strip())
  print(f"Error: {line}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Straight out, as after Ctrl-C: the checkpointer's background threads, stopped by the
  # error (e.g. a full disk), would otherwise print tracebacks at interpreter exit, after
  # this line. Everything the run wrote is flushed line by line or committed by rename.
  os._exit(code)


def _override_error(argv: list[str], error: Exception) -> str:
  """A config override that failed to parse, as one message naming the flag and what fits."""
  config = FLAGS["config"].value
  spec = config_spec(argv)
  if config is None and spec:  # absl resets the flags when a parse fails: load it again.
    from distill_jax.config import load_config_file

    try:
      config = load_config_file(spec)
      config_cli.switch_models(config, config_cli.model_names(argv))
    except Exception:  # noqa: BLE001  (then the message below names the error as it is)
      config = None
  for arg in argv[1:]:
    match = re.fullmatch(r"--config\.([\w.]+)(?:=.*)?", arg, re.S)
    if not match or not isinstance(config, config_dict.ConfigDict):
      continue
    from distill_jax.config import missing_key

    problem = missing_key(config, match.group(1))
    if problem:
      return f"{arg}: {problem[:-1]}{_kwargs_owner(argv, config, match.group(1))}."
  text = str(error)
  if "Traceback (most recent call last)" in text:  # A config file's get_config raised.
    lines = [line for line in text.splitlines() if line.strip()]
    text = f"{lines[0].split(':', 1)[0]}: {lines[-1].strip()}"
  text = " ".join(text.strip().strip("'\"").split())
  return text.replace("\\n", " ").replace("\\'", "'")


def config_spec(argv: list[str]) -> str | None:
  """The value of the last --config=... (the one absl keeps), or None."""
  specs = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")]
  return specs[-1] if specs else None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with `--help` ours (exit 0) and every parse error one line (exit 2)."""
  if argv[1:2] == ["help"] or any(arg in HELP_ARGS for arg in argv[1:]):
    print(usage())
    sys.exit(0)
  spec = config_spec(argv)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    _fail(f"--config={spec}: no config file {spec.partition(':')[0]!r} (relative to "
          f"{os.getcwd()}).", USAGE_EXIT)
  helpfull = "--helpfull" in argv
  try:
    parsed = FLAGS([arg for arg in argv if arg != "--helpfull"])
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    _fail(_override_error(argv, e), USAGE_EXIT)
  if helpfull:  # absl's help of every flag, then every key of the config as its flag.
    app.usage(shorthelp=False, writeto_stdout=True)
    print("\n" + (config_cli.config_flags_help(FLAGS.config, spec) if spec else
                  "Add --config=FILE.py[:ARG] to list the keys of that config as "
                  "--config.KEY flags with their values."))
    sys.exit(0)
  return parsed


def _exit_code(error: BaseException) -> int | None:
  """The exit code of a user error (one line, no traceback), None for anything else (a bug)."""
  from distill_jax.common.model_io import CheckpointError
  from distill_jax.common.registry import UnknownNameError
  from distill_jax.config import ConfigError
  from distill_jax.data.teacher_cache import CacheError
  from distill_jax.train.workdir import WorkdirLockedError, WorkdirWriteError

  if isinstance(error, UsageError | ConfigError | UnknownNameError):
    return USAGE_EXIT
  if isinstance(error, CheckpointError | CacheError | OSError | FloatingPointError |
                ValueError | ImportError | WorkdirLockedError | WorkdirWriteError):
    return FAILURE_EXIT
  return None


def _interrupted(*_) -> None:
  """Ctrl-C (the SIGINT handler, so no library can swallow it): closes the progress bar,
  removes a workdir this run created if it holds no checkpoint yet, says where the run can
  resume from, and exits 130."""
  from tqdm import tqdm

  for bar in list(getattr(tqdm, "_instances", ())):
    bar.close()
  _remove_created_workdirs()
  workdir = FLAGS.workdir and os.path.abspath(FLAGS.workdir)
  latest = latest_checkpoint(workdir) if workdir and os.path.isdir(workdir) else None
  where = (f"the same command resumes from {latest}." if latest else
           "no checkpoint was written yet, so the same command starts afresh.")
  print(f"Interrupted: {where}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Straight out: the checkpointer's background threads, stopped mid-run, would print
  # tracebacks at interpreter exit. What is on disk is consistent (metrics are flushed per
  # line; a checkpoint being written stays a temporary folder, which restore ignores).
  os._exit(INTERRUPT_EXIT)


class _HoldStartupLogs(py_logging.Filter):
  """Holds this module's log lines until the run logs one of its own, then lets them out.

  A run that fails before it starts shows only its `Error:` line; one that starts shows the
  start-up lines (the provenance) first, as logged.
  """

  def __init__(self, handler: py_logging.Handler):
    super().__init__()
    self.handler, self.held = handler, []

  def filter(self, record: py_logging.LogRecord) -> bool:
    if self.held is None:
      return True
    path = os.path.abspath(record.pathname)
    if path == os.path.abspath(__file__):
      self.held.append(record)
      return False
    if not path.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep):
      return True  # A library's line (shown or not by its own filters) starts nothing.
    self.release()
    return True

  def release(self) -> None:
    held, self.held = self.held or [], None
    for line in held:
      self.handler.emit(line)


def _main(argv: list[str]) -> None:
  """`main` with every user error turned into one line and an exit code."""
  from distill_jax.train.signals import Interrupted

  handler = logging.get_absl_handler()
  hold = _HoldStartupLogs(handler)
  if not _verbose():
    handler.addFilter(hold)
  signal.signal(signal.SIGINT, _interrupted)
  try:
    main(argv)
    hold.release()
  except KeyboardInterrupt:
    _interrupted()
  except Interrupted as e:  # A signal during training: a checkpoint was saved at a step end.
    logging.warning("%s", e)
    workdir = os.path.abspath(FLAGS.workdir)
    print(f"Interrupted: the same command resumes from {latest_checkpoint(workdir)}.",
          file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except BrokenPipeError:  # `distill-jax losses | head`: the reader has what it wanted.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  except Exception as e:  # noqa: BLE001  (sorted below: user errors vs bugs)
    code = _exit_code(e)
    if code is None:
      raise
    _fail(str(e) or type(e).__name__, code)
  finally:
    handler.removeFilter(hold)


def run() -> None:
  """Console-script entry point (`distill-jax`): the working directory is importable, as under
  `python -m distill_jax.main`, so `config.imports` and `--imports` find the user's modules."""
  cwd = os.getcwd()
  if cwd not in sys.path:
    sys.path.insert(0, cwd)
  if len(sys.argv) > 1 and sys.argv[1] in OWN_FLAGS:
    COMMANDS[sys.argv[1]].fn(sys.argv[2:])
  app.run(_main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
