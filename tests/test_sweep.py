"""Sweep specs and reports, without training: expansion (stable names, overrides as the CLI
parses them, stages in order, references checked), validation of every trial before launch,
and report tables checked against hand-computed means and sample stds."""

import csv
import json
import math
import os

import pytest

from distill_jax import sweep as sw
from distill_jax.sweep import cli, report, state
from distill_jax.sweep.spec import expand, load_trials, parse_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_MINI = os.path.join(ROOT, "experiments", "digits_mini", "sweep.py")
LM_MINI = os.path.join(ROOT, "experiments", "lm_mini", "sweep.py")


def test_helpers_name_and_merge():
  points = sw.product(sw.axis("optim.lr", [0.1, 0.01]), sw.seeds(2, start=3))
  assert [p.name for p in points] == ["lr0.1-s3", "lr0.1-s4", "lr0.01-s3", "lr0.01-s4"]
  assert points[3].overrides == {"optim.lr": 0.01, "seed": 4}
  assert points[3].labels == {"lr": "0.01", "seed": "4"}
  pairs = sw.zip(sw.args("teacher", ["resnet56", "resnet110"]),
                 sw.args("student", ["resnet20", "resnet32"]))
  assert [(p.name, p.arg) for p in pairs] == [("resnet56-resnet20", "resnet56,resnet20"),
                                              ("resnet110-resnet32", "resnet110,resnet32")]
  renamed = sw.args("method", {"alone": "student"})
  assert (renamed[0].name, renamed[0].arg, renamed[0].labels) == ("alone", "student",
                                                                  {"method": "alone"})
  filled = sw.with_overrides(pairs, {"teachers.teacher.checkpoint": "{ROOT}/t-{teacher}"})
  assert filled[1].overrides["teachers.teacher.checkpoint"] == "{ROOT}/t-resnet110"
  with pytest.raises(sw.SweepError, match="one length"):
    sw.zip(sw.seeds(2), sw.seeds(3))
  with pytest.raises(sw.SweepError, match="set twice"):
    sw.product(sw.seeds(1), sw.seeds(1))


def test_expand_checks_names_and_references():
  digits = os.path.join(ROOT, "configs", "digits.py")
  ok = {"t": [sw.Point("teacher", "teacher")],
        "s": sw.with_overrides(sw.seeds(2), {"teachers.teacher.checkpoint": "{ROOT}/teacher"})}
  trials = expand(sw.Sweep(ok), digits)
  assert [(t.stage, t.name, t.depends_on) for t in trials] == [
      ("t", "teacher", ()), ("s", "s0", ("teacher",)), ("s", "s1", ("teacher",))]
  assert trials[2].flags == ("--config.seed=1",
                             "--config.teachers.teacher.checkpoint={ROOT}/teacher")
  bad = {"s": ok["s"], "t": ok["t"]}  # The teacher after its students.
  with pytest.raises(sw.SweepError, match="'s0'.*refers to trial 'teacher'.*no earlier stage"):
    expand(sw.Sweep(bad), digits)
  with pytest.raises(sw.SweepError, match="Two trials are named 's0'"):
    expand(sw.Sweep({"a": sw.seeds(1), "b": sw.seeds(1)}), digits)
  with pytest.raises(sw.SweepError, match="Trial name 'a b'"):
    expand(sw.Sweep({"a": [sw.Point("a b")]}), digits)


