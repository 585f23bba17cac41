r"""Examples/s of the distillation step and of the student-only step, for a teacher/student pair.

    python scripts/benchmark.py --teacher=resnet56 --student=resnet20 --batch_size=64
    python scripts/benchmark.py --methods=all      # every method's step time relative to KD
    python scripts/benchmark.py --teacher_counts=1,2,4   # live teachers vs their output cache

Both steps are the framework's own compiled `train_step` (SGD, CE+KD vs CE alone) on random
CIFAR-shaped batches (32x32x3, 100 classes) with randomly initialised models, so no data or
checkpoint is needed. Each figure is the median over --repeats timed windows of --steps steps,
after --warmup steps (compilation excluded). `--xla_fast_cpu_convs` sets the XLA:CPU flags
measured as faster for convolutions (Eigen instead of YNNPACK; see docs/references.md).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", "resnet56", "Teacher model name.")
flags.DEFINE_string("student", "resnet20", "Student model name.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("num_classes", 100, "Classes (CIFAR-100: 100).")
flags.DEFINE_integer("image_size", 32, "Square image side.")
flags.DEFINE_integer("steps", 20, "Steps per timed window.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("repeats", 3, "Timed windows; the median is reported.")
flags.DEFINE_enum("mode", "jit", ["jit", "pmap"], "Parallel mode.")
flags.DEFINE_integer("num_devices", 0, "Devices to use (0: all).")
flags.DEFINE_integer("host_devices", 0, "Split the CPU into this many XLA devices (0: as is).")
flags.DEFINE_bool("xla_fast_cpu_convs", False, "Eigen convolutions on XLA:CPU (see NOTES.md).")
flags.DEFINE_list("methods", [], "Also time these methods of configs/cifar_kd.py ('all': every "
                  "one), each relative to KD.")
flags.DEFINE_integer("num_examples", 50000, "Training-set size (CRD's memory bank rows).")
flags.DEFINE_list("teacher_counts", [], "Also time KD from this many teachers each (e.g. "
                  "1,2,4), averaging their probabilities: live, and read from their cache.")

FAST_CPU_CONV_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
                       "--xla_cpu_use_xnnpack=false")


def _set_xla_flags() -> None:
  extra = []
  if FLAGS.host_devices:
    extra.append(f"--xla_force_host_platform_device_count={FLAGS.host_devices}")
  if FLAGS.xla_fast_cpu_convs:
    extra.append(FAST_CPU_CONV_FLAGS)
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


def load_methods() -> dict:
  """configs/cifar_kd.py's METHODS: method -> (main-stage terms, CE weight, pre-stage)."""
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "cifar_kd.py")
  spec = importlib.util.spec_from_file_location("cifar_kd", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.METHODS


def benchmark(losses: dict, num_teachers: int = 1, cached: bool = False) -> float:
  """Examples/s of the compiled train step with these loss terms (median over repeats).

  Teachers (`num_teachers` copies of --teacher, each its own weights) are used when any term
  needs one; terms with parameters are initialised as in a run. `cached`: the teachers'
  logits come with the batch, as from `scripts/cache_teacher.py` (no teacher forward).
  """
  import functools

  import jax
  import numpy as np
  import optax

  from distill_jax import models
  from distill_jax.data import teacher_cache
  from distill_jax.objective import build_objective
  from distill_jax.teachers import Teacher
  from distill_jax.train.loop import build_applies, compile_steps, example_batch, init_objective
  from distill_jax.train.parallel import Parallel
  from distill_jax.train.state import create_train_state

  parallel = Parallel(FLAGS.mode, FLAGS.num_devices)
  parallel.check_batch_size(FLAGS.batch_size)
  shape = (FLAGS.image_size, FLAGS.image_size, 3)
  dummy = np.zeros((1, *shape), np.float32)
  init = lambda module, seed: jax.jit(lambda r: module.init(r, dummy, train=False))(
      jax.random.PRNGKey(seed))
  student = models.build_model(FLAGS.student, FLAGS.num_classes,
                               bn_axis_name=parallel.bn_axis_name)
  teacher = models.build_model(FLAGS.teacher, FLAGS.num_classes)
  teachers = {f"teacher{i}": Teacher(f"teacher{i}", FLAGS.teacher, teacher, init(teacher, 1 + i))
              for i in range(num_teachers)}
  objective = build_objective(losses, list(teachers), {"num_examples": FLAGS.num_examples})
  if not objective.needs_teachers:
    teachers = {}
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  cached_names = tuple(teachers) if cached else ()
  student_apply, teacher_applies = build_applies(student, FLAGS.student, teachers, objective,
                                                 shape, cached=cached_names)
  train_step, _ = compile_steps(parallel, student_apply, teacher_applies, objective, tx)
  teacher_vars = {n: {} if cached else t.variables for n, t in teachers.items()}
  logit_keys = {teacher_cache.batch_key(n): FLAGS.num_classes for n in cached_names}
  variables = init(student, 0)
  objective_params, objective_state = jax.jit(functools.partial(
      init_objective, objective, student_apply, teacher_applies))(
          variables, teacher_vars, example_batch(shape, FLAGS.batch_size, logit_keys),
          jax.random.PRNGKey(3))
  state = parallel.put_replicated(create_train_state(
      variables, objective_params, objective_state, tx, jax.random.PRNGKey(2)))
  teacher_vars = parallel.put_replicated(teacher_vars)
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({
      "image": rng.normal(size=(FLAGS.batch_size, *shape)).astype(np.float32),
      "label": rng.integers(0, FLAGS.num_classes, FLAGS.batch_size).astype(np.int32),
      "id": rng.permutation(FLAGS.num_examples)[:FLAGS.batch_size].astype(np.int32),
      **{key: rng.normal(size=(FLAGS.batch_size, k)).astype(np.float32)
         for key, k in logit_keys.items()}})
  for _ in range(1 + FLAGS.warmup):
    state, metrics = train_step(state, teacher_vars, batch)
  jax.block_until_ready(state)
  rates = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = train_step(state, teacher_vars, batch)
    jax.block_until_ready((state, metrics))
    rates.append(FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start))
  return float(np.median(rates))


