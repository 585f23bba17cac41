"""Sweep specs: a config file's `get_sweep(arg)` -> named trials in ordered stages, validated.

A spec is Python, next to (or inside) a config file:

    from distill_jax import sweep as sw

    def get_sweep(arg=None):
      teachers = sw.args("role", ["teacher"])
      students = sw.product(sw.args("method", ["kd", "fitnet"]), sw.seeds(3))
      return sw.Sweep(
          config="../configs/digits.py",          # relative to this file; default: this file
          stages={"teachers": teachers,
                  "students": sw.with_overrides(
                      students, {"teachers.teacher.checkpoint": "{ROOT}/teacher"})})

A `Point` is one combination: a readable name, the config file's `arg` (the part after ':'),
dotted-key overrides, and labels (axis -> value, what `distill-jax report` groups by). The
helpers build lists of points: `axis` (one override key), `args` (the config arg), `seeds`,
`fixed` (one point), `product` and `zip` (names joined with '-', args joined with ',',
overrides merged), `with_overrides` and `named` (a name prefix). Stages run
in order; a string value may refer to another trial's workdir as `{ROOT}/<trial>`, and such a
trial must be in an earlier stage (checked here), so a teacher is trained before the students
that read its export.

`script` makes a trial that runs a script instead of training, e.g. `scripts/generate.py`
writing a teacher's completions or `scripts/cache_teacher.py` its cache, for later stages to
read: `python SCRIPT --KEY=VALUE ...`, with `{TRIAL}` standing for its own directory (where it
writes). It is done when it exits with 0; the launcher then writes its `result.json`.

`expand` turns the spec into `Trial`s (each with the exact command-line flags it runs with) and
`validate_trials` parses every trial's command line with the CLI's own parser and runs
`distill_jax.config.validate` on it, before anything is launched; an error names the trial.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib.util
import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REF_RE = re.compile(r"\{ROOT\}/([A-Za-z0-9][A-Za-z0-9._-]*)")


class SweepError(ValueError):
  """The sweep spec (or one trial's config) is invalid; the message names the trial."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One combination of settings: a trial before it is placed in a stage."""
  name: str
  arg: str = ""
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
  script: str = ""  # A script to run instead of training; the overrides are its flags.


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of the sweep: `python -m distill_jax.main --config=CONFIG --workdir=ROOT/NAME
  FLAGS...`, or with `script`, `python SCRIPT FLAGS...`; `{ROOT}` in `flags` stands for the
  sweep's root directory and `{TRIAL}` for the trial's own."""
  name: str
  stage: str
  config: str  # absolute path[:arg]; empty for a script trial.
  overrides: Mapping[str, Any]
  labels: Mapping[str, str]
  flags: tuple[str, ...]
  depends_on: tuple[str, ...]
  script: str = ""  # Absolute path of the script a script trial runs.

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "stage": self.stage, "config": self.config,
            "overrides": dict(self.overrides), "labels": dict(self.labels),
            "flags": list(self.flags), "depends_on": list(self.depends_on),
            "script": self.script}


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What `get_sweep` returns: ordered stages of points and the config file they run.

  `config` is a config file path (relative to the spec file, or absolute); empty: the spec file
  itself (which then also defines `get_config`). `stages` maps a stage name to its points, in
  the order the stages run.
  """
  stages: Mapping[str, Sequence[Point]]
  config: str = ""


def _label_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "x".join(_label_value(v) for v in value)
  return str(value).replace(",", "-").replace("/", "-")


def axis(key: str, values: Iterable[Any], label: str | None = None,
         fmt: str | None = None) -> list[Point]:
  """Points that set config key `key` to each value; named `fmt.format(value)` (default
  '<label><value>', e.g. 'lr0.1'), labelled `label` (default: the key's last part)."""
  label = label or key.split(".")[-1]
  fmt = fmt or label + "{}"
  return [Point(fmt.format(_label_value(v)), "", {key: v}, {label: _label_value(v)})
          for v in values]


def args(label: str, values: Iterable[str] | Mapping[str, str]) -> list[Point]:
  """Points that set (a part of) the config arg, e.g. `args('method', ['kd', 'crd'])`, named
  and labelled after the value (',' -> '-'); a dict {name: arg} names them differently (e.g.
  `{'alone': 'student'}`)."""
  items = values.items() if isinstance(values, Mapping) else ((v, v) for v in values)
  return [Point(_label_value(k), str(v), {}, {label: _label_value(k)}) for k, v in items]


def fixed(name: str = "", arg: str = "", overrides: Mapping[str, Any] | None = None,
          **labels: str) -> list[Point]:
  """A one-point axis: adds `name` (may be empty), `arg`, `overrides` and `labels` to every
  point of a product, e.g. `fixed(arg='tiny')` or `fixed('cnn', overrides=..., student='cnn')`."""
  return [Point(name, arg, dict(overrides or {}), dict(labels))]


def script(name: str, path: str, flags: Mapping[str, Any], **labels: str) -> list[Point]:
  """A one-point stage that runs `path` (a script, relative to the spec file or absolute) with
  `--KEY=VALUE` for each of `flags`, e.g. `script('cache', '../../scripts/cache_teacher.py',
  {'config': '../../configs/lm.py:topk', 'cache_dir': '{TRIAL}'})`. `{ROOT}/<trial>` in a value
  is read like an override's (the trial waits for it); `{TRIAL}` is this trial's directory."""
  return [Point(name, "", dict(flags), dict(labels), script=path)]


def seeds(n: int, start: int = 0) -> list[Point]:
  """`n` points setting `seed` to start, start+1, ...: named 's0', 's1', ..., label 'seed'."""
  return axis("seed", range(start, start + n), label="seed", fmt="s{}")


def _join(points: Sequence[Point]) -> Point:
  overrides, labels = {}, {}
  for p in points:
    clash = set(overrides) & set(p.overrides) or set(labels) & set(p.labels)
    if clash:
      raise SweepError(f"Combining {[q.name for q in points]}: {sorted(clash)} set twice.")
    overrides.update(p.overrides)
    labels.update(p.labels)
  scripts = {p.script for p in points if p.script}
  if len(scripts) > 1:
    raise SweepError(f"Combining {[q.name for q in points]}: two scripts {sorted(scripts)}.")
  return Point("-".join(p.name for p in points if p.name),
               ",".join(p.arg for p in points if p.arg), overrides, labels,
               next(iter(scripts), ""))


def product(*axes: Sequence[Point]) -> list[Point]:
  """Every combination of one point from each axis (the last axis varies fastest)."""
  return [_join(combo) for combo in itertools.product(*axes)]


def zip(*axes: Sequence[Point]) -> list[Point]:  # noqa: A001 - the helper's natural name.
  """The i-th points of every axis together; the axes must have the same length."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise SweepError(f"sweep.zip needs axes of one length, got {sorted(lengths)}.")
  return [_join(combo) for combo in builtins.zip(*axes, strict=True)]


def with_overrides(points: Sequence[Point], overrides: Mapping[str, Any],
                   labels: Mapping[str, str] | None = None) -> list[Point]:
  """The points with `overrides` (and `labels`) added; string values may use `{name}` for the
  point's name and `{arg}`/`{label}` for its labels (e.g. '{ROOT}/teacher-{teacher}')."""
  out = []
  for p in points:
    fill = {**p.labels, "name": p.name, "arg": p.arg}
    extra = {k: _fill(v, fill) for k, v in overrides.items()}
    out.append(dataclasses.replace(p, overrides={**p.overrides, **extra},
                                   labels={**p.labels, **(labels or {})}))
  return out


def named(points: Sequence[Point], prefix: str) -> list[Point]:
  """The points with `prefix-` before their names (e.g. to tell teachers from students)."""
  return [dataclasses.replace(p, name=f"{prefix}-{p.name}" if p.name else prefix)
          for p in points]


def _fill(value: Any, fill: Mapping[str, str]) -> Any:
  if not isinstance(value, str):
    return value
  return re.sub(r"\{(\w+)\}", lambda m: fill.get(m.group(1), m.group(0)), value)


def flag_value(value: Any) -> str:
  """`value` as the CLI's `--config.key=` parser reads it back (`config_cli.flag_value`)."""
  from distill_jax import config_cli

  try:
    return config_cli.flag_value(value)
  except ValueError as e:
    raise SweepError(str(e)) from None


def load_spec(spec: str) -> tuple[Sweep, str]:
  """Imports `path/to/file.py[:arg]` and calls its `get_sweep(arg)`; returns the Sweep and the
  absolute path of the config file its trials run."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise SweepError(f"No sweep config file at {path!r}.")
  module_spec = importlib.util.spec_from_file_location("distill_jax_sweep_spec", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} has no get_sweep(arg) function; a sweep config file defines it "
                     "(see distill_jax/sweep/spec.py).")
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  if isinstance(sweep, Mapping):
    sweep = Sweep(stages=sweep)
  elif not isinstance(sweep, Sweep):
    sweep = Sweep(stages={"main": list(sweep)})
  config = sweep.config or os.path.abspath(path)  # This file (a relative path: from here).
  if not os.path.isabs(config):
    config = os.path.join(os.path.dirname(os.path.abspath(path)), config)
  return sweep, os.path.normpath(config)


def expand(sweep: Sweep, config_path: str, settings: Sequence[str] = (),
           spec_dir: str = "") -> list[Trial]:
  """The sweep's trials in run order, with checked names and `{ROOT}/<trial>` references.

  `settings` ('key=value', e.g. 'data.data_dir=/data') are added to every trial, as typed on
  the command line (`distill-jax sweep --set=...`). `spec_dir`: the spec file's directory,
  which a script trial's relative paths start from (default: the config file's).
  """
  spec_dir = spec_dir or os.path.dirname(config_path.partition(":")[0])
  common = {}
  for setting in settings:
    key, eq, value = setting.partition("=")
    if not eq or not key:
      raise SweepError(f"--set {setting!r}: expected KEY=VALUE, e.g. data.data_dir=/data.")
    common[key] = value
  trials, seen = [], {}
  for stage, points in sweep.stages.items():
    if not points:
      raise SweepError(f"Stage {stage!r} has no trials.")
    for p in points:
      if not NAME_RE.match(p.name or ""):
        raise SweepError(f"Trial name {p.name!r} (stage {stage!r}) must start with a letter or "
                         "digit and use only letters, digits, '.', '_' and '-'.")
      if p.name in seen:
        raise SweepError(f"Two trials are named {p.name!r} (stages {seen[p.name]!r} and "
                         f"{stage!r}); give them distinct names (e.g. add an axis or a prefix).")
      deps = []
      for key, value in p.overrides.items():
        for ref in REF_RE.findall(value) if isinstance(value, str) else ():
          if seen.get(ref) in (None, stage) and ref not in deps:
            where = "the same stage" if seen.get(ref) == stage else "no earlier stage"
            raise SweepError(f"Trial {p.name!r}: {key}={value!r} refers to trial {ref!r}, which "
                             f"is in {where}; a trial may only read trials of earlier stages.")
          deps.append(ref)
      seen[p.name] = stage
      deps = tuple(dict.fromkeys(deps))
      if p.script:
        trials.append(_script_trial(p, stage, spec_dir, common, deps))
        continue
      config = f"{config_path}:{p.arg}" if p.arg else config_path
      overrides = {**p.overrides, **common}
      flags = tuple(f"--config.{k}={flag_value(v)}" for k, v in overrides.items())
      trials.append(Trial(p.name, stage, config, overrides, dict(p.labels), flags, deps))
  return trials


def _script_trial(p: Point, stage: str, spec_dir: str, common: Mapping[str, str],
                  deps: tuple[str, ...]) -> Trial:
  """A script point's trial: its flags as `--KEY=VALUE`, a relative `config` flag resolved from
  the spec's directory, and the sweep's `--set` settings as `--config.KEY=VALUE` when the
  script takes a config."""
  path = os.path.normpath(os.path.join(spec_dir, p.script))
  if not os.path.exists(path):
    raise SweepError(f"Trial {p.name!r} (stage {stage!r}): no script at {path}.")
  overrides = dict(p.overrides)
  if "config" in overrides:
    config_file, colon, arg = str(overrides["config"]).partition(":")
    overrides["config"] = os.path.normpath(os.path.join(spec_dir, config_file)) + colon + arg
    overrides.update({f"config.{k}": v for k, v in common.items()})
  flags = tuple(f"--{k}={flag_value(v)}" for k, v in overrides.items())
  return Trial(p.name, stage, "", overrides, dict(p.labels), flags, deps, script=path)


def fill_root(text: str, root: str, trial: str = "") -> str:
  """`text` with `{ROOT}` the sweep's root directory (and `{TRIAL}` that of trial `trial`)."""
  text = text.replace("{ROOT}", os.path.abspath(root))
  return text.replace("{TRIAL}", os.path.join(os.path.abspath(root), trial)) if trial else text