def test_digits_mini_expands_with_overrides_applied(tmp_path):
  """The committed digits_mini spec: 1 teacher, then 17 + 2 cells x 3 seeds, every trial
  validated as the CLI would parse it; names are stable across expansions."""
  root = str(tmp_path)
  trials = load_trials(f"{DIGITS_MINI}:tiny", root)
  assert trials == load_trials(f"{DIGITS_MINI}:tiny", root, validate=False)
  assert [t.name for t in trials[:4]] == ["teacher", "kd-cnn16-32-s0", "kd-cnn16-32-s1",
                                          "kd-cnn16-32-s2"]
  assert len(trials) == 1 + 17 * 3 + 2 * 3
  assert [t.stage for t in trials] == ["teachers"] + ["students"] * 57
  assert all(t.depends_on == ("teacher",) for t in trials[1:])
  by_name = {t.name: t for t in trials}
  fsp = by_name["fsp-cnn32-64-s2"]
  config = parse_cli(fsp.config, [state.fill_root(f, root) for f in fsp.flags])
  assert fsp.config.endswith("configs/digits.py:fsp,tiny")
  assert (config.seed, config.student.name, tuple(config.student.kwargs.widths)) == (
      2, "cnn", (32, 64))
  assert config.teachers.teacher.checkpoint == os.path.join(root, "teacher")
  assert "fsp" in config.losses and config.num_steps == 6
  alone = parse_cli(by_name["alone-cnn16-32-s1"].config,
                    [state.fill_root(f, root) for f in by_name["alone-cnn16-32-s1"].flags])
  assert (list(alone.losses), tuple(alone.student.kwargs.widths), alone.seed) == (
      ["ce"], (16, 32), 1)
  assert by_name["kd-cnn16-32-s0"].labels == {"method": "kd", "student": "cnn16-32",
                                              "seed": "0"}
  # Every student trains with the crop, 'kd' and 'alone' too (digits.py's MLP roles drop it).
  augments = {t.name: parse_cli(t.config, [state.fill_root(f, root) for f in t.flags]).data.augment
              for t in trials[1:]}
  assert set(augments.values()) == {"crop"}, augments


def test_invalid_trial_is_named_before_anything_runs(tmp_path, capsys):
  spec = tmp_path / "spec.py"
  spec.write_text(
      "from distill_jax import sweep as sw\n"
      f"CONFIG = {os.path.join(ROOT, 'configs', 'digits.py')!r}\n"
      "def get_sweep(arg=None):\n"
      "  good = sw.product(sw.fixed('a', 'student,tiny'), sw.seeds(2))\n"
      "  bad = [sw.Point('typo', 'student,tiny', {'student.name': 'resnet_2O'})]\n"
      "  return sw.Sweep(config=CONFIG, stages={'main': good + bad})\n")
  root = tmp_path / "root"
  assert cli.sweep_main([f"--config={spec}", f"--workdir={root}"]) == 2
  err = capsys.readouterr().err
  assert "Trial 'typo'" in err and "resnet_2O" in err and "Known models" in err
  assert not root.exists()  # Nothing launched, nothing written.


def _fake_sweep(root, results, failed=(), pending=()):
  """A sweep's records written by hand: `results` maps (method, pair, seed) -> top-1."""
  trials = []
  for key in [*results, *failed, *pending]:
    method, pair, seed = key
    name = f"{method}-{pair}-s{seed}"
    trials.append(sw.Trial(name, "students", "x.py", {}, {"method": method, "pair": pair,
                                                        "seed": str(seed)}, (), ()))
    os.makedirs(os.path.join(root, name))
    if key in results:
      with open(os.path.join(root, name, "result.json"), "w") as f:
        json.dump({"final": {"eval/top1": results[key]}}, f)
      with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:
        for step in (10, 20):
          f.write(json.dumps({"step": step, "eval/top1": results[key] * step / 20}) + "\n")
  state.write_trials(root, "x.py", trials)
  for key in failed:
    state.write_record(root, trials[[*results, *failed, *pending].index(key)], "failed",
                       exit_code=3)


