"""Experiment trackers as metric writers: Weights & Biases ('wandb') and MLflow ('mlflow').

Both are optional extras (`pip install 'distill-jax[wandb]'`, `'distill-jax[mlflow]'`), imported
only when `config.log.writers` names them. Each mirrors metrics.jsonl into its store:

- One tracker run per workdir: its id is kept in `workdir/trackers.json`, and every launch of the
  run (a resume after a kill or a stop) continues that tracker run.
- Each (metric, step) once: when opened, a tracker asks its store what it already holds, skips
  those steps when the resumed run logs them again, and adds the rows of metrics.jsonl up to the
  resume step that the store lacks (a kill loses what a tracker had buffered). A step the store
  got from the killed launch keeps that launch's value, which is the resumed run's too: a resume
  replays the same batches from the same state (bit-identical on CPU).
- The run's config is recorded once (W&B's run config; MLflow params, flattened to dotted keys).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import secrets
import struct
import time
import types
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from distill_jax.train.checkpoint import write_atomic
from distill_jax.train.metrics import WRITERS, Opening, Writer

RUN_IDS_FILE = "trackers.json"  # In the workdir: {writer name: its tracker run's id}.


class TrackerError(ValueError):
  """A tracker's store could not be opened or written (a login, a URI, the network): the CLI
  shows it in one line. The workdir stays resumable, and a rerun sends the store what it
  lacks."""


def _first_line(error: BaseException) -> str:
  text = str(getattr(error, "message", None) or error).strip()
  return text.splitlines()[0] if text else type(error).__name__


@dataclasses.dataclass(frozen=True)
class Requirement:
  """The package a writer needs (`module`) and the extra of distill-jax that installs it."""

  writer: str
  module: str
  extra: str

  def check(self) -> None:
    """Raises ValueError (one line, with the install command) if the package is missing."""
    if importlib.util.find_spec(self.module) is None:
      raise ValueError(f"the {self.writer!r} writer needs the {self.module} package, which is "
                       f"not installed: pip install 'distill-jax[{self.extra}]'")

  def load(self) -> types.ModuleType:
    self.check()
    return importlib.import_module(self.module)


def stored_run_id(workdir: str, writer: str) -> str | None:
  """The tracker run id that `writer` keeps for this workdir (None before its first launch)."""
  try:
    with open(os.path.join(workdir, RUN_IDS_FILE)) as f:
      return json.load(f).get(writer)
  except (FileNotFoundError, ValueError):
    return None


def store_run_id(workdir: str, writer: str, run_id: str) -> None:
  path = os.path.join(workdir, RUN_IDS_FILE)
  try:
    with open(path) as f:
      ids = json.load(f)
  except (FileNotFoundError, ValueError):
    ids = {}
  write_atomic(path, json.dumps({**ids, writer: run_id}, indent=2, sort_keys=True))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: a nested config as the flat keys MLflow's params take."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


class Tracker(Writer):
  """A writer that mirrors metrics.jsonl into an outside store, each (metric, step) once.

  A subclass opens its store, then calls `_start(floor, held, history)` with what the store
  holds: every step up to `floor` (W&B, whose rows are whole steps, in order) and the
  (store name, step) pairs in `held` (MLflow). Writes of what the store holds are skipped; the
  rows of `history` (metrics.jsonl up to the resume step) that it lacks are sent first.
  """

  def _start(self, floor: int, held: set[tuple[str, int]],
             history: Sequence[Mapping[str, Any]]) -> None:
    self._floor, self._held = floor, held
    for row in history:
      self.write(int(row["step"]), {k: float(v) for k, v in row.items() if k != "step"})

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    named = {self.store_name(k): v for k, v in scalars.items()}
    new = {k: v for k, v in named.items() if step > self._floor and (k, step) not in self._held}
    if new:
      self._log(step, new)

  @staticmethod
  def store_name(name: str) -> str:
    """The name the store keeps metric `name` under."""
    return name

  def _log(self, step: int, scalars: Mapping[str, float]) -> None:
    """Sends `scalars` (store names) at `step` to the store."""
    raise NotImplementedError


WANDB_MODES = ("", "online", "offline", "disabled")


@WRITERS.register("wandb")
class WandbWriter(Tracker):
  """Weights & Biases: `config.log.wandb` = {project, entity, mode, name, group, tags, dir}.

  Empty settings leave the choice to wandb (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, ...), but
  `dir`, which defaults to WANDB_DIR and then to the workdir (so `workdir/wandb/` holds the
  local files), and `name`, which defaults to the workdir's name. Offline, each launch writes
  its own `offline-run-*-ID` directory; together they hold metrics.jsonl's rows once, in order
  (sync them with `wandb sync WORKDIR/wandb/offline-run-*-ID`).
  """

  requires = Requirement("wandb", "wandb", "wandb")

  @staticmethod
  def check_settings(settings: Mapping[str, Any]) -> None:
    mode = settings.get("mode", "")
    if mode not in WANDB_MODES:
      raise ValueError(f"config.log.wandb.mode is {mode!r}; choose one of {list(WANDB_MODES)} "
                       "('': WANDB_MODE or wandb's default, online).")

  def __init__(self, opening: Opening):
    self._wandb = wandb = self.requires.load()
    s, workdir = opening.settings, opening.workdir
    run_id = stored_run_id(workdir, "wandb")
    if run_id is None:
      run_id = secrets.token_hex(8)
      store_run_id(workdir, "wandb", run_id)
    directory = s.get("dir") or os.environ.get("WANDB_DIR") or workdir
    os.makedirs(directory, exist_ok=True)
    try:
      self._run = wandb.init(
          id=run_id, resume="allow", dir=directory, project=s.get("project") or None,
          entity=s.get("entity") or None, mode=s.get("mode") or None,
          name=s.get("name") or os.path.basename(workdir), group=s.get("group") or None,
          tags=list(s.get("tags") or ()) or None, config=dict(opening.run_config),
          allow_val_change=True)
    except Exception as e:  # noqa: BLE001  (wandb's errors have no common base)
      raise TrackerError(f"W&B could not start run {run_id} (config.log.wandb, WANDB_*): "
                         f"{_first_line(e)}") from e
    settings = self._run.settings
    if settings.mode == "disabled":
      floor = -1
    elif settings.mode in ("offline", "dryrun"):  # What this run's earlier launches wrote.
      floor = max((wandb_last_step(path) for path in glob.glob(
          os.path.join(settings.wandb_dir, "offline-run-*", f"run-{run_id}.wandb"))
          if os.path.abspath(path) != os.path.abspath(settings.sync_file)), default=-1)
    else:  # Online: a resumed run's next step is the server's last one + 1.
      floor = self._run.step - 1
    self._start(floor, set(), opening.history)

  def _log(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=step)

  def close(self, completed: bool = True) -> None:
    self._run.finish(exit_code=0 if completed else 1)
    self._wandb.teardown()  # Waits for wandb's service to write the run's files.


def wandb_records(path: str) -> Iterator[bytes]:
  """The records of a W&B transaction log (a run's `.wandb` file), each a serialized
  `wandb_internal.Record`: a 7-byte header (':W&B', 0xBEE1, version 0), then LevelDB-log
  chunks in 32 KiB blocks (CRC-32 of type and data, length, type: 1 whole, 2 first, 3 middle,
  4 last). Ends at the first torn or corrupt chunk (a launch killed before a flush)."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 7:  # Killed before its header was written.
    return
  if data[:4] != b":W&B":
    raise ValueError(f"{path} is not a W&B run file")
  block, pos, parts = 32768, 7, []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # A block's tail too short for a header is padding.
      pos += block - pos % block
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    if kind == 0 and length == 0:  # Zero padding.
      pos += 7
      continue
    if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
      return
    pos += 7 + length
    parts.append(chunk)
    if kind in (1, 4):
      yield b"".join(parts)
      parts = []


def wandb_last_step(path: str) -> int:
  """The last history step in a W&B run file (-1 if none)."""
  from wandb.proto import wandb_internal_pb2

  last = -1
  for data in wandb_records(path):
    record = wandb_internal_pb2.Record.FromString(data)
    if record.WhichOneof("record_type") == "history":
      last = max(last, record.history.step.num)
  return last


MLFLOW_PARAM_BATCH = 100  # MLflow's most params per log_batch call.
MLFLOW_PARAM_LENGTH = 6000  # ... and its longest param value.


@WRITERS.register("mlflow")
class MlflowWriter(Tracker):
  """MLflow: `config.log.mlflow` = {tracking_uri, experiment, run_name}.

  `tracking_uri` '' takes MLFLOW_TRACKING_URI: a server (http://host:5000), or a local store
  (`sqlite:///path/mlflow.db` with the full mlflow package; `file:///path/mlruns` with
  MLFLOW_ALLOW_FILE_STORE=true). `experiment` '' takes MLFLOW_EXPERIMENT_NAME, then 'Default';
  `run_name` '' the workdir's name. Metrics are sent as they are written (one call per write).
  Metric names keep their first '/' (MLflow's UI groups by it) and write the others as '.'
  (`train/loss/ce` -> `train/loss.ce`): in MLflow's file store a name cannot be both a metric
  (`train/loss`) and a folder of others.
  """

  requires = Requirement("mlflow", "mlflow", "mlflow")

  @staticmethod
  def check_settings(settings: Mapping[str, Any]) -> None:
    if not settings.get("tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
      raise ValueError(
          "the 'mlflow' writer needs a tracking store: set config.log.mlflow.tracking_uri or "
          "MLFLOW_TRACKING_URI (e.g. http://host:5000, sqlite:///path/mlflow.db)")

  def __init__(self, opening: Opening):
    self.requires.load()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    s, workdir = opening.settings, opening.workdir
    self.check_settings(s)
    uri = s.get("tracking_uri") or os.environ["MLFLOW_TRACKING_URI"]
    try:
      self._client = client = MlflowClient(tracking_uri=uri)
      run = self._existing_run(client, stored_run_id(workdir, "mlflow"), uri)
      if run is None:
        name = s.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        experiment = client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(name))
        run = client.create_run(experiment_id, run_name=s.get("run_name") or
                                os.path.basename(workdir),
                                tags={"distill_jax.workdir": workdir})
        store_run_id(workdir, "mlflow", run.info.run_id)
      elif run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
      self._run_id = run.info.run_id
      self._log_params(run.data.params, opening.run_config)
      held = {(key, m.step) for key in run.data.metrics
              for m in client.get_metric_history(self._run_id, key)}
    except MlflowException as e:
      raise TrackerError(f"MLflow at {uri}: {_first_line(e)}") from e
    self._uri = uri
    self._start(-1, held, opening.history)

  @staticmethod
  def store_name(name: str) -> str:
    group, slash, rest = name.partition("/")
    return group + slash + rest.replace("/", ".")

  @staticmethod
  def _existing_run(client: Any, run_id: str | None, uri: str) -> Any:
    """The stored run, or None (and a warning) if the store has no such run."""
    from mlflow.exceptions import MlflowException

    if run_id is None:
      return None
    try:
      return client.get_run(run_id)
    except MlflowException:
      logging.warning("MLflow at %s has no run %s (named in %s): starting a new one with "
                      "the run's metrics so far.", uri, run_id, RUN_IDS_FILE)
      return None

  def _log_params(self, logged: Mapping[str, str], run_config: Mapping[str, Any]) -> None:
    """The config's flattened settings that the run does not have yet (MLflow params are
    write-once: a setting changed on resume keeps its first value there)."""
    from mlflow.entities import Param

    params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
              for k, v in sorted(flatten(run_config).items()) if k not in logged]
    params = [Param(p.key, p.value[:MLFLOW_PARAM_LENGTH]) for p in params]
    for i in range(0, len(params), MLFLOW_PARAM_BATCH):
      self._client.log_batch(self._run_id, params=params[i:i + MLFLOW_PARAM_BATCH])

  def _log(self, step: int, scalars: Mapping[str, float]) -> None:
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    now = int(time.time() * 1000)
    try:
      self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in scalars.items()])
    except MlflowException as e:  # After the client's own retries.
      raise TrackerError(f"MLflow at {self._uri} took no metrics at step {step}: "
                         f"{_first_line(e)}. The workdir is intact: rerun the same command "
                         "to resume (MLflow then gets the steps it lacks).") from e

  def close(self, completed: bool = True) -> None:
    self._client.set_terminated(self._run_id, "FINISHED" if completed else "KILLED")
