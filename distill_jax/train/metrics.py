"""Metric output, from process 0 only: `metrics.jsonl` (always), TensorBoard event files, and
the experiment trackers (`train/trackers.py`), each a `Writer` registered in `WRITERS` and chosen
by `config.log.writers`.

`metrics.jsonl` is the run's record: plots, reports, sweeps and a resumed run's trackers read
it, so every run writes it. A writer opened on a resumed run gets the step it restarts from and
the rows of metrics.jsonl up to it (`Opening`), and keeps its store equal to metrics.jsonl: each
(metric, step) once, whatever was logged past the checkpoint before a kill.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboardX.record_writer import masked_crc32c

from distill_jax.common.registry import Registry


def truncate_jsonl(path: str, step: int) -> list[dict[str, Any]]:
  """Keeps the lines of `path` up to `step` (and drops a torn last line), atomically: what a
  run resumed from checkpoint `step` must start from, so each step appears once, in order.
  Returns the kept rows (`{'step': s, metric: value, ...}`, in file order)."""
  if not os.path.exists(path):
    return []
  kept, rows = [], []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # A line torn by a kill.
      if isinstance(row, dict) and row.get("step", step + 1) <= step:
        kept.append(line.rstrip("\n") + "\n")
        rows.append(row)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return rows


class EventFile:
  """A TensorBoard event file, written synchronously: each `write` is in the file (the OS's
  buffers) when it returns, so a checkpoint saved after it never outlives its scalars.
  (tensorboardX's `SummaryWriter` queues events to a thread, and its `flush` does not wait for
  that queue: a kill right after a checkpoint lost the step's scalars for good.)

  `purge_step`: TensorBoard hides the events of earlier files from this step on (a SessionLog
  START), which is how a resumed run overwrites what its killed predecessor logged past its
  checkpoint. Files are named by a timestamp kept above every existing file's, so they sort in
  the order written, and a restart within the same second never truncates its predecessor's.
  """

  PREFIX = "events.out.tfevents."

  def __init__(self, logdir: str, purge_step: int):
    os.makedirs(logdir, exist_ok=True)
    stamps = [int(name[len(self.PREFIX):].split(".")[0]) for name in os.listdir(logdir)
              if name.startswith(self.PREFIX) and name[len(self.PREFIX):].split(".")[0].isdigit()]
    stamp = max([int(time.time()), *(s + 1 for s in stamps)])
    self._file = open(os.path.join(logdir, f"{self.PREFIX}{stamp:010d}.{socket.gethostname()}"),
                      "xb")
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self._write(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=(
        event_pb2.SessionLog(status=event_pb2.SessionLog.START))))

  def _write(self, event: event_pb2.Event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))  # TFRecord: length, its CRC, data, its CRC.
    self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                     + struct.pack("<I", masked_crc32c(data)))
    self._file.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                summary=summary_pb2.Summary(value=values)))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Text summaries (TensorBoard's Text tab), one per tag."""
    values = [summary_pb2.Summary.Value(
        tag=tag, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])),
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")))
        for tag, text in texts.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._file.close()


