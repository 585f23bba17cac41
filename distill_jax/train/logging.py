"""Console logging: keep absl INFO for our messages, drop the chatter of the libraries below.

Orbax logs a dozen INFO lines per checkpoint through absl; they drown the run's own log.
Records from those libraries below WARNING are dropped; warnings and errors still show.
"""

from __future__ import annotations

import logging as py_logging

from absl import logging

QUIET_PACKAGES = ("/orbax/", "/etils/", "/tensorflow_datasets/", "/grain/", "/jax/_src/")


class _QuietLibraries(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(p in record.pathname.replace("\\", "/") for p in QUIET_PACKAGES)


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  for logger in ("orbax", "absl"):
    py_logging.getLogger(logger).addFilter(_QuietLibraries())
