"""The console: our log lines without the libraries' chatter, and the training progress view.

Orbax logs a dozen INFO lines per checkpoint through absl; they drown the run's own log.
Records from those libraries below WARNING are dropped; warnings and errors still show.

`Progress` is what a researcher watches while a run trains: a tqdm bar carrying the loss, the
train top-1 and the last evaluation's top-1 and agreement, and one compact line per evaluation.
"""

from __future__ import annotations

import logging as py_logging
import sys
import threading
from typing import Any

from absl import logging
from tqdm import tqdm

QUIET_PACKAGES = ("/orbax/", "/etils/", "/tensorflow_datasets/", "/grain/", "/jax/_src/")
# Library warnings and errors that say nothing new to the user: TFDS's note while it checks a
# data set that is not prepared (our error says what to do), and the failed writes that
# orbax's background threads log with a traceback before the save raises the same error to
# the loop, which reports it in one line (`train.loop.DISK_ERRORS`).
QUIET_WARNINGS = ("has no dataset_info.json", "No space left on device", "Disk quota exceeded",
                  "Read-only file system")


# Where the checkpointer's background threads run and log. Their errors reach the run, which
# reports them in its own line, so their records show as one line too.
THREAD_PACKAGES = ("/asyncio/", "/concurrent/", "/threading.py")


