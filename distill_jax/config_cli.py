"""The config on the command line: `--config=FILE.py[:ARG]` and `--config.KEY=VALUE`.

ml_collections' config_flags, as the CLI and the sweeps' validation parse them, with two
additions:

- `--config.KEY=None` sets a number or string setting to None (e.g. a model's `bos_id`; the
  word None is never a string value here);
- a model named anew (`--config.student.name=X`, `--config.teachers.NAME.model=X`) brings its
  own kwargs (`switch_models`): the config file's kwargs were written for its model, so they
  become X's, at X's defaults, and `--config.student.kwargs.KEY=VALUE` sets one of X's (a
  teacher switched to an open-weights directory, `model=hf`, gets the few it takes,
  `teachers.HF_TEACHER_KWARGS`).

Light to import (no JAX): `distill-jax --help` loads it; the models load when a config names
another model.
"""

from __future__ import annotations

import re
import shlex
import sys
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

MODEL_OVERRIDE = re.compile(r"--?config\.(student\.name|teachers\.[^.=]+\.model)=(.*)", re.S)


def model_sections(config: ml_collections.ConfigDict
                   ) -> dict[str, tuple[ml_collections.ConfigDict, str]]:
  """'student.name' -> (config.student, 'name') and 'teachers.NAME.model' -> (that teacher,
  'model'): every place a config names a model whose `kwargs` sit beside it."""
  sections = {"student.name": (config.student, "name")}
  for name, teacher in config.get("teachers", {}).items():
    sections[f"teachers.{name}.model"] = (teacher, "model")
  return sections


def switch_models(config: ml_collections.ConfigDict, names: dict[str, Any]) -> list[str]:
  """Gives each model named anew its own kwargs: where `names` ('student.name' or
  'teachers.NAME.model' -> a model) names another model than `config` does, that section's
  `kwargs` (written for the config's model) become the new model's, at their defaults
  (`models.model_kwargs`); kwargs given after that set the new model's. Called before the
  overrides are applied, so the overrides then set the name and any kwargs. Returns the keys
  whose kwargs were replaced.
  """
  from distill_jax import models

  switched = []
  for key, (section, field) in model_sections(config).items():
    new = names.get(key)
    hf = new == "hf" and key.startswith("teachers.")  # teachers.HF_MODEL: open weights.
    if new is None or new == section.get(field) or not (hf or new in models.MODELS):
      continue  # An unknown name is validate()'s to report.
    if hf:
      from distill_jax.teachers import HF_TEACHER_KWARGS
      defaults = dict(HF_TEACHER_KWARGS)
    else:
      defaults = models.model_kwargs(new)
    if defaults is None or "kwargs" not in section:
      continue
    placeholder = ml_collections.config_dict.placeholder
    kwargs = ml_collections.ConfigDict(
        {k: placeholder(object) if v is None else v for k, v in defaults.items()})
    section.kwargs = kwargs
    if section.is_locked:
      kwargs.lock()
    switched.append(key)
  return switched


def model_names(argv: list[str]) -> dict[str, str]:
  """The models the command line names ('student.name' / 'teachers.NAME.model' -> name)."""
  return {m.group(1): m.group(2) for arg in argv if (m := MODEL_OVERRIDE.fullmatch(arg))}


class _NoneOr(flags.ArgumentParser):
  """`None` on the command line, else what `inner` parses."""

  def __init__(self, inner: flags.ArgumentParser):
    self.inner = inner

  def parse(self, argument: Any) -> Any:
    return None if argument == "None" else self.inner.parse(argument)

  def flag_type(self) -> str:
    return self.inner.flag_type()


class _ConfigFileParser(flags.ArgumentParser):
  """config_flags' file parser (`inner`: load, lock), then `switch_models` for the models the
  command line names; the overrides apply after, to the locked config."""

  def __init__(self, inner: flags.ArgumentParser, argv: list[str] | None):
    self.inner, self.argv = inner, argv

  def parse(self, path: str) -> Any:
    config = self.inner.parse(path)
    if isinstance(config, ml_collections.ConfigDict):
      switch_models(config, model_names(list(sys.argv if self.argv is None else self.argv)))
    return config

  def flag_type(self) -> str:
    return self.inner.flag_type()


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS,
                       argv: list[str] | None = None) -> flags.FlagHolder:
  """Defines `--config` in `flag_values` as the CLI parses it (see above); `argv`: the command
  line its overrides come from (None: sys.argv, at parse time)."""
  for kind, parser in ((int, flags.IntegerParser()), (float, flags.FloatParser()),
                       (str, flags.ArgumentParser())):
    config_flags.register_flag_parser_for_type(kind, _NoneOr(parser))
  holder = config_flags.DEFINE_config_file(
      "config", None, "Path to a config file, optionally with ':ARG' (see configs/).",
      flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag = flag_values["config"]
  flag.parser = _ConfigFileParser(flag.parser, argv)
  return holder


def flag_value(value: Any) -> str:
  """`value` as the `--config.KEY=` parser reads it back: booleans as true/false, strings as
  they are, None as None, numbers, tuples and dicts as Python literals."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float, tuple, list, dict)) or value is None:
    return repr(tuple(value) if isinstance(value, list) else value)
  raise ValueError(f"Override value {value!r} ({type(value).__name__}) cannot be passed on "
                   "the command line; use str, int, float, bool, tuple or dict.")


def config_flags_help(config: ml_collections.ConfigDict, spec: str) -> str:
  """Every key of `config` as the flag that sets it, with its current value, one a line:
  `  --config.optim.lr=0.05` (what `distill-jax --config=SPEC --helpfull` ends with)."""

  def leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, ml_collections.ConfigDict) and len(node):
      return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}.{key}")]
    return [(prefix, node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node)]

  lines = []
  for key, value in leaves(config, "--config"):
    try:
      shown = flag_value(value)
    except ValueError:
      shown = repr(value)
    lines.append(f"  {key}={shlex.quote(shown)}")
  return (f"The keys of --config={spec}, each a flag --config.KEY=VALUE (with its current "
          f"value):\n" + "\n".join(lines))