def test_report_mean_std_gap_and_missing_cells(tmp_path):
  root = str(tmp_path / "sweep")
  results = {("kd", "r56-r20", 0): 0.70, ("kd", "r56-r20", 1): 0.72, ("kd", "r56-r20", 2): 0.74,
             ("alone", "r56-r20", 0): 0.69, ("alone", "r56-r20", 1): 0.69,
             ("alone", "r56-r20", 2): 0.72, ("kd", "w40-w16", 0): 0.75}
  _fake_sweep(root, results, failed=[("kd", "w40-w16", 1)], pending=[("alone", "w40-w16", 0)])
  expected = tmp_path / "paper.csv"
  expected.write_text("method,pair,expected\nkd,r56-r20,70.66\nalone,r56-r20,69.06\n")
  out = str(tmp_path / "out")
  code = report.main([root, "--rows=method", "--cols=pair", f"--expected={expected}",
                      "--baseline=alone", "--csv", "--png", f"--out={out}"])
  assert code == 0
  with open(os.path.join(out, "report.csv")) as f:
    rows = {(r["row"], r["col"]): r for r in csv.DictReader(f)}
  kd = rows[("kd", "r56-r20")]
  # By hand: 70, 72, 74 -> mean 72, sample std sqrt((4 + 0 + 4) / 2) = 2.
  assert float(kd["mean"]) == pytest.approx(72.0) and float(kd["std"]) == pytest.approx(2.0)
  assert (kd["n"], float(kd["expected"]), float(kd["gap"])) == ("3", 70.66, pytest.approx(1.34))
  # alone: 69, 69, 72 -> mean 70, std sqrt((1 + 1 + 4) / 2) = sqrt(3); delta 2, SE
  # sqrt(4/3 + 3/3) = sqrt(7/3).
  alone = rows[("alone", "r56-r20")]
  assert float(alone["std"]) == pytest.approx(math.sqrt(3))
  assert float(kd["delta"]) == pytest.approx(2.0)
  assert float(kd["delta_se"]) == pytest.approx(2.0 / math.sqrt(7 / 3))
  one = rows[("kd", "w40-w16")]  # One finished seed of two; the other failed.
  assert (float(one["mean"]), float(one["std"]), one["n"], one["failed"]) == (
      75.0, 0.0, "1", "kd-w40-w16-s1")
  missing = rows[("alone", "w40-w16")]
  assert (missing["n"], missing["unfinished"]) == ("0", "alone-w40-w16-s0")
  text = open(os.path.join(out, "report.md")).read()
  assert "72.00 ± 2.00 (n=3); Δ +2.00 (+1.3 SE); paper 70.66, gap +1.34" in text
  assert "- kd / w40-w16: failed: kd-w40-w16-s1" in text
  assert "- alone / w40-w16: unfinished: alone-w40-w16-s0" in text
  for png in ("report.png", "curves.png"):
    assert os.path.getsize(os.path.join(out, png)) > 5000


def test_report_refuses_mixed_cells(tmp_path, capsys):
  root = str(tmp_path)
  _fake_sweep(root, {("kd", "a", 0): 0.5, ("kd", "b", 0): 0.6})
  assert report.main([root, "--rows=method"]) == 2  # 'pair' differs inside the one cell.
  assert "differ in ['pair']" in capsys.readouterr().out
  assert report.main([root, "--rows=method", "--where=pair=b"]) == 0
  assert "60.00 ± 0.00 (n=1)" in capsys.readouterr().out


CRD = os.path.join(ROOT, "experiments", "crd_cifar100", "sweep.py")


