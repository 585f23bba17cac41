"""What the command-line front ends (`audit`, `collect`) print when they fail: the error as
one line after `Error:`, and its traceback only at `--verbosity` 1 or more."""

from __future__ import annotations

import sys
import traceback


def print_failure(error: BaseException, code: int, verbosity: int) -> int:
  """Prints `error` as one line on stderr (its lines joined; the traceback first when
  `verbosity` >= 1) and returns `code`, the command's exit status."""
  if verbosity >= 1:
    traceback.print_exc()
  line = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
  print(f"Error: {line}", file=sys.stderr, flush=True)
  return code