class _QuietLibraries(py_logging.Filter):
  """Drops the libraries' records below WARNING and those in QUIET_WARNINGS; the tracebacks
  of the others show only with --verbosity=1 (our own records are left as they are)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    quiet = any(p in path for p in QUIET_PACKAGES)
    if not quiet and not any(p in path for p in THREAD_PACKAGES):
      return True
    if quiet and record.levelno < py_logging.WARNING:
      return False
    if logging.get_verbosity() < 1:
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return not any(w in record.getMessage() for w in QUIET_WARNINGS)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
  """An exception that ends a background thread: one log line (the traceback with
  --verbosity=1) instead of Python's traceback on stderr, which would split the run's output."""
  name = args.thread.name if args.thread is not None else "?"
  logging.warning("Background thread %s ended with %s: %s", name, args.exc_type.__name__,
                  str(args.exc_value).splitlines()[0] if str(args.exc_value) else "",
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
                  if logging.get_verbosity() >= 1 else None)


def _late_callback(exc_type, exc_value, exc_traceback) -> bool:
  """Logs (at --verbosity=1) and returns True for the 'Event loop is closed' error of a
  callback that native code runs after orbax's asyncio loop closed: TensorStore's futures wake
  that loop, and after a failed save every late write reports it. They are the aftermath of an
  error the run reports itself in one line."""
  if exc_type is not RuntimeError or str(exc_value) != "Event loop is closed":
    return False
  logging.vlog(1, "A late callback found its event loop closed.",
               exc_info=(exc_type, exc_value, exc_traceback))
  return True


def _log_foreign_exception(exc_type, exc_value, exc_traceback) -> None:
  """`sys.excepthook`, which native code calls for an exception raised in a callback it runs
  on its own thread: the late callbacks hidden, others one line (tracebacks with
  --verbosity=1). The main thread's exceptions keep Python's display."""
  if threading.current_thread() is threading.main_thread():
    sys.__excepthook__(exc_type, exc_value, exc_traceback)
  elif not _late_callback(exc_type, exc_value, exc_traceback):
    logging.warning("A background callback raised %s: %s", exc_type.__name__,
                    str(exc_value).splitlines()[0] if str(exc_value) else "",
                    exc_info=(exc_type, exc_value, exc_traceback)
                    if logging.get_verbosity() >= 1 else None)


def _log_unraisable(unraisable: Any) -> None:
  """`sys.unraisablehook` (the other way native callbacks report): late callbacks hidden."""
  if not _late_callback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
    sys.__unraisablehook__(unraisable)


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  for logger in ("orbax", "absl", "asyncio", "concurrent.futures"):
    py_logging.getLogger(logger).addFilter(_QuietLibraries())
  threading.excepthook = _log_thread_exception
  sys.excepthook = _log_foreign_exception
  sys.unraisablehook = _log_unraisable


# The metrics `eval_line` names in its own words; another task's headline is shown first.
_SHOWN = ("top1", "top5", "ce", "perplexity", "bits_per_byte")


def eval_line(step: int, total_steps: int, scalars: dict[str, float],
              headline: str = "top1") -> str:
  """One evaluation as one line: step, the task's `headline` (unless shown below), top-1,
  top-5, CE (perplexity and bits per byte) and the agreement with each teacher (with several
  teachers also with their ensemble), the metrics the task has, e.g.
  `eval @ 460/4600: top-1 93.27%  top-5 99.66%  CE 0.2512  agreement teacher 94.61%`."""
  parts = [] if headline in _SHOWN else [f"{headline} {scalars[f'eval/{headline}']:.4f}"]
  if "eval/top1" in scalars:
    parts.append(f"top-1 {100 * scalars['eval/top1']:.2f}%")
  if "eval/top5" in scalars:
    parts.append(f"top-5 {100 * scalars['eval/top5']:.2f}%")
  if "eval/ce" in scalars:
    parts.append(f"CE {scalars['eval/ce']:.4f}")
  if "eval/perplexity" in scalars:  # Language models.
    parts.append(f"perplexity {scalars['eval/perplexity']:.3f}  "
                 f"bits/byte {scalars['eval/bits_per_byte']:.4f}")
  parts += [f"agreement {k.removeprefix('eval/agreement/')} {100 * v:.2f}%"
            for k, v in sorted(scalars.items()) if k.startswith("eval/agreement/")]
  return f"eval @ {step}/{total_steps}: " + "  ".join(parts)


class Progress:
  """The console view of a training run (process 0 only; `enabled=False` shows no bar).

  The bar's rate and ETA count from the end of the first step, which includes compilation
  (so they are not skewed by it), and average over the whole run since, evaluation included.
  """

  def __init__(self, total_steps: int, step: int, *, enabled: bool, show_bar: bool,
               headline: str = "top1"):
    self.total, self.enabled, self.show_bar = total_steps, enabled, enabled and show_bar
    self.headline = headline  # The task's headline eval metric (`Task.headline`).
    self.bar = tqdm(total=total_steps, initial=step, disable=not self.show_bar, desc="train",
                    unit="step", dynamic_ncols=True, smoothing=0)
    self.postfix: dict[str, str] = {}
    self.first = True

  def stage(self, name: str) -> None:
    self.bar.set_description(name)

  def step(self) -> None:
    """After every step. The first one compiled: the clock (rate, ETA) starts after it."""
    if self.first and self.show_bar:
      self.bar.initial, self.bar.start_t = self.bar.n + 1, self.bar._time()
    self.first = False
    self.bar.update(1)

  def train(self, scalars: dict[str, float]) -> None:
    """A logged train step's metrics (`loss`, and `top1` where the task has it): shown on the
    bar."""
    self.postfix["loss"] = f"{scalars['loss']:.4f}"
    if "top1" in scalars:
      self.postfix["top1"] = f"{scalars['top1']:.3f}"
    self.bar.set_postfix(self.postfix, refresh=False)

  def eval(self, step: int, scalars: dict[str, float]) -> None:
    """An evaluation: its line printed (above the bar), its top-1 (where the task has it, else
    its headline) and agreement on the bar."""
    if not self.enabled:
      return
    shown = "eval/top1" if "eval/top1" in scalars else f"eval/{self.headline}"
    self.postfix["eval"] = f"{scalars[shown]:.3f}"
    agreement = [v for k, v in scalars.items() if k.startswith("eval/agreement/")]
    if agreement:
      self.postfix["agree"] = f"{scalars.get('eval/agreement/ensemble', agreement[0]):.3f}"
    self.bar.set_postfix(self.postfix, refresh=False)
    line = eval_line(step, self.total, scalars, self.headline)
    if self.show_bar:
      self.bar.write(line, file=sys.stderr)
    else:
      logging.info("%s", line)

  def close(self) -> None:
    self.bar.close()