def test_lm_mini_expands_and_every_trial_validates(tmp_path):
  """The committed lm_mini spec: the teacher (4 epochs); the scripts that write its cache, its
  completions and the held-out text; 15 students x 2 seeds of 1 epoch, each waiting for what it
  reads; every trial validated; `tiny` keeps the configs' own few steps; `only=` keeps the
  students named and the outputs they read."""
  root = str(tmp_path)
  trials = load_trials(f"{LM_MINI}:2", root)
  names = [t.name for t in trials]
  assert names[:6] == ["teacher", "cache", "completions", "heldout", "ce-s0", "ce-s1"]
  assert len(trials) == 1 + 3 + 15 * 2
  deps = {t.name: set(t.depends_on) for t in trials}
  assert deps["cache"] == deps["completions"] == {"teacher"} and deps["heldout"] == set()
  assert deps["topk_cache-s1"] == {"cache", "teacher"} and deps["fkl-s0"] == {"teacher"}
  assert deps["sequence-s0"] == {"completions", "heldout", "teacher"}
  assert deps["blackbox_topk-s1"] == {"completions", "heldout"}
  parsed = {t.name: parse_cli(t.config, [state.fill_root(f, root) for f in t.flags])
            for t in trials if not t.script}
  assert (parsed["teacher"].num_epochs, parsed["teacher"].student.kwargs.num_layers) == (4, 4)
  hidden = parsed["hidden-s1"]
  assert (hidden.seed, hidden.num_epochs, hidden.eval_every_epochs) == (1, 1.0, 1.0)
  assert {"token_fkl", "token_hidden_mse"} <= set(hidden.losses)
  assert (parsed["gkd-s0"].on_policy.fraction, parsed["gkd1-s1"].on_policy.fraction) == (0.5, 1)
  assert set(parsed["gkd1-s1"].losses) == {"token_jsd"} and parsed["gkd1-s1"].seed == 1
  for name in ("gkd_warm-s0", "ce_warm-s1"):  # GKD after a CE warm start, and its control.
    warm = parsed[name]
    assert (warm.num_epochs, warm.stages.warm.num_epochs, set(warm.stages.warm.losses)) == (
        0.5, 0.5, {"token_ce"})
  assert set(parsed["ce_warm-s1"].losses) == {"token_ce"}
  assert parsed["sequence-s0"].num_steps == parsed["blackbox_topk-s1"].num_steps == 105
  assert hidden.teachers.teacher.checkpoint == os.path.join(root, "teacher")
  assert parsed["topk_cache-s0"].teachers.teacher.cache == os.path.join(root, "cache", "teacher")
  assert parsed["sequence-s1"].data.train_files == os.path.join(root, "completions",
                                                               "teacher.jsonl")
  assert parsed["blackbox_topk-s0"].data.eval_files == os.path.join(root, "heldout",
                                                                   "heldout.jsonl")
  cache = state.command(root, trials[1])
  assert cache[1].endswith(os.path.join("scripts", "cache_teacher.py"))
  assert f"--cache_dir={os.path.join(root, 'cache')}" in cache and "--top_k=16" in cache
  assert f"--config.teachers.teacher.checkpoint={os.path.join(root, 'teacher')}" in cache
  tiny = load_trials(f"{LM_MINI}:1,tiny", root)[4]
  assert parse_cli(tiny.config, [state.fill_root(f, root) for f in tiny.flags]).num_steps == 6
  some = load_trials(f"{LM_MINI}:1,only=gkd_warm-topk_cache", root)
  assert [t.name for t in some] == ["teacher", "cache", "gkd_warm-s0", "topk_cache-s0"]
  with pytest.raises(sw.SweepError, match="unknown \\['nope'\\]; known: ce, fkl"):
    load_trials(f"{LM_MINI}:1,only=nope", root)


def test_script_trials_run_in_stages_and_are_done_when_they_exit_0(tmp_path, capsys):
  """Script trials through the local launcher: a writer's output is read by a later stage's
  reader (`{ROOT}/writer` waits for it, `{TRIAL}` is each trial's own directory); exit 0 is
  done (the launcher writes result.json), a failing script is failed and has none."""
  import argparse

  from distill_jax.sweep.local import LocalLauncher

  spec_dir = tmp_path / "spec"
  spec_dir.mkdir()
  (spec_dir / "write.py").write_text(
      "import sys\nflags = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
      "if flags['text'] == 'fail': sys.exit(4)\n"
      "open(flags['out'], 'w').write(flags['text'] + open(flags.get('read', '/dev/null')).read())"
      "\n")
  trials = expand(sw.Sweep({
      "first": sw.script("writer", "write.py", {"text": "a", "out": "{TRIAL}/out.txt"})
      + sw.script("broken", "write.py", {"text": "fail", "out": "{TRIAL}/x"}),
      "second": sw.script("reader", str(spec_dir / "write.py"), {
          "text": "b", "read": "{ROOT}/writer/out.txt", "out": "{TRIAL}/out.txt"})}),
      os.path.join(ROOT, "configs", "digits.py"), spec_dir=str(spec_dir))
  assert [t.depends_on for t in trials] == [(), (), ("writer",)]
  root = str(tmp_path / "root")
  assert LocalLauncher.launch(root, trials, argparse.Namespace(workers=1, grace=1.0)) == 1
  assert LocalLauncher.states(root, trials) == {"writer": "done", "broken": "failed",
                                                "reader": "done"}
  assert open(os.path.join(root, "reader", "out.txt")).read() == "ba"
  result = json.load(open(os.path.join(root, "reader", "result.json")))
  assert result["script"] == str(spec_dir / "write.py")
  assert f"--out={os.path.join(root, 'reader', 'out.txt')}" in result["command"]
  assert state.read_record(root, "broken")["exit_code"] == 4
  assert not os.path.exists(os.path.join(root, "broken", "result.json"))
  with pytest.raises(sw.SweepError, match="no script at"):
    expand(sw.Sweep({"s": sw.script("x", "missing.py", {})}), str(spec_dir / "c.py"))


