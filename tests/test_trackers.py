"""Experiment trackers (W&B offline, MLflow's local file store): what they store, read back
through each library's own formats, equals metrics.jsonl, each (metric, step) once, in one
tracker run, however the run was interrupted and resumed. Nothing reaches the network."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
from conftest import ROOT

from distill_jax.config import ConfigError, base_config, validate

CONFIG = """
import ml_collections
from distill_jax.config import base_config

def get_config(arg=None):
  c = base_config()
  c.student = ml_collections.ConfigDict({"name": "mlp", "kwargs": {"hidden": (16,)}})
  c.batch_size, c.eval_batch_size = 32, 512
  c.num_steps = 20
  c.eval_every_epochs = 0.125  # 46 steps per epoch: evaluations at 6, 12, 18 and the end.
  c.log_every_steps = 1
  c.checkpoint_every_steps = 5
  c.progress_bar = False
  c.log.writers = ("jsonl", "tensorboard", "wandb", "mlflow")
  return c
"""
# The CLI, SIGKILLed (no clean-up, as by the OOM killer) as it is about to save checkpoint 15:
# it has logged steps 11-15, past its last checkpoint (10), which the resumed run logs again.
KILLED_AT_15 = textwrap.dedent("""
  import os, signal, sys
  from distill_jax.train import checkpoint
  save = checkpoint.Checkpointer.save
  def save_or_die(self, step, *args, **kwargs):
    if step == 15:
      os.kill(os.getpid(), signal.SIGKILL)
    return save(self, step, *args, **kwargs)
  checkpoint.Checkpointer.save = save_or_die
  from distill_jax import main
  sys.argv[0] = "distill-jax"
  main.run()
""")


def offline_env(base):
  """W&B offline and MLflow on a file store under `base`; neither sends telemetry."""
  return {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
          "WANDB_CONFIG_DIR": str(base / "wandb_config"),
          "WANDB_CACHE_DIR": str(base / "wandb_cache"), "WANDB_DATA_DIR": str(base / "wandb_data"),
          "MLFLOW_TRACKING_URI": f"file://{base / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
          "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def jsonl_scalars(workdir):
  """{(name, step): value} of metrics.jsonl, asserting no (name, step) appears twice."""
  scalars = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      for name, value in row.items():
        if name != "step":
          assert (name, row["step"]) not in scalars, (name, row["step"])
          scalars[(name, row["step"])] = value
  return scalars


def wandb_file_records(path):
  """(end offset, protobuf `Record`) of each record of a W&B transaction log, read as its
  writer lays it out: a 7-byte header, then 32 KiB blocks of chunks (CRC-32 of type + data,
  length, type), stopping at a torn chunk."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, "rb").read()
  assert data[:4] == b":W&B" or len(data) < 7  # Shorter: killed before its header.
  pos, parts, records = 7, b"", []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:
      pos += 32768 - pos % 32768
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    body = data[pos + 7:pos + 7 + length]
    if kind == 0 or len(body) < length or zlib.crc32(bytes([kind]) + body) != crc:
      break
    pos, parts = pos + 7 + length, parts + body
    if kind in (1, 4):
      records.append((pos, wandb_internal_pb2.Record.FromString(parts)))
      parts = b""
  return records


def wandb_scalars(wandb_dir, run_id):
  """{(name, step): value} in every offline launch of W&B run `run_id`, in launch order,
  asserting that no (name, step) is stored twice, and the run's config as W&B recorded it."""
  scalars, config = {}, {}
  paths = sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb")))
  assert paths and all(p.endswith(f"-{run_id}{os.sep}run-{run_id}.wandb") for p in paths), paths
  for path in paths:
    for _, record in wandb_file_records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        assert record.run.run_id == run_id
        config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
      elif kind == "history":
        step = record.history.step.num
        for item in record.history.item:
          name = item.key or "/".join(item.nested_key)
          if not name.startswith("_"):
            assert (name, step) not in scalars, (name, step, path)
            scalars[(name, step)] = json.loads(item.value_json)
  return scalars, config


def mlflow_name(name):
  """MLflow's name of a metric: the first '/' kept, the others '.'."""
  group, slash, rest = name.partition("/")
  return group + slash + rest.replace("/", ".")


def mlflow_scalars(uri, run_id):
  """{(name, step): value} of MLflow run `run_id`, asserting no (name, step) twice, and its
  params."""
  from mlflow.tracking import MlflowClient

  client = MlflowClient(uri)
  run = client.get_run(run_id)
  scalars = {}
  for name in run.data.metrics:
    for metric in client.get_metric_history(run_id, name):
      assert (name, metric.step) not in scalars, (name, metric.step)
      scalars[(name, metric.step)] = metric.value
  return scalars, run