def parse_cli(config: str, flags: Sequence[str]):
  """The config exactly as `distill-jax --config=CONFIG FLAGS...` builds it (same parser)."""
  from absl import flags as absl_flags

  from distill_jax.config_cli import define_config_flag

  argv = ["distill-jax", f"--config={config}", *flags]
  values = absl_flags.FlagValues()
  define_config_flag(values, argv)
  values(argv)
  return values.config


def trial_error(trial: Trial, root: str) -> str | None:
  """Why `trial`'s config is invalid (None if it is valid): built with the CLI's parser and
  checked with `distill_jax.config.validate`."""
  return _checked_config(trial, root)[1]


def _checked_config(trial: Trial, root: str) -> tuple[Any, str | None]:
  """(the trial's config, None) when valid, (None, why) when not; (None, None) for a script
  trial that takes no config."""
  from distill_jax.config import validate

  config, flags = trial.config, [fill_root(f, root, trial.name) for f in trial.flags]
  if trial.script:  # Its config, if it takes one: the script builds it with the same parser.
    if "config" not in trial.overrides:
      return None, None
    config = fill_root(str(trial.overrides["config"]), root, trial.name)
    flags = [f for f in flags if f.startswith("--config.")]
  try:
    parsed = parse_cli(config, flags)
    validate(parsed)
  except Exception as e:  # noqa: BLE001 - any failure to build the config is the trial's.
    return None, f"{type(e).__name__}: {e}"
  return parsed, None