def test_crd_cifar100_suite_expands_and_every_trial_validates(tmp_path):
  from distill_jax.sweep.spec import trial_error

  full = load_trials(CRD, str(tmp_path), validate=False)
  # 6 teachers; 7 same-family pairs x 16 (alone + 15 methods) less FSP for wrn40-2 -> wrn40-1,
  # 6 cross-family pairs x 15 (no FSP); 3 seeds each.
  assert len(full) == 6 + 3 * (7 * 16 - 1 + 6 * 15) == 609
  assert len({t.name for t in full}) == len(full)
  by_name = {t.name: t for t in full}
  crd = by_name["crd_kd-resnet32x4-shufflev2-s2"]
  assert crd.config.endswith("configs/cifar_kd.py:crd_kd,resnet32x4,shufflev2")
  assert crd.overrides["teachers.teacher.checkpoint"] == "{ROOT}/teacher-resnet32x4"
  assert crd.depends_on == ("teacher-resnet32x4",)
  assert crd.labels["pair"] == "resnet32x4-shufflev2"
  assert by_name["alone-resnet56-resnet20-s0"].config.endswith(":ce,resnet20")
  assert "fsp-wrn_40_2-wrn_40_1-s0" not in by_name and "fsp-vgg13-vgg8-s0" in by_name

  trials = load_trials(f"{CRD}:seeds=1", str(tmp_path), validate=False)
  assert len(trials) == 6 + 7 * 16 - 1 + 6 * 15
  errors = {t.name: trial_error(t, str(tmp_path)) for t in trials}
  assert not any(errors.values()), {n: e for n, e in errors.items() if e}
  dkd = by_name["dkd-resnet56-resnet20-s1"]
  config = parse_cli(dkd.config, [state.fill_root(f, str(tmp_path)) for f in dkd.flags])
  assert (config.losses.dkd.beta, config.num_epochs, config.seed) == (2.0, 240, 1)
  assert config.teachers.teacher.checkpoint == str(tmp_path / "teacher-resnet56")


def test_crd_expected_results_cover_the_paper_tables():
  records = report.read_expected(os.path.join(ROOT, "experiments", "crd_cifar100",
                                              "expected.csv"))
  students = {t.labels["pair"] for t in load_trials(CRD, "/tmp", validate=False)
              if "pair" in t.labels}
  cells = {(r["method"], r["pair"]): float(r["expected"]) for r in records if r["method"]}
  assert {p for _, p in cells} == students  # Every pair of the sweep has paper numbers.
  assert len(cells) == 7 * 15 - 2 + 6 * 4 - 2
  assert cells[("crd", "resnet32x4-resnet8x4")] == 75.51
  assert cells[("alone", "resnet50-mobilenetv2")] == 64.60
  assert report.match_expected(records, ["teacher"], ("resnet50",)) == 79.34


def test_local_launcher_blocks_dependants_of_a_failed_trial(tmp_path, monkeypatch, capsys):
  """The launcher's bookkeeping with stand-in commands (no training): a failing teacher blocks
  the student that reads it, an independent trial still runs, the exit code says not all done."""
  import argparse
  import sys

  from distill_jax.sweep.local import LocalLauncher

  def fake_command(root, trial):
    ok = (f"import json; json.dump({{}}, open({os.path.join(root, trial.name, 'result.json')!r},"
          " 'w'))")
    return [sys.executable, "-c", "print('boom'); raise SystemExit(3)"
            if trial.name == "teacher" else ok]

  monkeypatch.setattr(state, "command", fake_command)
  trials = expand(sw.Sweep({
      "t": [sw.Point("teacher", "teacher"), sw.Point("other", "teacher")],
      "s": [sw.Point("student", "kd", {"teachers.teacher.checkpoint": "{ROOT}/teacher"}),
            sw.Point("free", "student")]}), os.path.join(ROOT, "configs", "digits.py"))
  root = str(tmp_path)
  args = argparse.Namespace(workers=2, grace=1.0)
  assert LocalLauncher.launch(root, trials, args) == 1
  states = LocalLauncher.states(root, trials)
  assert states == {"teacher": "failed", "other": "done", "student": "blocked", "free": "done"}
  assert state.read_record(root, "teacher")["exit_code"] == 3
  assert state.read_record(root, "student")["blocked_by"] == ["teacher"]
  out = capsys.readouterr().out
  assert "4 trials: 2 done, 1 failed, 1 blocked" in out and "boom" in out