def launch(env, workdir, script=None):
  args = ["-c", script] if script else ["-m", "distill_jax.main"]
  proc = subprocess.run(
      [sys.executable, *args, f"--config={env['config']}", f"--workdir={workdir}",
       f"--config.data.data_dir={env['data_dir']}"],
      capture_output=True, text=True, cwd=ROOT, env=env["env"], timeout=600)
  return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, data_dir):
  """A run with both trackers SIGKILLed before checkpoint 15, what its stores held then, and
  the same command run again to the end."""
  base = tmp_path_factory.mktemp("trackers")
  (base / "config.py").write_text(CONFIG)
  env = {"config": str(base / "config.py"), "data_dir": data_dir, "env": {
      **os.environ, **offline_env(base), "XLA_FLAGS": "", "DISTILL_JAX_CPU_FLAGS": "0",
      "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
      "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}}
  workdir = str(base / "run")
  rc, err = launch(env, workdir, script=KILLED_AT_15)
  assert rc == -signal.SIGKILL, err[-3000:]
  with pytest.MonkeyPatch.context() as patch:  # This process reads the stores.
    for key, value in offline_env(base).items():
      patch.setenv(key, value)
    ids = json.load(open(os.path.join(workdir, "trackers.json")))
    uri = env["env"]["MLFLOW_TRACKING_URI"]
    killed = {"jsonl": jsonl_scalars(workdir), "mlflow": mlflow_scalars(uri, ids["mlflow"])[0]}
    rc, err = launch(env, workdir)
    assert rc == 0, err[-3000:]
    yield {"workdir": workdir, "ids": ids, "uri": uri, "killed": killed}


def test_the_killed_run_had_sent_steps_past_its_checkpoint(killed_and_resumed):
  """What makes the resume test mean something: the stores held steps 11-15, which the resumed
  run (from checkpoint 10) logs again."""
  killed = killed_and_resumed["killed"]
  assert max(step for _, step in killed["jsonl"]) == 15
  assert max(step for _, step in killed["mlflow"]) == 15


def test_wandb_holds_metrics_jsonl_once_in_one_run(killed_and_resumed):
  workdir, run_id = killed_and_resumed["workdir"], killed_and_resumed["ids"]["wandb"]
  stored, config = wandb_scalars(workdir, run_id)
  expected = jsonl_scalars(workdir)
  assert {step for _, step in expected} == set(range(1, 21))
  assert stored == expected
  assert len(glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))) == 2  # Two launches.
  assert config["num_steps"] == 20 and config["optim"]["lr"] == 0.05
  assert json.load(open(os.path.join(workdir, "trackers.json")))["wandb"] == run_id


def test_mlflow_holds_metrics_jsonl_once_in_one_run(killed_and_resumed):
  from mlflow.tracking import MlflowClient

  workdir, uri = killed_and_resumed["workdir"], killed_and_resumed["uri"]
  run_id = killed_and_resumed["ids"]["mlflow"]
  stored, run = mlflow_scalars(uri, run_id)
  expected = {(mlflow_name(name), step): v for (name, step), v in jsonl_scalars(workdir).items()}
  assert stored == expected
  assert run.info.status == "FINISHED" and run.info.run_name == "run"
  assert run.data.params["num_steps"] == "20" and run.data.params["optim.lr"] == "0.05"
  assert run.data.params["student.name"] == "mlp"
  runs = MlflowClient(uri).search_runs([run.info.experiment_id])
  assert [r.info.run_id for r in runs] == [run_id]
  assert json.load(open(os.path.join(workdir, "trackers.json")))["mlflow"] == run_id