@dataclasses.dataclass(frozen=True)
class Opening:
  """What a writer is opened with.

  workdir: the run's directory. resume_step: the step the run restarts from (0: a fresh start).
  history: metrics.jsonl's rows up to `resume_step` (`{'step': s, metric: value, ...}`), what
  the run has logged so far; a tracker fills in the rows its store lacks (a kill can lose the
  last ones it was sent). settings: the writer's own section of `config.log` (e.g.
  `config.log.wandb`; empty for writers without one). run_config: the run's config as a JSON
  dict, which a tracker records once.
  """

  workdir: str
  resume_step: int = 0
  history: Sequence[Mapping[str, Any]] = ()
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  run_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Writer:
  """Where scalars go. A writer is opened (its registered factory called with an `Opening`)
  once per launch of a run, on process 0 only."""

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` (name -> float, possibly non-finite) at `step`."""
    raise NotImplementedError

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Records texts (e.g. a language model's samples); writers without a place for them
    ignore them."""

  def close(self, completed: bool = True) -> None:
    """Flushes and closes; `completed` is False for a run that stopped before its end (it
    may be resumed)."""


# name -> factory(Opening) -> Writer; `config.log.writers` picks from these.
WRITERS: Registry = Registry("metric writer")
# Always written, whatever else is chosen (see the module's docstring).
REQUIRED_WRITER = "jsonl"


@WRITERS.register("jsonl")
class JsonlWriter(Writer):
  """`workdir/metrics.jsonl`: one `{"step": s, name: value, ...}` line per write, flushed at
  once; cut back to the resume step when opened (by `MetricWriter`, which reads it first)."""

  def __init__(self, opening: Opening):
    self._file = open(os.path.join(opening.workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._file.write(json.dumps({"step": step, **scalars}) + "\n")
    self._file.flush()

  def close(self, completed: bool = True) -> None:
    self._file.close()


@WRITERS.register("tensorboard")
class TensorBoardWriter(Writer):
  """TensorBoard events in `workdir/tb`, told to purge what a killed launch logged after the
  resume step (`EventFile`); non-finite values are left out (TensorBoard cannot plot them)."""

  def __init__(self, opening: Opening):
    self._events = EventFile(os.path.join(opening.workdir, "tb"),
                             purge_step=opening.resume_step + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._events.write(step, {k: v for k, v in scalars.items() if math.isfinite(v)})

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._events.write_texts(step, texts)

  def close(self, completed: bool = True) -> None:
    self._events.close()


def check_writers(names: Sequence[str], settings: Mapping[str, Any] | None = None) -> None:
  """Raises ValueError (one line) unless `names` are known writers, once each, with 'jsonl',
  the packages of the optional ones (wandb, mlflow) are installed, and their `settings`
  (`config.log`) fit."""
  for name in names:
    if name not in WRITERS:
      raise ValueError(WRITERS.unknown_message(name))
    writer = WRITERS.get(name)
    if hasattr(writer, "requires"):
      writer.requires.check()
    if hasattr(writer, "check_settings"):
      writer.check_settings((settings or {}).get(name) or {})
  if REQUIRED_WRITER not in names:
    raise ValueError(f"{list(names)} lacks {REQUIRED_WRITER!r}: metrics.jsonl is the run's "
                     "record (plots, reports, sweeps and resumed trackers read it); keep it.")
  if len(set(names)) != len(names):
    raise ValueError(f"{list(names)} names a writer twice.")


class MetricWriter:
  """The run's writers (`config.log.writers`) as one: each write goes to all of them.

  `resume_step`: the step the run restarts from (0 for a fresh start). metrics.jsonl is cut
  back to it first; every writer then keeps its own store equal to metrics.jsonl (TensorBoard
  purges, trackers skip what they hold and add what they lack), so each reads as one
  uninterrupted run however often it was restarted. Only process 0 writes.
  """

  def __init__(self, workdir: str, resume_step: int = 0,
               writers: Sequence[str] = ("jsonl", "tensorboard"),
               settings: Mapping[str, Any] | None = None,
               run_config: Mapping[str, Any] | None = None):
    self.enabled = jax.process_index() == 0
    self._writers: list[Writer] = []
    if not self.enabled:
      return
    settings = settings or {}
    check_writers(list(writers), settings)
    history = truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), resume_step)
    try:  # metrics.jsonl first: the others follow it.
      for name in sorted(writers, key=lambda name: name != REQUIRED_WRITER):
        factory: Callable[[Opening], Writer] = WRITERS.get(name)
        self._writers.append(factory(Opening(
            workdir=workdir, resume_step=resume_step, history=history,
            settings=settings.get(name) or {}, run_config=run_config or {})))
    except BaseException:
      self.close(completed=False)
      raise

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    for writer in self._writers:
      writer.write(step, scalars)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Texts (e.g. a language model's samples), to the writers that show them."""
    if texts:
      for writer in self._writers:
        writer.write_texts(step, texts)

  def close(self, completed: bool = True) -> None:
    writers, self._writers = self._writers, []
    for writer in writers:
      writer.close(completed)


# The trackers register themselves in WRITERS (their packages are imported only when opened).
from distill_jax.train import trackers as _trackers  # noqa: E402,F401