def test_spec_that_is_its_own_config_resolves_relative_paths_once(tmp_path, monkeypatch):
  """A spec without `config` runs itself as the config file: given by a relative path, the
  trials name it by its absolute path (not the relative path joined to its folder again)."""
  from distill_jax.sweep.spec import load_spec

  folder = tmp_path / "specs"
  folder.mkdir()
  (folder / "own.py").write_text(
      "from distill_jax import sweep as sw\n\n\n"
      "def get_sweep(arg=None):\n  return sw.Sweep({'s': sw.seeds(1)})\n")
  monkeypatch.chdir(tmp_path)
  _, config = load_spec("specs/own.py:x")
  assert config == str(folder / "own.py")


def _write_config(root, trial, student, kwargs, teachers):
  """A trial's config.json with only what `report` reads: the student and the teachers."""
  config = {"student": {"name": student, "kwargs": kwargs},
            "teachers": {name: {"model": model, "kwargs": kw, "checkpoint": ckpt}
                         for name, (model, kw, ckpt) in teachers.items()}}
  with open(os.path.join(root, trial, "config.json"), "w") as f:
    json.dump(config, f)


def test_report_warns_when_rows_differ_in_student_or_teacher(tmp_path, capsys):
  """The README's old example: KD on an MLP beside CRD on a CNN. `report` names the rows and
  the models of each; a column whose rows share the student and teacher gets no warning."""
  root = str(tmp_path / "sweep")
  cnn = ("cnn", {"widths": [32, 64]}, os.path.join(root, "teacher"))
  trials = {("kd", "p", 0): ("mlp", {"hidden": [32]}, {"teacher": cnn}),
            ("crd", "p", 0): ("cnn", {"widths": [16, 32]}, {"teacher": cnn}),
            ("alone", "p", 0): ("mlp", {"hidden": [32]}, {}),
            ("kd", "q", 0): ("mlp", {"hidden": [32]}, {"teacher": cnn}),
            ("crd", "q", 0): ("mlp", {"hidden": [32]}, {"teacher": (*cnn[:2], "/elsewhere")}),
            ("kd", "r", 0): ("cnn", {"widths": [16, 32]}, {"teacher": cnn}),
            ("kd", "r", 1): ("cnn", {"widths": [16, 32]}, {"teacher": cnn}),
            ("alone", "r", 0): ("cnn", {"widths": [16, 32]}, {"teacher": cnn})}
  _fake_sweep(root, dict.fromkeys(trials, 0.9))
  for (method, pair, seed), model in trials.items():
    _write_config(root, f"{method}-{pair}-s{seed}", *model)
  assert report.main([root, "--rows=method", "--cols=pair", "--baseline=alone"]) == 0
  out = capsys.readouterr().out
  warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
  assert warnings == [
      "WARNING: column 'p' compares rows with different student models: "
      "mlp(hidden=(32,)) in kd, alone; cnn(widths=(16, 32)) in crd. "
      "Their difference is not the method's alone.",
      "WARNING: column 'q' compares rows with different teachers: "
      "teacher=cnn(widths=(32, 64)) from teacher in kd; "
      "teacher=cnn(widths=(32, 64)) from /elsewhere in crd. "
      "Their difference is not the method's alone."], out
  assert "\n".join(warnings) in open(os.path.join(root, "report.md")).read()


