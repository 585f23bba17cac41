"""What a setting's rule is written with: `ConfigError` and `Range`.

A leaf module (it imports nothing of the package), so the module that owns a setting declares
and checks its rule beside it, without importing the config: a loss declares the ranges of its
hyper-parameters (`register_loss(..., ranges=...)`), the device layout checks the mesh
(`layout.py`), and the config's `validate` calls them. `config.py` re-exports both names.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any


class ConfigError(ValueError):
  """The config is invalid; the message says which key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Range:
  """The allowed values of a numeric setting: `low`/`high` bounds (None: unbounded), each
  closed (`>=`) or open (`>`), and whether it must be an integer."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def allows(self, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    if self.integer and value != int(value) or math.isnan(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a number"
    if self.low is not None and self.high is not None:
      return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, "
              f"{self.high:g}{')' if self.high_open else ']'}")
    if self.low is not None:
      return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
    if self.high is not None:
      return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
    return kind


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
FRACTION = Range(0, 1, high_open=True)
UNIT_INTERVAL = Range(0, 1)

# A setting's rule: its allowed range and what the setting means (said in the error).
Rule = tuple[Range, str]


def check_range(key: str, value: Any, rule: Rule) -> None:
  """Raises ConfigError naming `config.KEY`, its value and the range unless `value` (or every
  element of a list or tuple: per-layer and per-teacher weights) lies in `rule`'s range."""
  allowed, meaning = rule
  values = value if isinstance(value, (list, tuple)) else (value,)
  for v in values:
    if not allowed.allows(v):
      raise ConfigError(f"config.{key} is {value!r}; it must be {allowed} ({meaning}).")
