"""Metric output: `metrics.jsonl` lines and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping

import jax
from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboardX.record_writer import masked_crc32c


def truncate_jsonl(path: str, step: int) -> None:
  """Keeps the lines of `path` up to `step` (and drops a torn last line), atomically: what a
  run resumed from checkpoint `step` must start from, so each step appears once, in order."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # A line torn by a kill.
      if isinstance(row, dict) and row.get("step", step + 1) <= step:
        kept.append(line.rstrip("\n") + "\n")
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


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


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and to TensorBoard events in `workdir/tb`.

  `resume_step`: the step the run restarts from (0 for a fresh start). Lines after it are
  dropped from metrics.jsonl, and TensorBoard is told to purge its events after it, so both
  read as one uninterrupted run however often it was restarted.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    truncate_jsonl(path, resume_step)
    self._jsonl = open(path, "a")
    self._tb = EventFile(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    self._tb.write(step, {k: v for k, v in scalars.items() if math.isfinite(v)})

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Texts (e.g. a language model's samples) to TensorBoard's Text tab."""
    if self.enabled and texts:
      self._tb.write_texts(step, texts)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
