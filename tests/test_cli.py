"""The command line as a user meets it: --help, one `Error:` line per mistake, Ctrl-C, plot.

Every error case runs `python -m distill_jax.main` in a subprocess (all cases at once, so the
table costs about one start-up's wall time per core) and checks the exit code (2: usage or
config, 1: a failure while running), that stderr is exactly one line `Error: ...` naming the
setting or path (nothing filtered out), and that the workdir the failed start would have
created does not exist afterwards.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import DIGITS, ROOT

ENV = {**os.environ, "XLA_FLAGS": "", "DISTILL_JAX_CPU_FLAGS": "0",
       "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def cli(*args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "distill_jax.main", *args], env=ENV, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# name -> (arguments after --config=configs/digits.py:kd --workdir=W, exit code, expected text)
ERRORS = {
    "key typo": (["--config.optim.lrr=0.1"], 2,
                 "--config.optim.lrr=0.1: config.optim has no key 'lrr' (did you mean 'lr'?)"),
    "loss setting typo": (["--config.losses.kd.temprature=2"], 2,
                          "config.losses.kd has no key 'temprature' (did you mean "
                          "'temperature'?)"),
    "wrong type": (["--config.optim.lr=fast"], 2, "--config.optim.lr=fast"),
    "model typo": (["--config.student.name=mlpp"], 2,
                   "config.student.name: Unknown model 'mlpp'. Did you mean 'mlp'?"),
    "missing teacher checkpoint": (["--config.teachers.teacher.checkpoint={tmp}/no_teacher"], 1,
                                   "{tmp}/no_teacher"),
    "unprepared data set": (["--config.data.name=cifar10", "--config.data.data_dir={tmp}/empty"],
                            1, "python scripts/prepare_data.py cifar10 --data_dir={tmp}/empty"),
    "no config file": (["--config=configs/no_such.py"], 2, "no config file 'configs/no_such.py'"),
    # A model named anew brings its own kwargs: the run gets as far as the teacher's checkpoint.
    "student model override": (["--config.student.name=cnn",
                                "--config.student.kwargs.widths=8,16",
                                "--config.teachers.teacher.checkpoint={tmp}/no_teacher"], 1,
                               "{tmp}/no_teacher"),
    "teacher model override": (["--config.teachers.teacher.model=mlp",
                                "--config.teachers.teacher.checkpoint={tmp}/no_teacher"], 1,
                               "{tmp}/no_teacher"),
    "old model's kwarg": (["--config.student.name=cnn", "--config.student.kwargs.hidden=64"], 2,
                          "--config.student.kwargs.hidden=64: config.student.kwargs has no key "
                          "'hidden'; it has: widths (the kwargs of model 'cnn'; `distill-jax "
                          "models` lists each model's)."),
    "unknown command": (["lossess"], 2, "Unknown command 'lossess' (did you mean 'losses'?)"),
    # Accelerators asked for on this CPU (one device here): stopped before anything is built.
    "gpu config on a cpu": (["--config.parallel.backend=gpu"], 2,
                            "config.parallel.backend='gpu' asks for a GPU, but JAX found only "
                            "the CPU (jax "),
    "mesh larger than the host": (["--config.parallel.mesh.data=4"], 2,
                                  "config.parallel.mesh {{'data': 4, 'fsdp': 1, 'tensor': 1}} "
                                  "asks for 4 devices, but JAX found only the CPU (jax "),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, data_dir):
  from distill_jax.data import embedded

  embedded.ensure_embedded("digits", data_dir)  # Built here, so no run logs its build.
  tmp = str(tmp_path_factory.mktemp("errors"))
  procs = {}
  for name, (args, _, _) in ERRORS.items():
    workdir = os.path.join(tmp, name.replace(" ", "_"))
    args = [a.format(tmp=tmp) for a in args]
    procs[name] = (workdir, cli(f"--config={DIGITS}:kd", f"--workdir={workdir}",
                                f"--config.data.data_dir={data_dir}",
                                "--config.teachers.teacher.checkpoint=unused", *args))
  return tmp, {name: (workdir, proc.wait(timeout=300), *proc.communicate())
               for name, (workdir, proc) in procs.items()}


@pytest.mark.parametrize("name", list(ERRORS))
def test_user_error_is_one_line(name, error_runs):
  tmp, runs = error_runs
  workdir, code, stdout, stderr = runs[name]
  _, want_code, want_text = ERRORS[name]
  assert (code, stdout) == (want_code, ""), stderr
  lines = stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
  assert want_text.format(tmp=tmp) in lines[0]
  assert not os.path.exists(workdir)  # The failed start removed the workdir it created.


def test_helpfull_lists_every_config_key_as_a_flag_with_its_value():
  """With --config, --helpfull ends with every key of that config (overrides applied) as
  `--config.KEY=VALUE`; every leaf of the config is there, once."""
  from distill_jax.config import load_config_file

  proc = cli(f"--config={DIGITS}:kd", "--config.optim.lr=0.125", "--helpfull")
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  assert "--workdir" in stdout and "--imports" in stdout  # absl's flags first.
  _, keys_part = stdout.split(f"The keys of --config={DIGITS}:kd, each a flag ")
  listed = [line.strip() for line in keys_part.splitlines() if line.startswith("  --config.")]
  for line in ("--config.optim.lr=0.125", "--config.student.name=mlp",
               "--config.student.kwargs.hidden='(32,)'", "--config.losses.kd.temperature=4.0",
               "--config.teachers.teacher.cache=None", "--config.progress_bar=true"):
    assert line in listed, line

  def leaves(tree, prefix):
    if isinstance(tree, dict) and tree:
      return [k for key, value in tree.items() for k in leaves(value, f"{prefix}.{key}")]
    return [prefix]

  keys = leaves(load_config_file(f"{DIGITS}:kd").to_dict(), "--config")
  assert sorted(line.split("=", 1)[0] for line in listed) == sorted(keys)


def test_the_open_weights_doc_command_parses():
  """docs/open_weights.md's teacher command, with `None` for the BOS id, parses as the CLI
  parses it (no model directory needed): bos_id None, the teacher an 'hf' one."""
  text = open(os.path.join(ROOT, "docs", "open_weights.md")).read()
  block = re.search(r"## A teacher from a directory\n\n```bash\n(.*?)```", text, re.S).group(1)
  args = shlex.split(block, comments=True)  # Bash's reading: continuations joined, comments cut.
  assert args[0] == "distill-jax" and "--config.student.kwargs.bos_id=None" in args
  args = args[1:]
  code = ("import sys; from distill_jax import main; main.parse_flags(sys.argv); c = main.FLAGS"
          ".config; print(c.student.kwargs.bos_id, c.teachers.teacher.model, "
          "c.teachers.teacher.dtype, c.data.tokenizer)")
  proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        env=ENV, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["None", "hf", "bfloat16", "hf:/models/Qwen2.5-0.5B"]


def test_verbosity_shows_the_traceback_and_an_existing_workdir_stays(tmp_path):
  workdir = tmp_path / "existing"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  proc = cli(f"--config={DIGITS}:kd", f"--workdir={workdir}", "--config.student.name=mlpp",
             "--verbosity=1")
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 2
  assert "Traceback (most recent call last)" in stderr
  assert stderr.splitlines()[-1].startswith("Error: config.student.name: Unknown model")
  assert sorted(os.listdir(workdir)) == ["notes.txt"]


def test_help_lists_the_commands_and_required_flags():
  proc = cli("--help")
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  for text in ("--config=FILE.py[:ARG] --workdir=DIR", "(required)",
               "e.g. distill-jax --config=configs/digits.py:teacher --workdir=runs/digits/teacher",
               "distill-jax losses", "distill-jax models", "distill-jax plot WORKDIR...",
               "--helpfull"):
    assert text in stdout, text
  proc = cli("--helpfull")
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "--workdir" in stdout and "--imports" in stdout, stderr


def test_ctrl_c_says_where_to_resume(tmp_path, data_dir):
  from distill_jax.data import embedded

  embedded.ensure_embedded("digits", data_dir)
  workdir = tmp_path / "run"
  proc = cli(f"--config={DIGITS}:teacher,tiny", f"--workdir={workdir}",
             f"--config.data.data_dir={data_dir}", "--config.num_steps=100000",
             "--config.checkpoint_every_steps=2")
  try:
    deadline = time.time() + 400
    while not (workdir / "checkpoints" / "2").exists() and time.time() < deadline:
      time.sleep(0.2)
    assert (workdir / "checkpoints" / "2").exists(), "no checkpoint within 400 s"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()  # A no-op once it has exited; never leave a 100000-step run behind.
  assert proc.returncode == 130, stderr
  assert "Traceback" not in stderr
  last = stderr.splitlines()[-1]
  assert last.startswith(f"Interrupted: the same command resumes from {workdir}/checkpoints/")
  assert os.path.isdir(last.removeprefix(
      "Interrupted: the same command resumes from ").removesuffix("."))


def test_plot_draws_one_curve_per_run_and_metric(tmp_path, teacher_dir):
  """`plot` on two runs and two metrics: two panels with two curves each, whose points are the
  runs' metrics.jsonl values; the PNG is written (checked through the CLI too)."""
  from distill_jax import plots

  other = tmp_path / "other"
  other.mkdir()
  rows = [{"step": s, "eval/top1": 0.1 * s, "train/loss": 2.0 / s} for s in (1, 2, 3)]
  (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "curves.png"
  fig = plots.plot_runs([teacher_dir, str(other)], ["eval/top1", "train/loss"], str(out))
  assert [ax.get_title() for ax in fig.axes] == ["eval/top1", "train/loss"]
  assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]
  teacher_rows = [json.loads(line) for line in open(os.path.join(teacher_dir, "metrics.jsonl"))]
  line = fig.axes[0].get_lines()[0]
  assert list(line.get_xdata()) == [r["step"] for r in teacher_rows if "eval/top1" in r]
  assert list(line.get_ydata()) == [r["eval/top1"] for r in teacher_rows if "eval/top1" in r]
  assert list(fig.axes[1].get_lines()[1].get_ydata()) == [2.0, 1.0, 2.0 / 3]
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  cli_out = tmp_path / "cli.png"
  proc = cli("plot", teacher_dir, str(other), f"--out={cli_out}", "--metric=eval/top1")
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  assert cli_out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="No run has metric 'eval/top5'; .* has eval/top1, "):
    plots.plot_runs([str(other)], ["eval/top5"], str(cli_out))


def test_nothing_refers_to_files_outside_the_project():
  """A user's clone has only the project: no tracked file may point at a folder beside it."""
  outside = re.compile("(?:\\.\\./|/work/)" + "shared/")
  files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  found = [f for f in files if os.path.isfile(os.path.join(ROOT, f))
           and outside.search(open(os.path.join(ROOT, f), errors="ignore").read())]
  assert files and not found


@pytest.mark.parametrize("command, entry", [("models", "resnet20"), ("losses", "kd (function)")])
def test_a_listing_is_its_output_alone(command, entry):
  """`distill-jax models` / `losses` print their listing and log nothing after it (where
  distill_jax came from shows with --verbosity=1)."""
  proc = cli(command)
  stdout, stderr = proc.communicate(timeout=300)
  assert (proc.returncode, stderr) == (0, ""), stderr
  assert entry in stdout
