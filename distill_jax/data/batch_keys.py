"""Which batch keys stay valid when a step replaces a batch's tokens (on-policy rollout).

The on-policy step (`tasks.language_model.on_policy.OnPolicy`) replaces each row by the student's
own continuation of its prompt. A key that describes the original row's tokens - a teacher's logits
cached for the data's rows, a black-box file's top-k log-probabilities, the bytes of each target -
would then describe text the batch no longer holds, and a loss that reads it would train on a wrong
signal without a word. So every key of a train batch says whether it follows the tokens:

- the task's own keys that the rollout rewrites or that describe the row rather than its
  tokens are listed by the task (`Task.rollout_keys`; language models: tokens, targets, mask,
  document, id);
- every other key is declared by the module that adds it, with `declare` (one key, or a
  prefix ending in '/' for a family such as `teacher_logits/NAME`): what it holds, whether it
  follows the tokens and, when it does not, what to do instead.

`rollout_problems` lists the keys of a batch that would go stale. A key that nobody declared
counts as stale: a new kind of side data is refused until its module says it can follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class KeyRule:
  """What a batch key (or family of keys) holds and whether it follows the tokens.

  `what` and `fix` may hold `{name}`: for a family `PREFIX/`, the part of the key after it
  (e.g. the teacher of `teacher_logits/NAME`).
  """

  what: str
  follows_tokens: bool = False
  fix: str = ""


_RULES: dict[str, KeyRule] = {}


def declare(key: str, *, what: str, follows_tokens: bool = False, fix: str = "") -> None:
  """Declares batch key `key` (or every key starting with `key` when it ends in '/').

  Raises ValueError when `key` is already declared otherwise (two modules that disagree on
  one key are a bug); declaring the same rule again (a module reloaded) is harmless.
  """
  rule = KeyRule(what, follows_tokens, fix)
  if _RULES.get(key, rule) != rule:
    raise ValueError(f"Batch key {key!r} is already declared as {_RULES[key]}; pick another "
                     "key.")
  _RULES[key] = rule


def rule_of(key: str) -> tuple[KeyRule, str] | None:
  """(the rule that governs `key`, the `{name}` it is read with), or None if undeclared: the
  key's own declaration, else that of its longest declared prefix family."""
  if key in _RULES:
    return _RULES[key], key
  families = [p for p in _RULES if p.endswith("/") and key.startswith(p)]
  if not families:
    return None
  prefix = max(families, key=len)
  return _RULES[prefix], key[len(prefix):]


def rollout_problems(keys: Iterable[str], task_keys: Iterable[str]) -> list[str]:
  """One line per reason that keys of `keys` would not describe the batch after a rollout
  (keys with the same reason share a line): not one of the task's `task_keys`, and declared
  as not following the tokens, or not declared at all."""
  reasons: dict[str, list[str]] = {}
  for key in sorted(set(keys) - set(task_keys)):
    found = rule_of(key)
    if found is None:
      reason = ("undeclared: the module that adds it must say whether it follows the tokens, "
                "with distill_jax.data.batch_keys.declare")
    else:
      rule, name = found
      if rule.follows_tokens:
        continue
      fix = f"; {rule.fix.format(name=name)}" if rule.fix else ""
      reason = f"{rule.what.format(name=name)}{fix}"
    reasons.setdefault(reason, []).append(key)
  return [f"{', '.join(keys)} ({reason})" for reason, keys in reasons.items()]
