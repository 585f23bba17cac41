"""Stop at a step boundary on SIGTERM/SIGINT: what a scheduler sends before it preempts a job.

While a `StopSignals` block is active, the first SIGTERM or SIGINT only records the signal;
the loop sees `requested`, saves a checkpoint at the end of the step it is in and raises
`Interrupted`, whose `exit_code` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT),
the shell's convention, so a launcher can tell "stopped cleanly, resume me" from a failure.
A second signal gets the previous handler (e.g. SIGINT's KeyboardInterrupt at once).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """The run stopped on a signal after saving a checkpoint; `exit_code` = 128 + signal."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    self.exit_code = 128 + signum
    super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}, after saving a "
                     "checkpoint; rerun the same command to resume.")


class StopSignals:
  """Context manager: records SIGTERM/SIGINT in `signum` instead of dying (main thread only)."""

  def __init__(self) -> None:
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum: int, frame: Any) -> None:
    self.signum = signum
    self._restore()  # A second signal acts as it would without us.

  def _restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    self._restore()