@pytest.fixture
def offline(tmp_path, monkeypatch):
  for key, value in offline_env(tmp_path).items():
    monkeypatch.setenv(key, value)
  return tmp_path


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_resume_skips_what_the_store_holds_and_adds_what_it_lacks(offline, name):
  """Launch 1 sends steps 1-6 (MLflow: but 2) and stops; W&B's file loses what followed step 5
  (a kill loses what was not flushed, and tears the last chunk), and another launch left an
  empty one. Launch 2 resumes from step 3
  with metrics.jsonl's rows 1-3 and logs steps 4-8 again with new values: the store keeps what
  it holds, and gets what it lacks (MLflow: 2 from metrics.jsonl, 7-8; W&B: 6-8)."""
  from distill_jax.train.metrics import WRITERS, Opening

  workdir = str(offline / "run")
  os.makedirs(workdir)
  opening = Opening(workdir=workdir, run_config={"seed": 3, "optim": {"lr": 0.1}})
  first = WRITERS.get(name)(opening)
  for step in (1, 3, 4, 5, 6) if name == "mlflow" else range(1, 7):
    first.write(step, {"train/loss": 1.0 / step, "train/loss/ce": 2.0 / step})
  first.close(completed=False)
  if name == "wandb":
    (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    end = next(end for end, r in wandb_file_records(path)
               if r.WhichOneof("record_type") == "history" and r.history.step.num == 5)
    with open(path, "r+b") as f:
      f.truncate(end + 3)
    # A launch killed before wandb wrote anything.
    empty = os.path.join(os.path.dirname(os.path.dirname(path)), f"offline-run-0-{first._run.id}")
    os.makedirs(empty)
    open(os.path.join(empty, f"run-{first._run.id}.wandb"), "wb").close()
  history = [{"step": s, "train/loss": 1.0 / s, "train/loss/ce": 2.0 / s} for s in (1, 2, 3)]
  second = WRITERS.get(name)(Opening(workdir=workdir, resume_step=3, history=history,
                                     run_config=opening.run_config))
  for step in range(4, 9):
    second.write(step, {"train/loss": 10.0 / step, "train/loss/ce": 20.0 / step})
  second.close()
  expected = {}
  for step in range(1, 9):
    scale = 10.0 if step > (6 if name == "mlflow" else 5) else 1.0
    expected[("train/loss", step)] = scale / step
    expected[("train/loss/ce", step)] = 2 * scale / step
  run_id = json.load(open(os.path.join(workdir, "trackers.json")))[name]
  if name == "wandb":
    assert wandb_scalars(workdir, run_id)[0] == expected
  else:
    stored, run = mlflow_scalars(os.environ["MLFLOW_TRACKING_URI"], run_id)
    assert stored == {(mlflow_name(k), s): v for (k, s), v in expected.items()}
    assert run.data.params == {"seed": "3", "optim.lr": "0.1"}


def config_with(**log):
  c = base_config()
  c.num_steps = 1
  for key, value in log.items():
    node, *path = key.split("__")
    target = c.log
    for part in [node, *path][:-1]:
      target = target[part]
    target[[node, *path][-1]] = value
  return c


@pytest.mark.parametrize("log, message", [
    ({"writers": ("jsonl", "wandbb")}, "Unknown metric writer 'wandbb'. Did you mean 'wandb'? "
     "Known metric writers: jsonl, mlflow, tensorboard, wandb."),
    ({"writers": ("tensorboard",)}, "['tensorboard'] lacks 'jsonl': metrics.jsonl is the run's "
     "record"),
    ({"writers": ("jsonl", "tensorboard", "jsonl")}, "names a writer twice"),
    ({"writers": ("jsonl", "wandb"), "wandb__mode": "ofline"},
     "config.log.wandb.mode is 'ofline'; choose one of ['', 'online', 'offline', 'disabled']"),
    ({"writers": ("jsonl", "mlflow")}, "set config.log.mlflow.tracking_uri or "
     "MLFLOW_TRACKING_URI"),
])
def test_bad_writer_settings_fail_in_one_line_before_the_run(log, message, monkeypatch):
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  with pytest.raises(ConfigError) as e:
    validate(config_with(**log))
  assert str(e.value).startswith("config.log.writers: ") and message in str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, extra", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_names_the_install_command(name, extra, monkeypatch):
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda module, *a: None if module == name else find_spec(module, *a))
  monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
  with pytest.raises(ConfigError) as e:
    validate(config_with(writers=("jsonl", name)))
  assert str(e.value) == (f"config.log.writers: the {name!r} writer needs the {name} package, "
                          f"which is not installed: pip install 'distill-jax[{extra}]'")


def test_the_default_writes_jsonl_and_tensorboard_only():
  assert tuple(base_config().log.writers) == ("jsonl", "tensorboard")


def test_a_tracker_that_cannot_be_reached_fails_in_one_line(offline, monkeypatch):
  """MLflow at a local port where nothing listens (no retries): one line naming the store."""
  from distill_jax.train.metrics import WRITERS, Opening
  from distill_jax.train.trackers import TrackerError

  monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
  monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
  with pytest.raises(TrackerError) as e:
    WRITERS.get("mlflow")(Opening(workdir=str(offline),
                                  settings={"tracking_uri": "http://127.0.0.1:9"}))
  assert str(e.value).startswith("MLflow at http://127.0.0.1:9: ") and "\n" not in str(e.value)


def test_a_registered_writer_of_ones_own_gets_every_write_after_metrics_jsonl(tmp_path):
  """The loop knows no writer: a user's, registered by name, is opened with the resume step,
  metrics.jsonl's rows up to it and its own settings, and gets each write after the line."""
  from distill_jax.train.metrics import WRITERS, MetricWriter, Writer

  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a": 3.0}\n{"step": 4, "a"')
  seen = []

  class Mine(Writer):
    def __init__(self, opening):
      seen.append((opening.resume_step, list(opening.history), dict(opening.settings)))

    def write(self, step, scalars):
      lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
      seen.append((step, dict(scalars), json.loads(lines[-1])))

    def close(self, completed=True):
      seen.append(completed)

  WRITERS.register("test_mine")(Mine)
  writer = MetricWriter(str(tmp_path), resume_step=2, writers=("test_mine", "jsonl"),
                        settings={"test_mine": {"k": 1}})
  writer.write(3, {"a": 30.0})
  writer.close(completed=False)
  assert seen == [(2, [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}], {"k": 1}),
                  (3, {"a": 30.0}, {"step": 3, "a": 30.0}), False]
