"""One small registry class shared by models, losses, data sets and launchers.

A registry maps a name to a callable. Registering a name twice is an error (two
files silently fighting over one name is a bug), and looking up an unknown name
raises an error that lists every known name and the closest match, so a typo in
a config fails at once with the fix in the message.

One exception: a new definition of the *same* function or class (the same
`__module__` and `__qualname__`) replaces the registered one. That is what
re-running a notebook cell (or `importlib.reload`) does: it defines the same
source again as a new object, and after editing the cell the user wants the new
version. Another function under a taken name is still refused.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class UnknownNameError(KeyError):
  """An unknown name was looked up in a registry."""

  def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
    return str(self.args[0])


class Registry:
  """Name -> callable map with a `register` decorator and helpful errors."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: `@registry.register('name')` adds the decorated callable.

    Raises ValueError when `name` is taken by another callable; a redefinition of the
    registered one (`_redefines`: a re-run notebook cell, a reloaded module) replaces it.
    """

    def decorator(fn: T) -> T:
      if name in self._entries and not _redefines(fn, self._entries[name]):
        raise ValueError(
            f"{self.kind} {name!r} is already registered (by "
            f"{_where(self._entries[name])}); pick another name.")
      self._entries[name] = fn
      return fn

    return decorator

  def get(self, name: str) -> Callable[..., Any]:
    """Returns the callable registered under `name`, or raises UnknownNameError."""
    try:
      return self._entries[name]
    except KeyError:
      raise UnknownNameError(self.unknown_message(name)) from None

  def unknown_message(self, name: str) -> str:
    known = sorted(self._entries)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"Unknown {self.kind} {name!r}.{hint} Known {self.kind}s: "
            f"{', '.join(known) or '(none)'}.")

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)


def _where(fn: Callable[..., Any]) -> str:
  module = getattr(fn, "__module__", "?")
  qualname = getattr(fn, "__qualname__", repr(fn))
  return f"{module}.{qualname}"


def _redefines(new: Callable[..., Any], old: Callable[..., Any]) -> bool:
  """Whether `new` is a new definition of `old`: both a function or class (they have a
  `__qualname__`; an instance does not) with the same module and qualified name."""
  if not (hasattr(new, "__qualname__") and hasattr(old, "__qualname__")):
    return False
  return (new.__module__, new.__qualname__) == (old.__module__, old.__qualname__)