def test_readme_sweep_example_trains_one_student(tmp_path):
  """The README's sweep example, run as a spec: it validates, and every student trial (KD, CRD,
  the student alone) trains the same student model, so its report compares methods."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  code = next(block for block in readme.split("```python\n")[1:]
              if "def get_sweep" in block).split("```")[0]
  spec_dir = tmp_path / "spec"
  spec_dir.mkdir()
  (spec_dir / "sweep.py").write_text(  # The README's spec lives one folder below the root.
      code.replace('"../configs/digits.py"', repr(os.path.join(ROOT, "configs", "digits.py"))))
  trials = load_trials(str(spec_dir / "sweep.py"), str(tmp_path / "root"))
  configs = {t.labels["method"]: parse_cli(t.config, t.flags)
             for t in trials if t.stage == "students"}
  assert sorted(configs) == ["alone", "crd", "kd"]
  assert {(c.student.name, tuple(c.student.kwargs.widths), c.data.augment)
          for c in configs.values()} == {("cnn", (16, 32), "crop")}


def test_slurm_launcher_without_sbatch_says_so_in_one_line(tmp_path):
  """PATH stripped of every folder holding `sbatch`: one line naming it and --launcher=local,
  exit 2, nothing written."""
  import subprocess
  import sys

  path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                         if d and not os.path.exists(os.path.join(d, "sbatch")))
  env = {**os.environ, "PATH": path,
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  root = tmp_path / "root"
  proc = subprocess.run([sys.executable, "-m", "distill_jax.main", "sweep",
                         f"--config={DIGITS_MINI}", f"--workdir={root}", "--launcher=slurm"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("Error: --launcher=slurm needs Slurm's "
                                                 "`sbatch`, which was not found on PATH"), lines
  assert "--launcher=local" in lines[0]
  assert not root.exists()


def test_a_data_set_that_is_not_prepared_is_refused_once_before_launch(tmp_path, monkeypatch,
                                                                       capsys):
  """The CRD suite's CIFAR-100 with data.data_dir empty (the default folder, empty here) or a
  folder without it: one line naming the data set, the folder and prepare_data.py, however many
  trials read it; nothing written."""
  monkeypatch.setenv("DISTILL_JAX_DATA_DIR", str(tmp_path / "default"))
  root = tmp_path / "root"
  assert cli.sweep_main([f"--config={CRD}:seeds=1", f"--workdir={root}", "--dry_run"]) == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"Invalid sweep: Data set 'cifar100' is not prepared in data_dir "
                             f"'{tmp_path / 'default'}' (no ")
  assert "`python scripts/prepare_data.py cifar100 --data_dir=DIR`" in lines[0]
  assert "207 trial(s) read it (data.data_dir is empty: the default)" in lines[0]
  other = tmp_path / "other"
  other.mkdir()
  assert cli.sweep_main([f"--config={CRD}:seeds=1", f"--workdir={root}",
                         f"--set=data.data_dir={other}"]) == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and f"not prepared in data_dir '{other}'" in lines[0], lines
  assert "207 trial(s) read it, e.g. 'teacher-" in lines[0]
  assert not root.exists() and os.listdir(other) == []


def test_report_leaves_out_trials_whose_result_lacks_the_metric(tmp_path, capsys):
  """A done trial without the metric (agreement with a teacher, for a student trained from a
  file) is left out by name, not a KeyError; a metric that no trial has is one line, exit 2."""
  root = str(tmp_path / "sweep")
  _fake_sweep(root, {("kd", "p", 0): 0.7, ("kd", "p", 1): 0.8, ("file", "p", 0): 0.6})
  for name, agreement in (("kd-p-s0", 0.5), ("kd-p-s1", 0.7)):
    path = os.path.join(root, name, "result.json")
    with open(path) as f:
      result = json.load(f)
    result["final"]["eval/agreement/teacher"] = agreement
    with open(path, "w") as f:
      json.dump(result, f)
  metric = "--metric=final.eval/agreement/teacher"
  assert report.main([root, "--rows=method", "--cols=pair", metric, "--scale=1"]) == 0
  out = capsys.readouterr().out
  assert "0.60 ± 0.14 (n=2)" in out  # Sample std of 0.5 and 0.7.
  assert "Left out (done, but result.json has no final.eval/agreement/teacher): file-p-s0" in out
  assert report.main([root, "--rows=method", "--cols=pair", "--metric=final.eval/top9"]) == 2
  assert capsys.readouterr().out.splitlines() == [
      "report: no finished trial's result.json has 'final.eval/top9' (--metric: a section and "
      "a key of result.json, e.g. final.eval/top1)."]