def cache_read_ms(num_teachers: int) -> float:
  """Host milliseconds to read one batch's logits of `num_teachers` teachers from in-memory
  caches of --num_examples x --num_classes float32 logits (the cached step's data-side cost)."""
  import tempfile

  import numpy as np
  from array_record.python import array_record_module

  from distill_jax.data import teacher_cache

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "train.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    records = teacher_cache.encode(rng.normal(size=(FLAGS.num_examples, FLAGS.num_classes)), 0)
    for record in records:
      writer.write(record.tobytes())
    writer.close()
    reader = teacher_cache.CacheReader(path, FLAGS.num_examples, 1, FLAGS.num_classes,
                                       records.dtype)
    reader(0, np.arange(1))  # Loads the table.
    batches = [rng.integers(0, FLAGS.num_examples, FLAGS.batch_size) for _ in range(200)]
    start = time.perf_counter()
    for ids in batches:
      for _ in range(num_teachers):
        reader(0, ids)
    return 1000 * (time.perf_counter() - start) / len(batches)


def main(argv: list[str]) -> None:
  del argv
  import jax

  from distill_jax.train.logging import quiet_library_logs

  quiet_library_logs()  # No "Unable to initialize backend 'tpu'" and such on CPUs.

  devices = jax.devices()[:FLAGS.num_devices or None]
  xla_flags = os.environ.get("XLA_FLAGS", "")
  print(f"device: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
        f"mode {FLAGS.mode}, batch {FLAGS.batch_size}, XLA_FLAGS={xla_flags!r}", flush=True)
  student_only = benchmark({"ce": {"weight": 1.0}})
  kd_terms, kd_ce, _ = load_methods()["kd"]
  distill = benchmark({"ce": {"weight": kd_ce}, **kd_terms})
  print("| step | examples/s |\n|---|---|")
  print(f"| student only ({FLAGS.student}) | {student_only:.1f} |")
  print(f"| KD ({FLAGS.teacher} -> {FLAGS.student}) | {distill:.1f} |")
  print(f"KD step costs {student_only / distill:.2f}x the student-only step.", flush=True)
  if FLAGS.teacher_counts:
    print("\n| teachers | live: examples/s | live: step / one teacher's | cached: examples/s "
          "| cached: host read ms/batch |\n|---|---|---|---|---|")
    for count in map(int, FLAGS.teacher_counts):
      terms = {"ce": {"weight": kd_ce}, **kd_terms}
      live = benchmark(terms, num_teachers=count)
      cached = benchmark(terms, num_teachers=count, cached=True)
      print(f"| {count} | {live:.1f} | {distill / live:.2f} | {cached:.1f} | "
            f"{cache_read_ms(count):.2f} |", flush=True)
  if not FLAGS.methods:
    return
  methods = load_methods()
  names = list(methods) if FLAGS.methods == ["all"] else FLAGS.methods
  print("\n| method (main stage) | examples/s | step time / KD's |\n|---|---|---|")
  for name in names:
    terms, ce_weight, _ = methods[name]
    rate = benchmark({"ce": {"weight": ce_weight}, **terms})
    print(f"| {name} | {rate:.1f} | {distill / rate:.2f} |", flush=True)


if __name__ == "__main__":
  flags.FLAGS(sys.argv, known_only=True)
  _set_xla_flags()
  app.run(main)