def data_error(configs: Sequence[tuple[Trial, Any]]) -> str | None:
  """Why the trials cannot read their data (None if they can), checked once per data set and
  data_dir however many trials share it: a TFDS set must be prepared in the data_dir before
  the launch (an embedded one builds itself)."""
  from distill_jax.data import sources

  users: dict[tuple[str, str], list[Trial]] = {}
  for trial, config in configs:
    place = (config.data.name, sources.resolve_data_dir(config.data))
    users.setdefault(place, []).append(trial)
  for (name, data_dir), trials in users.items():
    problem = sources.unprepared(name, data_dir)
    if problem:
      empty = not any(getattr(c.data, "data_dir", None) for t, c in configs if t in trials)
      default = " (data.data_dir is empty: the default)" if empty else ""
      return (f"{problem}, e.g. with --set=data.data_dir=DIR; {len(trials)} trial(s) read it"
              f"{default}, e.g. {trials[0].name!r}.")
  return None


def validate_trials(trials: Sequence[Trial], root: str, show: int = 5) -> None:
  """Builds and validates every trial's config before any runs, then checks once per data set
  that its data is there; raises SweepError naming the invalid trials (the first `show` with
  their errors) or the missing data set."""
  checked = [(t, *_checked_config(t, root)) for t in trials]
  errors = [(t, e) for t, _, e in checked if e is not None]
  if errors:
    lines = [f"Trial {t.name!r} (stage {t.stage!r}, --config={t.config} {' '.join(t.flags)}): "
             f"{e}" for t, e in errors[:show]]
    more = f"\n... and {len(errors) - show} more." if len(errors) > show else ""
    raise SweepError(f"{len(errors)} of {len(trials)} trials are invalid:\n" + "\n".join(lines)
                     + more)
  problem = data_error([(t, c) for t, c, _ in checked if c is not None])
  if problem:
    raise SweepError(problem)


def load_trials(spec: str, root: str, validate: bool = True, settings: Sequence[str] = ()
                ) -> list[Trial]:
  """`load_spec` + `expand` + (optionally) `validate_trials`."""
  sweep, config_path = load_spec(spec)
  spec_dir = os.path.dirname(os.path.abspath(spec.partition(":")[0]))
  trials = expand(sweep, config_path, settings, spec_dir)
  if validate:
    validate_trials(trials, root)
  return trials
