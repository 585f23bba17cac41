"""`distill-jax sweep ...` and `distill-jax report ...`: argument parsing and dispatch.

These sub-commands parse their own arguments with argparse (the training CLI's absl flags
define `--config` as a config *file* flag, which would try to load a sweep spec as a run
config); `distill_jax.main.run` hands them `sys.argv[2:]` before absl sees anything.

    distill-jax sweep --config=F[:ARG] --workdir=ROOT [--launcher=local|slurm] [flags]
    distill-jax sweep status ROOT
    distill-jax report ROOT [--rows=... --cols=... --expected=FILE --csv --png]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from distill_jax.sweep import state
from distill_jax.sweep.launch import load_launchers
from distill_jax.sweep.spec import SweepError, load_trials


def sweep_parser() -> argparse.ArgumentParser:
  launchers = load_launchers()
  parser = argparse.ArgumentParser(
      prog="distill-jax sweep",
      description="Run every trial of a sweep spec (a config file's get_sweep(arg)) in "
                  "WORKDIR/<trial>, stage by stage. `distill-jax sweep status ROOT` shows a "
                  "sweep's progress.")
  parser.add_argument("--config", required=True, help="The sweep spec: path/to/file.py[:ARG].")
  parser.add_argument("--workdir", required=True, help="The sweep's root directory.")
  parser.add_argument("--launcher", default="local", choices=launchers.names(),
                      help="Where the trials run (default local).")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="A config setting for every trial, e.g. --set=data.data_dir=/data "
                           "(repeat for more).")
  parser.add_argument("--dry_run", action="store_true",
                      help="Validate every trial and print the commands; run nothing.")
  for name in launchers.names():
    launchers.get(name).add_flags(parser)
  return parser


def sweep_main(argv: list[str]) -> int:
  if argv and argv[0] == "status":
    return status_main(argv[1:])
  args = sweep_parser().parse_args(argv)
  root = os.path.abspath(args.workdir)
  launcher = load_launchers().get(args.launcher)
  problem = None if args.dry_run else getattr(launcher, "unavailable", lambda _: None)(args)
  if problem:
    print(f"Error: {problem}", file=sys.stderr)
    return 2
  t0 = time.time()
  try:
    trials = load_trials(args.config, root, settings=args.set)
  except SweepError as e:
    print(f"Invalid sweep: {e}", file=sys.stderr)
    return 2
  print(f"[sweep] {len(trials)} trials validated in {time.time() - t0:.1f}s", flush=True)
  if args.dry_run:
    for t in trials:
      print(f"{t.stage}/{t.name}: {' '.join(state.command(root, t)[1:])}")
    return 0
  state.write_trials(root, args.config, trials, launcher=args.launcher)
  code = launcher.launch(root, trials, args)
  print(f"[sweep] {args.launcher} launcher exited after {time.time() - t0:.0f}s", flush=True)
  return code


def status_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="distill-jax sweep status",
      description="Each trial's state (pending/running/done/failed/interrupted/blocked) and "
                  "the failures' log tails.")
  parser.add_argument("root", help="The sweep's --workdir.")
  parser.add_argument("--lines", type=int, default=15, help="Log lines shown per failure.")
  args = parser.parse_args(argv)
  try:
    info = state.read_trials(args.root)
  except FileNotFoundError as e:
    print(e, file=sys.stderr)
    return 2
  trials = [state.trial_from_json(t) for t in info["trials"]]
  states = load_launchers().get(info.get("launcher", "local")).states(args.root, trials)
  width = max(len(t.name) for t in trials)
  for t in trials:
    print(f"{t.stage:>12}  {t.name:<{width}}  {states[t.name]}")
  print(state.summary(args.root, states, args.lines))
  return 0 if all(s == "done" for s in states.values()) else 1


def report_main(argv: list[str]) -> int:
  from distill_jax.sweep import report

  return report.main(argv)
