"""`distill-jax audit`: argument parsing, loading the models, writing the report.

    distill-jax audit --student=WORKDIR_OR_EXPORT --candidates=A,B,C --controls=X,Y
        [--decoys=D,E] [--shadows=D:S1,A:S2] [--probe=synthetic,disagreement]
        [--primary=PROBE:SCORE[,...]] [--precision=P] [--out=DIR]

Parses its own flags (argparse; `distill_jax.main.run` hands it its argv before absl). Every
candidate and control is loaded from its export and then seen only through its outputs. Bad
input ends with one line, `Error: ...`, exit code 2; a failure while running exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from distill_jax.common.console import print_failure

PROG = "distill-jax audit"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, description="Was the student distilled from one of the candidate teachers? "
      "Scores the student against each candidate on probe inputs and compares the scores with "
      "control students trained without them (see docs/audit.md).")
  p.add_argument("--student", required=True,
                 help="The student: a finished run's workdir or its model/ export.")
  p.add_argument("--candidates", required=True,
                 help="Comma-separated candidate teachers (workdirs or exports); each is only "
                      "queried for outputs. NAME=PATH names one in the report.")
  p.add_argument("--controls", required=True,
                 help="Comma-separated control students (>= 2): trained like the student on the "
                      "same data, without the candidates.")
  p.add_argument("--decoys", default="",
                 help="Comma-separated decoy teachers (workdirs or exports, NAME=PATH): "
                      "teachers that are no candidate, queried like them; a candidate is named "
                      "alone only when the student is closer to it than to each decoy too.")
  p.add_argument("--shadows", default="",
                 help="Comma-separated reference students distilled from a known source, "
                      "SOURCE:PATH or SOURCE:NAME=PATH: SOURCE a decoy (a control of the "
                      "null 'distilled, but from no candidate') or a candidate (its shadow: "
                      "the null 'the teacher is SOURCE' of the pairwise tests).")
  p.add_argument("--precision", type=float, default=None,
                 help="The benchmark's measured precision of accusations at this setting, "
                      "reported beside the answer (never derived from the p-values).")
  p.add_argument("--probe", default=None,
                 help="Comma-separated probes (default disagreement,synthetic, or synthetic "
                      "with one candidate; real needs the data set). A language-model student "
                      "(its run's task is language_model): prompts, the default.")
  p.add_argument("--primary", default=None,
                 help="PROBE:SCORE that decides (default: the first probe and spearman; "
                      "for a language model, kl_t1). Several, comma-separated (e.g. "
                      "disagreement:spearman,synthetic:spearman): the decision is on their "
                      "mean, equal weights, so give pairs in one unit.")
  p.add_argument("--out", default="audit", help="Directory of the report (default ./audit).")
  p.add_argument("--num_inputs", type=int, default=256, help="Inputs per probe (default 256).")
  p.add_argument("--seed", type=int, default=0, help="Seed of every random choice.")
  p.add_argument("--alpha", type=float, default=0.05,
                 help="False-accusation rate of the decision (default 0.05).")
  p.add_argument("--data", default=None,
                 help="The data set (default: the student run's config.json, else digits).")
  p.add_argument("--data_dir", default=None, help="TFDS data_dir of the data set.")
  p.add_argument("--set", action="append", default=[], metavar="PROBE.KEY=VALUE",
                 help="A probe option, e.g. --set=synthetic.steps=400 or "
                      "--set=prompts.file=prompts.txt (repeat for more).")
  p.add_argument("--verbosity", type=int, default=0, help="1: show tracebacks of errors.")
  return p


def _named(items: Iterable[str], flag: str) -> list[tuple[str, str]]:
  """['a', 'NAME=b'] -> [(basename(a), a), (NAME, b)]; names must be distinct."""
  from distill_jax.audit import AuditError

  out = []
  for item in filter(None, (s.strip() for s in items)):
    name, sep, path = item.partition("=")
    if not sep:
      name, path = os.path.basename(os.path.normpath(item)), item
    out.append((name, path))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise AuditError(f"--{flag}: two entries are called the same ({names}); name them with "
                     "NAME=PATH.")
  return out


def _shadows(items: Iterable[str]) -> list[tuple[str, str, str]]:
  """['SRC:PATH', 'SRC:NAME=PATH'] -> [(name, path, SRC)] (name: the path's basename)."""
  from distill_jax.audit import AuditError

  out = []
  for item in filter(None, (s.strip() for s in items)):
    source, sep, rest = item.partition(":")
    if not sep or not source or not rest:
      raise AuditError(f"--shadows={item!r}: expected SOURCE:PATH or SOURCE:NAME=PATH, SOURCE "
                       "one of the candidates or decoys the student was distilled from.")
    (name, path), = _named([rest], "shadows")
    out.append((name, path, source))
  return out


def _settings(items: list[str]) -> dict[str, dict[str, str]]:
  """['synthetic.steps=400', ...] -> {'synthetic': {'steps': '400'}, ...}."""
  from distill_jax.audit import AuditError

  out: dict[str, dict[str, str]] = {}
  for item in items:
    key, sep, value = item.partition("=")
    probe, dot, option = key.partition(".")
    if not sep or not dot:
      raise AuditError(f"--set={item!r}: expected PROBE.KEY=VALUE, e.g. synthetic.steps=400.")
    out.setdefault(probe, {})[option] = value
  return out


def _run_config(student: str) -> dict | None:
  """The student run's config.json (when --student is a run's workdir), else None."""
  import json

  from distill_jax.teachers import resolve_export_dir

  export = resolve_export_dir(student)
  run_config = os.path.join(os.path.dirname(os.path.abspath(export)), "config.json")
  if export == student or not os.path.exists(run_config):
    return None
  with open(run_config) as f:
    return json.load(f)


def _data_config(data: str | None, data_dir: str | None, run_config: dict | None) -> object:
  """The data config: `data` (--data), else the student run's config.json, else digits."""
  import ml_collections

  from distill_jax import data as data_lib

  if data is None and run_config is not None:
    config = ml_collections.ConfigDict(run_config["data"])
  else:
    config = data_lib.default_data_config(data or "digits")
  if data_dir is not None:
    config.data_dir = data_dir
  return config


def _checked_probes(probes: Sequence[str], settings: Mapping[str, Mapping[str, Any]],
                    registry: Any) -> None:
  """Fails on an unknown probe name, among `probes` or the probes `settings` configure."""
  for name in [*probes, *settings]:
    registry.get(name)


def _lm_audit(student_path: str, candidates: list, controls: list, data_config: object, *,
              probes: Sequence[str] | None, settings: Mapping[str, Mapping[str, Any]],
              **options: Any) -> dict:
  """The audit of a language-model student (its run's task is language_model): prompts probe,
  generation scores (`distill_jax.audit.lm`)."""
  from distill_jax.audit import load_exported, query_only
  from distill_jax.audit.lm import DEFAULT_LM_PROBES, LM_PROBES, run_lm_audit

  probes = list(probes or DEFAULT_LM_PROBES)
  _checked_probes(probes, settings, LM_PROBES)
  shape = (8,)  # Token ids [N, L]: the parameters' shapes do not depend on L.
  student = load_exported(student_path, shape, flag="student")

  def load(entries, flag):
    return {name: query_only(load_exported(path, shape, name, flag), ndim=3)
            for name, path in entries}

  return run_lm_audit(student, load(candidates, "candidates"), load(controls, "controls"),
                      data_config=data_config, probes=probes, probe_settings=settings,
                      **options)


def audit_paths(student: str, candidates: Sequence[tuple[str, str]],
                controls: Sequence[tuple[str, str]], *, probes: Sequence[str] | None = None,
                primary: str | None = None, num_inputs: int = 256, seed: int = 0,
                alpha: float = 0.05, data: str | None = None, data_dir: str | None = None,
                settings: Mapping[str, Mapping[str, Any]] | None = None,
                decoys: Sequence[tuple[str, str]] = (),
                shadows: Sequence[tuple[str, str, str]] = (),
                precision: float | None = None) -> dict:
  """The audit of exported models given by path (what `distill-jax audit` runs, without the
  report): loads the student with its weights and every candidate and control as query-only,
  picks the probes (image or language model, from the student run's config.json) and returns
  the result dict (`run_audit`). `candidates`/`controls` are (name, path) pairs; the other
  arguments are the CLI's flags of the same names (`probes` its --probe, `settings` its --set
  as {probe: {key: value}}; `decoys` (name, path) pairs, `shadows` (name, path, source)
  triples: reference students distilled from a decoy or a candidate). Raises AuditError (bad
  input, naming the flag), UnknownNameError (a probe), CheckpointError (an export)."""
  from distill_jax import data as data_lib
  from distill_jax.audit import PROBES, AuditError, load_exported, query_only, run_audit

  candidates, controls, settings = list(candidates), list(controls), dict(settings or {})
  if not os.path.exists(student):
    raise AuditError(f"--student: {student} does not exist (give a finished run's workdir "
                     "or its model/ export directory).")
  decoys, shadows = list(decoys), list(shadows)
  names = {name for name, _ in candidates}
  untaught = len(controls) + sum(source not in names for _, _, source in shadows)
  if untaught < 2:
    raise AuditError(f"--controls: the calibrated decision needs at least 2 control students "
                     f"(trained like the student, without the candidates, alone or from a "
                     f"decoy), got {untaught}.")
  for flag, entries in (("candidates", candidates), ("controls", controls), ("decoys", decoys),
                        ("shadows", [(n, p) for n, p, _ in shadows])):
    for _, path in entries:
      if not os.path.exists(path):
        raise AuditError(f"--{flag}: {path} does not exist (give a finished run's workdir or "
                         "its model/ export directory).")
  # The student's run says which data set (and so which input shape) the audit is about,
  # and whether the student is a language model (then the audit probes with prompts).
  run_config = _run_config(student)
  data_config = _data_config(data, data_dir, run_config)
  options = {"primary": primary, "num_inputs": num_inputs, "seed": seed, "alpha": alpha}
  if (run_config or {}).get("task") == "language_model":
    if decoys or shadows:
      raise AuditError("--decoys/--shadows: the language-model audit does not take them yet; "
                       "audit an image student, or leave them out.")
    return _lm_audit(student, candidates, controls, data_config, probes=probes,
                     settings=settings, **options)
  probes = list(probes or (("disagreement", "synthetic") if len(candidates) > 1 else
                           ("synthetic",)))
  _checked_probes(probes, settings, PROBES)
  info = data_lib.get_info(data_config)
  shape = info.image_shape
  student_model = load_exported(student, shape, flag="student")

  def load(entries, flag, features=False):
    # Controls are the auditor's own models: their penultimate features feed the feature
    # scores. Candidates and decoys are only ever queried for outputs.
    return {name: query_only(load_exported(path, shape, name, flag), features=features)
            for name, path in entries}

  references = {**load(controls, "controls", True),
                **load([(n, p) for n, p, _ in shadows], "shadows", True)}
  return run_audit(student_model, load(candidates, "candidates"), references,
                   input_shape=shape, num_classes=info.num_classes, probes=probes,
                   data_config=data_config, probe_settings=settings,
                   decoys=load(decoys, "decoys"), teachers={n: s for n, _, s in shadows},
                   precision=precision, **options)


def audit(args: argparse.Namespace) -> dict:
  """`distill-jax audit` with parsed flags: the audit, its report written to --out."""
  probes = [p.strip() for p in args.probe.split(",") if p.strip()] if args.probe else None
  result = audit_paths(args.student, _named(args.candidates.split(","), "candidates"),
                       _named(args.controls.split(","), "controls"), probes=probes,
                       primary=args.primary, num_inputs=args.num_inputs, seed=args.seed,
                       alpha=args.alpha, data=args.data, data_dir=args.data_dir,
                       settings=_settings(args.set),
                       decoys=_named(args.decoys.split(","), "decoys"),
                       shadows=_shadows(args.shadows.split(",")), precision=args.precision)
  return _write(result, args.out)


def _write(result: dict, out: str) -> dict:
  from distill_jax.audit import write_report
  from distill_jax.audit.report import summary

  paths = write_report(result, out)
  print(summary(result))
  print(f"Report: {paths['md']}, {paths['json']}, {paths['png']}")
  return result


def main(argv: list[str], banner: str = "") -> int:
  """Runs the audit; returns the exit code (0 done, 2 bad input, 1 failure). `banner` (which
  installation runs, from the CLI) goes to stderr first."""
  args = parser().parse_args(argv)
  if banner:
    print(banner, file=sys.stderr, flush=True)
  from distill_jax.audit.subjects import AuditError
  from distill_jax.common.model_io import CheckpointError
  from distill_jax.common.registry import UnknownNameError
  from distill_jax.data.sources import DataNotPreparedError

  try:
    audit(args)
  except (AuditError, UnknownNameError) as e:
    return print_failure(e, 2, args.verbosity)
  except (CheckpointError, DataNotPreparedError, OSError) as e:
    return print_failure(e, 1, args.verbosity)
  return 0

