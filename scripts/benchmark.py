r"""Examples/s of the distillation step and of the student-only step, for a teacher/student pair.

    python scripts/benchmark.py --teacher=resnet56 --student=resnet20 --batch_size=64
    python scripts/benchmark.py --methods=all      # every method's step time relative to KD
    python scripts/benchmark.py --teacher_counts=1,2,4   # live teachers vs their output cache
    python scripts/benchmark.py --scaling --json   # devices, jit/pmap, bf16, remat, meshes
    python scripts/benchmark.py --against=torch    # the same KD step in PyTorch, as a ratio
    python scripts/benchmark.py --task=lm --lm_fused_only --chunk_size=128  # whole vs fused
                                                   # logits: compiled memory at V 128256
    python scripts/benchmark.py --task=serve --serve_clients=32  # `distill-jax serve`:
                                                   # batched vs one request at a time
    python scripts/benchmark.py --task=lm --against=torch  # the LM KD step vs transformers
    python scripts/benchmark.py --task=lm --lm_tensor_only --host_devices=8  # tensor = 1/2/4

Both steps are the framework's own compiled `train_step` (SGD, CE+KD vs CE alone) on random
CIFAR-shaped batches (32x32x3, 100 classes) with randomly initialised models, so no data or
checkpoint is needed. Each figure is the median over --repeats timed windows of --steps steps,
after --warmup steps (compilation excluded). The XLA:CPU convolution flags of
`distill_jax/common/xla_flags.py` apply by default (`DISTILL_JAX_CPU_FLAGS=0` to compare without;
see docs/references.md for what they do).

`--scaling` runs one row per layout, each in its own process (forced CPU devices are fixed when
JAX starts): devices 1/2/4/8, jit vs pmap, float32 vs bfloat16, remat, data x fsdp meshes with
the teacher sharded. A row reports the KD step's examples/s, its compile time, XLA's compiled
memory analysis per device (argument and temp bytes) and the teacher's bytes per device.
`--against=torch` (needs the optional `bench` extra: `pip install -e .[bench]`) times the same
ResNet-56 -> ResNet-20 KD step (CE 0.1 + KD 0.9, T 4, SGD momentum, channels_last) in PyTorch,
written below, plus its student step and teacher forward, in the same run as JAX's.

`--task=serve` puts a randomly initialised transformer_lm (`--serve_model`: layers, width,
heads, context) behind `distill-jax serve` in-process, on 127.0.0.1, once per `--serve_batches`
value (1: one request at a time), and drives it with `--serve_clients` concurrent HTTP clients
sending `--serve_requests` greedy completions in all (prompts of 8 to 24 bytes,
`--serve_tokens` new tokens each): requests/s, generated tokens/s, and the process's RSS before
and after the load. Compilation is excluded (`Engine.warm_up` first).

`--task=lm --against=torch` (the `bench` extra: torch and transformers) times the token-KD
step of `--task=lm` (CE 0.5 + forward KL 0.5 at --lm_temperature, a live teacher, AdamW,
--batch_size x --seq_len random tokens, configs/lm.py's student and teacher) here, with whole
logits and with `fused_logits=--chunk_size`, and in PyTorch with transformers'
`LlamaForCausalLM` of the same width, heads, KV heads, layers, MLP and vocabulary (tied
embeddings; the parameter counts are checked equal), eager, at each --lm_torch_vocabs, and
prints tokens/s of both and the ratio (pass --batch_size=32: the default is the image
path's 64). The three steps' timed windows alternate, so a load that changes during the run
falls on all of them alike. PyTorch runs with `torch.set_num_threads` at this process's
cores (--torch_threads), as XLA:CPU uses them; the image comparison too.

`--task=lm --lm_tensor_only` (with `--host_devices=8`) prints the tensor-parallel memory rows
(`tensor_memory_rows`, compile only): the token-KD step at a Llama-3-1B-like shape (width
2048, 32 heads / 8 KV heads, MLP 8192, 2 layers, vocabulary 128,256, 2048 tokens, whole
logits), mesh data x tensor over the 8 devices, one row per data shard: per device, the
teacher's and the student's parameter bytes and the step's temporaries. Measured on this
CPU (8 forced devices, 2026-12-08):

    | mesh | teacher params (MiB/device) | student params | step temporaries |
    |---|---|---|---|
    | data=8, tensor=1 | 1466 | 1466 | 8292 |
    | data=4, tensor=2 | 733 (0.50x) | 733 | 5251 (0.63x) |
    | data=2, tensor=4 | 367 (0.25x) | 367 | 2786 (0.34x) |

`--task=lm` times configs/lm.py's language models and ends with the attention memory rows
(`attention_memory_rows`; alone with `--attention_memory_only`): the token-KD step's compiled
temporary bytes with the attention's probabilities written out vs `dot_product_attention`, at
`--attn_shape` and `--attn_seq_lens`, lowered from shapes only.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

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
flags.DEFINE_bool("xla_fast_cpu_convs", False,
                  "Eigen convolutions on XLA:CPU (see docs/references.md).")
flags.DEFINE_list("methods", [], "Also time these methods of configs/cifar_kd.py ('all': every "
                  "one), each relative to KD.")
flags.DEFINE_integer("num_examples", 50000, "Training-set size (CRD's memory bank rows).")
flags.DEFINE_list("teacher_counts", [], "Also time KD from this many teachers each (e.g. "
                  "1,2,4), averaging their probabilities: live, and read from their cache.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both models.")
flags.DEFINE_bool("remat", False, "nn.remat the student's blocks.")
flags.DEFINE_string("mesh", "", "jit mesh, e.g. 'data=2,fsdp=4' or 'data=2,tensor=4' "
                    "(default: all on data).")
flags.DEFINE_enum("teacher_sharding", "replicated", ["replicated", "fsdp"], "Teacher layout.")
flags.DEFINE_bool("scaling", False, "Print the scaling table (one subprocess per row).")
flags.DEFINE_bool("row", False, "Internal: time one layout and print it as JSON.")
flags.DEFINE_bool("json", False, "Print tables as JSON lines too.")
flags.DEFINE_enum("against", "", ["", "torch"], "Also time the KD step in this framework.")
flags.DEFINE_enum("task", "classification", ["classification", "lm", "serve"],
                  "lm: configs/lm.py's teacher and student on token rows (tokens/s, and the "
                  "memory of the chunked vs unchunked token loss at --lm_big_vocab); serve: "
                  "`distill-jax serve` under concurrent clients.")
flags.DEFINE_integer("serve_clients", 32, "serve: concurrent clients.")
flags.DEFINE_integer("serve_requests", 256, "serve: requests in all, per --serve_batches value.")
flags.DEFINE_integer("serve_tokens", 32, "serve: new tokens per request (max_tokens).")
flags.DEFINE_list("serve_batches", ["1", "8"], "serve: the server's --max_batch values.")
flags.DEFINE_string("serve_model", "2,128,4,128", "serve: layers,width,heads,context.")
flags.DEFINE_float("serve_window_ms", 0.0, "serve: the server's --window_ms.")
flags.DEFINE_integer("seq_len", 128, "lm: tokens per row.")
flags.DEFINE_integer("vocab", 259, "lm: vocabulary of the timed steps (259: byte-level).")
flags.DEFINE_integer("lm_big_vocab", 32000, "lm: vocabulary of the memory comparison.")
flags.DEFINE_integer("chunk_size", 32, "lm: token-loss chunk (positions at a time).")
flags.DEFINE_string("attn_shape", "2048,32,8,8192", "lm: the attention memory rows' model: "
                    "width,heads,kv_heads,mlp_dim (2 layers, student and teacher alike).")
flags.DEFINE_list("attn_seq_lens", ["2048"], "lm: the attention memory rows' lengths (batch 1).")
flags.DEFINE_bool("attention_memory_only", False, "lm: print only the attention memory rows.")
flags.DEFINE_integer("lm_fused_vocab", 128256, "lm: vocabulary of the whole vs fused logits "
                     "memory rows (Llama 3's).")
flags.DEFINE_bool("lm_fused_only", False, "lm: print only the whole vs fused logits memory "
                  "rows (no timing).")
flags.DEFINE_integer("lm_fused_len", 2048, "lm: tokens per row of the fused logits rows.")
flags.DEFINE_integer("lm_attention_block", 512, "lm: queries per block of the fused logits "
                     "rows' chunked attention (attention_block_size).")
flags.DEFINE_list("lm_torch_vocabs", ["259", "8192"], "lm --against=torch: the vocabularies of "
                  "the comparison (batch --batch_size x --seq_len, configs/lm.py's models).")
flags.DEFINE_float("lm_temperature", 1.0, "lm --against=torch: the forward KL's temperature T.")
flags.DEFINE_integer("torch_threads", 0, "--against=torch: PyTorch's intra-op threads "
                     "(torch.set_num_threads; 0: this process's cores, as XLA:CPU uses).")
flags.DEFINE_bool("lm_tensor_only", False, "lm: print only the tensor-parallel memory rows "
                  "(compile only; needs --host_devices=8).")
flags.DEFINE_list("lm_tensor_sizes", ["1", "2", "4"], "lm: the tensor axis sizes of the "
                  "tensor-parallel memory rows (mesh data x tensor over all the devices).")
flags.DEFINE_integer("lm_fused_width", 2048, "lm: width of the fused logits rows' models "
                     "(32 heads, 8 KV heads, MLP 4x, 2 layers: a Llama-3-1B-like layer).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_MISSING = ("--against=torch needs PyTorch: pip install -e .[bench] (CPU wheel: "
                 "pip install torch --index-url https://download.pytorch.org/whl/cpu).")


def _set_xla_flags() -> None:
  from distill_jax.common.xla_flags import CPU_CONV_FLAGS, apply_cpu_defaults, set_cpu_devices

  apply_cpu_defaults()
  if FLAGS.xla_fast_cpu_convs and CPU_CONV_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), CPU_CONV_FLAGS]).strip()
  set_cpu_devices(FLAGS.host_devices)


def _mesh() -> dict[str, int] | None:
  if not FLAGS.mesh:
    return None
  return {k: int(v) for k, v in (item.split("=") for item in FLAGS.mesh.split(","))}


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
  """Examples/s of the compiled train step with these loss terms (median over repeats)."""
  return measure(losses, num_teachers, cached)["examples_per_s"]


def measure(losses: dict, num_teachers: int = 1, cached: bool = False) -> dict[str, float]:
  """The compiled train step with these loss terms: examples/s (median over repeats), compile
  seconds, XLA's memory analysis per device, and the teachers' bytes per device.

  Teachers (`num_teachers` copies of --teacher, each its own weights) are used when any term
  needs one; terms with parameters are initialised as in a run. `cached`: the teachers'
  logits come with the batch, as from `scripts/cache_teacher.py` (no teacher forward).
  """
  import functools

  import jax
  import numpy as np
  import optax

  from distill_jax import models, tasks
  from distill_jax.data import teacher_cache
  from distill_jax.losses.objective import build_objective
  from distill_jax.teachers import Teacher
  from distill_jax.train.compiled import build_applies, compile_steps, init_objective
  from distill_jax.train.parallel import Parallel
  from distill_jax.train.state import create_train_state

  parallel = Parallel(FLAGS.mode, FLAGS.num_devices, mesh=_mesh(),
                      teacher_sharding=FLAGS.teacher_sharding)
  parallel.check_batch_size(FLAGS.batch_size)
  shape = (FLAGS.image_size, FLAGS.image_size, 3)
  dummy = np.zeros((1, *shape), np.float32)
  init = lambda module, seed: jax.jit(lambda r: module.init(r, dummy, train=False))(
      jax.random.PRNGKey(seed))
  student = models.build_model(FLAGS.student, FLAGS.num_classes,
                               bn_axis_name=parallel.bn_axis_name,
                               **({"remat": True} if FLAGS.remat else {}))
  teacher = models.build_model(FLAGS.teacher, FLAGS.num_classes)
  teachers = {f"teacher{i}": Teacher(f"teacher{i}", FLAGS.teacher, teacher, init(teacher, 1 + i),
                                     dtype=FLAGS.dtype)
              for i in range(num_teachers)}
  objective = build_objective(losses, list(teachers), {"num_examples": FLAGS.num_examples})
  if not objective.needs_teachers:
    teachers = {}
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  cached_names = tuple(teachers) if cached else ()
  parallel.declare_models(student, {n: t.module for n, t in teachers.items() if not cached})
  task = tasks.get_task("classification")
  student_apply, teacher_applies = build_applies(student, FLAGS.student, teachers, objective,
                                                 shape, task.input_key, cached=cached_names,
                                                 student_dtype=FLAGS.dtype)
  train_step, _ = compile_steps(parallel, student_apply, teacher_applies, objective, tx,
                                task=task)
  teacher_vars = {n: {} if cached else t.variables for n, t in teachers.items()}
  logit_keys = {teacher_cache.batch_key(n): (FLAGS.num_classes,) for n in cached_names}
  variables = init(student, 0)
  objective_params, objective_state = jax.jit(functools.partial(
      init_objective, objective, student_apply, teacher_applies))(
          variables, teacher_vars, task.example_batch(shape, FLAGS.batch_size, logit_keys),
          jax.random.PRNGKey(3))
  state = parallel.put_state(create_train_state(
      variables, objective_params, objective_state, tx, jax.random.PRNGKey(2)))
  teacher_vars = parallel.put_teachers(teacher_vars)
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({
      "image": rng.normal(size=(FLAGS.batch_size, *shape)).astype(np.float32),
      "label": rng.integers(0, FLAGS.num_classes, FLAGS.batch_size).astype(np.int32),
      "id": rng.permutation(FLAGS.num_examples)[:FLAGS.batch_size].astype(np.int32),
      **{key: rng.normal(size=(FLAGS.batch_size, *k)).astype(np.float32)
         for key, k in logit_keys.items()}})
  device = parallel.devices[0]
  teacher_bytes = sum(s.data.nbytes for x in jax.tree.leaves(teacher_vars)
                      for s in x.addressable_shards if s.device == device)
  timed = compile_and_time(train_step, state, teacher_vars, batch, FLAGS.batch_size)
  return {"examples_per_s": timed["per_s"], "compile_s": timed["compile_s"],
          "argument_bytes": timed["argument_bytes"], "temp_bytes": timed["temp_bytes"],
          "teacher_bytes": int(teacher_bytes)}


def compile_and_time(train_step, state, teacher_vars, batch, items_per_step: int,
                     time_it: bool = True) -> dict[str, float]:
  """Compiles `train_step` for these arguments and times it: the one loop of every step figure.

  Returns `compile_s` (lowering and compiling), XLA's memory analysis of the compiled step per
  device (`argument_bytes`, `temp_bytes`; -1 where the backend gives none) and, with `time_it`,
  `per_s`: `items_per_step` (examples, or tokens) per second, the median over --repeats windows
  of --steps steps, after --warmup untimed steps. The state is carried from step to step as
  in training (its buffers are donated).
  """
  import jax
  import numpy as np

  start = time.perf_counter()
  compiled = train_step.lower(state, teacher_vars, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  result = {"compile_s": compile_s,
            "argument_bytes": int(getattr(memory, "argument_size_in_bytes", -1)),
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1))}
  if not time_it:
    return result
  for _ in range(FLAGS.warmup):
    state, metrics = compiled(state, teacher_vars, batch)
  jax.block_until_ready(state)
  rates = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = compiled(state, teacher_vars, batch)
    jax.block_until_ready((state, metrics))
    rates.append(FLAGS.steps * items_per_step / (time.perf_counter() - start))
  return {**result, "per_s": float(np.median(rates))}


def teacher_forward_rate() -> float:
  """Examples/s of --teacher's eval forward alone (jit, one device's share of the batch)."""
  import jax
  import numpy as np

  from distill_jax import models
  from distill_jax.models.forward import make_apply

  shape = (FLAGS.image_size, FLAGS.image_size, 3)
  teacher = models.build_model(FLAGS.teacher, FLAGS.num_classes)
  variables = jax.jit(lambda r: teacher.init(r, np.zeros((1, *shape), np.float32)))(
      jax.random.PRNGKey(1))
  forward = make_apply(teacher, input_key="image", dtype=FLAGS.dtype)
  apply = jax.jit(lambda v, x: forward(v, {"image": x}, False).logits)
  x = np.random.default_rng(0).normal(size=(FLAGS.batch_size, *shape)).astype(np.float32)
  for _ in range(1 + FLAGS.warmup):
    jax.block_until_ready(apply(variables, x))
  rates = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      out = apply(variables, x)
    jax.block_until_ready(out)
    rates.append(FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start))
  return float(np.median(rates))


# -- PyTorch: the same models and KD step, for a ratio measured in the same run --------------

def torch_resnet(depth: int, num_classes: int):
  """The CIFAR ResNet of distill_jax/models/resnet_cifar.py in PyTorch (CRD code's layout)."""
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
  for width, stride in zip((16, 32, 64), (1, 2, 2), strict=True):
    for block in range((depth - 2) // 6):
      layers.append(Block(cin, width, stride if block == 0 else 1))
      cin = width
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
  return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def torch_rates() -> dict[str, float]:
  """PyTorch examples/s: KD step (CE 0.1 + KD 0.9, T 4), student-only step, teacher forward."""
  import torch
  import torch.nn.functional as F

  torch_threads()
  depth = lambda name: int(name.removeprefix("resnet"))
  student = torch_resnet(depth(FLAGS.student), FLAGS.num_classes).train()
  teacher = torch_resnet(depth(FLAGS.teacher), FLAGS.num_classes).eval()
  opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(FLAGS.batch_size, 3, FLAGS.image_size, FLAGS.image_size).to(
      memory_format=torch.channels_last)
  y = torch.randint(0, FLAGS.num_classes, (FLAGS.batch_size,))
  t = 4.0

  def kd_step():
    with torch.no_grad():
      t_logits = teacher(x)
    logits = student(x)
    kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(t_logits / t, -1),
                  reduction="batchmean", log_target=True) * t * t
    loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * kd
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def student_step():
    loss = F.cross_entropy(student(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def forward():
    with torch.no_grad():
      teacher(x)

  rate = lambda fn: eager_rate(fn, FLAGS.batch_size)
  return {"kd": rate(kd_step), "student": rate(student_step), "teacher_forward": rate(forward)}


def eager_rate(fn, items_per_call: int) -> float:
  """Items per second of `fn()` (a step that returns when done), the median over --repeats
  windows of --steps calls after 1 + --warmup untimed ones."""
  import numpy as np

  for _ in range(1 + FLAGS.warmup):
    fn()
  return float(np.median([window_rate(fn, items_per_call) for _ in range(FLAGS.repeats)]))


def window_rate(fn, items_per_call: int) -> float:
  """Items per second of one window of --steps calls of `fn()`."""
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    fn()
  return FLAGS.steps * items_per_call / (time.perf_counter() - start)


def torch_threads() -> int:
  """Sets PyTorch's intra-op threads to --torch_threads, or to this process's cores (what
  XLA:CPU uses; PyTorch's own default is the physical cores), and returns the count."""
  import torch

  threads = FLAGS.torch_threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  return threads


def torch_llama(settings: dict, vocab: int):
  """transformers' `LlamaForCausalLM` with configs/lm.py's `settings` (width, heads, KV heads,
  layers, MLP; tied embeddings, RMSNorm eps 1e-6, RoPE base 10000: transformer_lm's defaults)
  over `vocab` tokens, randomly initialised."""
  from transformers import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(
      vocab_size=vocab, hidden_size=settings["width"], intermediate_size=settings["mlp_dim"],
      num_hidden_layers=settings["num_layers"], num_attention_heads=settings["num_heads"],
      num_key_value_heads=settings["num_kv_heads"], hidden_act="silu", rms_norm_eps=1e-6,
      max_position_embeddings=max(FLAGS.seq_len, settings["context"]),
      tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
  return LlamaForCausalLM(config)


def torch_lm_step(vocab: int) -> tuple[Any, dict[str, int]]:
  """PyTorch's token-KD step of `--task=lm` (CE 0.5 + forward KL 0.5 at
  --lm_temperature, every position kept, the teacher's forward under no_grad, AdamW lr 1e-3
  with optax's defaults: weight decay 1e-4, eps 1e-8) for configs/lm.py's student and teacher
  as `torch_llama`s, on --batch_size random rows of --seq_len tokens, as a function of no
  arguments; and both models' parameter counts (to check the twin's sizes against ours)."""
  import torch
  import torch.nn.functional as F

  lm = _lm_config_module()
  torch.manual_seed(0)
  student = torch_llama(lm.STUDENT, vocab).train()
  teacher = torch_llama(lm.TEACHER, vocab).eval()
  opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=1e-4, eps=1e-8)
  tokens = torch.randint(0, vocab, (FLAGS.batch_size, FLAGS.seq_len + 1))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  t = FLAGS.lm_temperature

  def kd_step():
    with torch.no_grad():
      t_logits = teacher(input_ids=inputs).logits
    logits = student(input_ids=inputs).logits
    ce = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    log_p = F.log_softmax(t_logits / t, -1)
    fkl = (log_p.exp() * (log_p - F.log_softmax(logits / t, -1))).sum(-1).mean() * t * t
    loss = 0.5 * ce + 0.5 * fkl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  count = lambda model: sum(p.numel() for p in model.parameters())
  return kd_step, {"student": count(student), "teacher": count(teacher)}


def lm_param_counts(vocab: int) -> dict[str, int]:
  """Parameters of configs/lm.py's student and teacher as transformer_lm (shapes only)."""
  import jax
  import numpy as np

  from distill_jax import models
  from distill_jax.teachers import init_shapes

  lm = _lm_config_module()
  count = {}
  for name, settings in (("student", lm.STUDENT), ("teacher", lm.TEACHER)):
    module = models.build_model("transformer_lm", vocab, **{
        **settings, "context": max(FLAGS.seq_len, settings["context"])})
    count[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        init_shapes(module, (FLAGS.seq_len,))))
  return count


def lm_against_torch() -> list[dict]:
  """The token-KD step of `--task=lm` here and in PyTorch/transformers (`torch_lm_step`), in
  this run, at each --lm_torch_vocabs: tokens/s of ours with whole logits and with
  `config.fused_logits=--chunk_size`, PyTorch's, and the ratios, printed as a table. The
  three steps' windows alternate (PyTorch, whole, fused; --repeats times), so a load that
  changes during the run (a shared machine) falls on all three alike; each ratio is the
  median of the windows' ratios."""
  import jax
  import numpy as np
  import torch

  threads = torch_threads()
  chunk = FLAGS.chunk_size
  kd = token_kd_terms(chunk, FLAGS.lm_temperature)
  tokens = FLAGS.batch_size * FLAGS.seq_len
  print(f"token KD step (CE 0.5 + forward KL 0.5 at T {FLAGS.lm_temperature:g}, live teacher, "
        f"AdamW), batch {FLAGS.batch_size} x {FLAGS.seq_len} tokens, configs/lm.py's models; "
        f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), "
        f"torch {torch.__version__} eager with {threads} threads (torch.set_num_threads); "
        f"medians of {FLAGS.repeats} alternating windows of {FLAGS.steps} steps\n"
        "| vocabulary | parameters (student / teacher) | ours | ours tokens/s | PyTorch "
        "tokens/s | ours / PyTorch |\n|---|---|---|---|---|---|", flush=True)
  rows = []
  for vocab in map(int, FLAGS.lm_torch_vocabs):
    torch_step, theirs = torch_lm_step(vocab)
    ours = lm_param_counts(vocab)
    if ours != theirs:
      raise SystemExit(f"The PyTorch twin's sizes differ from ours at vocabulary {vocab}: "
                       f"{theirs} vs {ours}.")
    steps = {"torch": torch_step}
    for label, fused in (("whole logits", 0), (f"fused_logits={chunk}", chunk)):
      steps[label] = compiled_lm_step(measure_lm(kd, vocab, fused=fused, step_only=True))
    for step in steps.values():
      for _ in range(1 + FLAGS.warmup):
        step()
    rates = {name: [] for name in steps}
    for _ in range(FLAGS.repeats):
      for name, step in steps.items():
        rates[name].append(window_rate(step, tokens))
    for label in list(steps)[1:]:
      ratio = float(np.median(np.divide(rates[label], rates["torch"])))
      rows.append({"vocab": vocab, "logits": label,
                   "tokens_per_s": float(np.median(rates[label])),
                   "torch_tokens_per_s": float(np.median(rates["torch"])), "ratio": ratio})
      print(f"| {vocab} | {ours['student']:,} / {ours['teacher']:,} | {label} | "
            f"{rows[-1]['tokens_per_s']:.0f} | {rows[-1]['torch_tokens_per_s']:.0f} | "
            f"{ratio:.2f} |", flush=True)
  return rows


def token_kd_terms(chunk: int, temperature: float = 1.0) -> dict:
  """The LM rows' loss terms: CE 0.5 + forward KL 0.5 at `temperature`, both chunked by
  `chunk` positions."""
  return {"token_ce": {"weight": 0.5, "chunk_size": chunk},
          "token_fkl": {"weight": 0.5, "chunk_size": chunk, "temperature": temperature}}


def compiled_lm_step(built: dict):
  """`measure_lm(..., step_only=True)`'s step compiled, as a function of no arguments that
  runs one step (carrying the state, its buffers donated) and returns when it is done."""
  import jax

  state, teacher_vars, batch = built["args"]
  compiled = built["step"].lower(state, teacher_vars, batch).compile()
  carried = [state]

  def step():
    carried[0], metrics = compiled(carried[0], teacher_vars, batch)
    jax.block_until_ready((carried[0], metrics))
  return step


# -- the scaling table: one subprocess per row -----------------------------------------------

SCALING_ROWS = [  # (devices, mode, dtype, remat, mesh, teacher sharding)
    (1, "jit", "float32", False, "", "replicated"),
    (2, "jit", "float32", False, "", "replicated"),
    (4, "jit", "float32", False, "", "replicated"),
    (8, "jit", "float32", False, "", "replicated"),
    (2, "pmap", "float32", False, "", "replicated"),
    (8, "pmap", "float32", False, "", "replicated"),
    (1, "jit", "bfloat16", False, "", "replicated"),
    (1, "jit", "float32", True, "", "replicated"),
    (8, "jit", "float32", False, "data=4,fsdp=2", "fsdp"),
    (8, "jit", "float32", False, "data=2,fsdp=4", "fsdp"),
]


def scaling_table() -> list[dict]:
  import json
  import subprocess

  rows = []
  print("| devices | mode | dtype | remat | mesh | teacher | ex/s | compile s | arg MB/dev | "
        "temp MB/dev | teacher MB/dev |\n|---|---|---|---|---|---|---|---|---|---|---|",
        flush=True)
  for devices, mode, dtype, remat, mesh, sharding in SCALING_ROWS:
    cmd = [sys.executable, os.path.abspath(__file__), "--row", f"--host_devices={devices}",
           f"--num_devices={devices}", f"--mode={mode}", f"--dtype={dtype}",
           f"--remat={remat}", f"--mesh={mesh}", f"--teacher_sharding={sharding}",
           *[f"--{k}={getattr(FLAGS, k)}" for k in ("teacher", "student", "batch_size", "steps",
                                                     "warmup", "repeats", "num_classes")]]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, check=False)
    if proc.returncode:
      print(f"row {cmd[3:]} failed:\n{proc.stderr[-2000:]}", flush=True)
      continue
    row = {"devices": devices, "mode": mode, "dtype": dtype, "remat": remat,
           "mesh": mesh or f"data={devices}", "teacher_sharding": sharding,
           **json.loads(proc.stdout.strip().splitlines()[-1])}
    rows.append(row)
    mb = lambda b: f"{b / 2**20:.2f}"
    print(f"| {devices} | {mode} | {dtype} | {remat} | {row['mesh']} | {sharding} | "
          f"{row['examples_per_s']:.1f} | {row['compile_s']:.1f} | {mb(row['argument_bytes'])} | "
          f"{mb(row['temp_bytes'])} | {mb(row['teacher_bytes'])} |", flush=True)
  return rows


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
    reader = teacher_cache.CacheReader(path, FLAGS.num_examples, 1, (FLAGS.num_classes,),
                                       records.dtype)
    reader(0, np.arange(1))  # Loads the table.
    batches = [rng.integers(0, FLAGS.num_examples, FLAGS.batch_size) for _ in range(200)]
    start = time.perf_counter()
    for ids in batches:
      for _ in range(num_teachers):
        reader(0, ids)
    return 1000 * (time.perf_counter() - start) / len(batches)


def _lm_config_module():
  """configs/lm.py as a module (its model sizes)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("lm", os.path.join(ROOT, "configs", "lm.py"))
  lm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lm)
  return lm


def measure_lm(losses: dict, vocab: int, time_it: bool = True, on_policy: dict | None = None,
               fused: int = 0, step_only: bool = False) -> dict[str, Any]:
  """configs/lm.py's student (and, when a term needs one, its teacher; random weights) on
  `--batch_size` rows of `--seq_len` tokens over a vocabulary of `vocab`: tokens/s of the
  compiled train step (median over repeats; skipped without `time_it`), compile seconds and
  XLA's memory analysis of the step. `on_policy` ({fraction, prompt_len, max_new_tokens}):
  the step samples its batch from the student first (GKD). `fused = C > 0`: lazy logits
  (`config.fused_logits = C`). `step_only`: returns {'step': the uncompiled step, 'args':
  (state, teacher_vars, batch)} instead, for a caller that times it itself."""

  import jax
  import numpy as np
  import optax

  from distill_jax import models, tasks
  from distill_jax.losses.objective import build_objective
  from distill_jax.teachers import Teacher
  from distill_jax.train.compiled import build_applies, compile_steps, init_objective
  from distill_jax.train.parallel import Parallel
  from distill_jax.train.state import create_train_state

  lm = _lm_config_module()
  context = {"context": max(FLAGS.seq_len, lm.STUDENT["context"])}
  task = tasks.get_task("language_model")
  parallel = Parallel(FLAGS.mode, FLAGS.num_devices, mesh=_mesh(),
                      teacher_sharding=FLAGS.teacher_sharding)
  parallel.check_batch_size(FLAGS.batch_size)
  shape = (FLAGS.seq_len,)
  dummy = np.zeros((1, *shape), np.int32)
  init = lambda module, seed: jax.jit(lambda r: module.init(r, dummy, train=False))(
      jax.random.PRNGKey(seed))
  student = models.build_model("transformer_lm", vocab, **{**lm.STUDENT, **context})
  teacher = models.build_model("transformer_lm", vocab, **{**lm.TEACHER, **context})
  teachers = {"teacher": Teacher("teacher", "transformer_lm", teacher, init(teacher, 1),
                                 dtype=FLAGS.dtype)}
  objective = build_objective(losses, list(teachers), {})
  if not objective.needs_teachers:
    teachers = {}
  tx = optax.adamw(1e-3)
  parallel.declare_models(student, {n: t.module for n, t in teachers.items()})  # --mesh tensor=
  student_apply, teacher_applies = build_applies(
      student, "transformer_lm", teachers, objective, shape, student_dtype=FLAGS.dtype,
      input_key=task.input_key, fused_logits=fused)
  policy = None
  if on_policy:
    from distill_jax.tasks.language_model.on_policy import OnPolicy
    policy = OnPolicy(student, on_policy["fraction"], on_policy["prompt_len"],
                               on_policy["max_new_tokens"], eos_id=None, pad_id=0)
  train_step, _ = compile_steps(parallel, student_apply, teacher_applies, objective, tx,
                                task=task, on_policy=policy)
  teacher_vars = {n: t.variables for n, t in teachers.items()}
  variables = init(student, 0)
  objective_params, objective_state = jax.jit(
      lambda v, t, b, r: init_objective(objective, student_apply, teacher_applies, v, t, b, r))(
          variables, teacher_vars, task.example_batch(shape, FLAGS.batch_size),
          jax.random.PRNGKey(3))
  state = parallel.put_state(create_train_state(
      variables, objective_params, objective_state, tx, jax.random.PRNGKey(2)))
  teacher_vars = parallel.put_teachers(teacher_vars)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (FLAGS.batch_size, FLAGS.seq_len + 1)).astype(np.int32)
  batch = parallel.put_batch({
      "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
      "mask": np.ones(tokens[:, 1:].shape, np.float32),
      "document": np.zeros(tokens[:, 1:].shape, np.int32),
      "id": np.arange(FLAGS.batch_size, dtype=np.int32)})
  if step_only:
    return {"step": train_step, "args": (state, teacher_vars, batch)}
  timed = compile_and_time(train_step, state, teacher_vars, batch,
                           FLAGS.batch_size * FLAGS.seq_len, time_it=time_it)
  result = {"compile_s": timed["compile_s"], "temp_bytes": timed["temp_bytes"]}
  return {**result, "tokens_per_s": timed["per_s"]} if time_it else result


def fused_logits_memory(fused: int, attention: str | None = None) -> dict[str, float]:
  """The token-KD step's compiled memory (one device, batch 1: CE + forward KL chunked by
  `--chunk_size`, a live teacher, AdamW) with whole logits (`fused = 0`) or lazy ones
  (`config.fused_logits = fused`), at `--lm_fused_vocab`, `--lm_fused_len` tokens and
  Llama-3-1B-like layers of `--lm_fused_width` (2 of them, student and teacher alike), their
  `attention_implementation` `attention` (None: JAX's; 'chunked': `--lm_attention_block`
  queries at a time). Everything is abstract (shapes only), so nothing of that size is
  allocated: only compiled. Returns compile seconds, argument and temporary bytes and the
  student's parameter count."""
  import jax
  import jax.numpy as jnp
  import optax

  from distill_jax import models, tasks
  from distill_jax.losses.objective import build_objective
  from distill_jax.teachers import Teacher
  from distill_jax.train.compiled import build_applies, compile_steps, init_objective
  from distill_jax.train.parallel import Parallel
  from distill_jax.train.state import create_train_state

  vocab, length, width = FLAGS.lm_fused_vocab, FLAGS.lm_fused_len, FLAGS.lm_fused_width
  settings = {"num_layers": 2, "width": width, "num_heads": 32, "num_kv_heads": 8,
              "mlp_dim": 4 * width, "context": length, "attention_implementation": attention,
              "attention_block_size": FLAGS.lm_attention_block}
  task = tasks.get_task("language_model")
  parallel = Parallel("jit", 1)
  student = models.build_model("transformer_lm", vocab, **settings)
  teacher = models.build_model("transformer_lm", vocab, **settings)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  abstract_init = lambda module: jax.eval_shape(
      lambda r, t: module.init(r, t, train=False), jax.random.PRNGKey(0), tokens)
  teachers = {"teacher": Teacher("teacher", "transformer_lm", teacher, abstract_init(teacher))}
  objective = build_objective({"token_ce": {"weight": 0.5, "chunk_size": FLAGS.chunk_size},
                               "token_fkl": {"weight": 0.5, "chunk_size": FLAGS.chunk_size}},
                              list(teachers), {})
  tx = optax.adamw(1e-3)
  student_apply, teacher_applies = build_applies(
      student, "transformer_lm", teachers, objective, (length,), input_key=task.input_key,
      fused_logits=fused)
  train_step, _ = compile_steps(parallel, student_apply, teacher_applies, objective, tx,
                                task=task)
  teacher_vars = {"teacher": teachers["teacher"].variables}
  batch = {"tokens": tokens, "targets": tokens, "mask": jax.ShapeDtypeStruct(
      (1, length), jnp.float32), "document": tokens, "id": jax.ShapeDtypeStruct((1,), jnp.int32)}

  def make_state(variables, teacher_vars, batch, rng):
    params, state = init_objective(objective, student_apply, teacher_applies, variables,
                                   teacher_vars, batch, rng)
    return create_train_state(variables, params, state, tx, rng)

  state = jax.eval_shape(make_state, abstract_init(student), teacher_vars, batch,
                         jax.random.PRNGKey(1))
  start = time.perf_counter()
  memory = train_step.lower(state, teacher_vars, batch).compile().memory_analysis()
  params = sum(x.size for x in jax.tree.leaves(state.params["student"]))
  return {"compile_s": time.perf_counter() - start,
          "argument_bytes": int(memory.argument_size_in_bytes),
          "temp_bytes": int(memory.temp_size_in_bytes), "params": int(params)}


def fused_logits_table() -> dict:
  """The memory rows (`fused_logits_memory`) printed as a table: whole logits with JAX's
  attention (the baseline), fused logits with it, and fused logits with chunked attention.

  Besides the step's temporaries, each row's "beyond the gradient" column subtracts one
  float32 student gradient (4 bytes per parameter, computable from the parameter count), the
  one temporary of the size of the parameters that any design of the logits or the attention
  keeps (AdamW's moments and the parameters are the step's donated arguments, not
  temporaries): what the logits and attention designs can act on."""
  chunk, block = FLAGS.chunk_size, FLAGS.lm_attention_block
  specs = (("whole", 0, None, "whole logits, dot_product_attention (the baseline)"),
           ("fused", chunk, None, f"fused (fused_logits={chunk}), dot_product_attention"),
           ("fused_chunked", chunk, "chunked",
            f"fused (fused_logits={chunk}), chunked attention (block {block})"))
  logits = FLAGS.lm_fused_len * FLAGS.lm_fused_vocab * 4
  print(f"\nKD step (CE + forward KL chunked by {chunk}, live teacher, AdamW), batch 1 x "
        f"{FLAGS.lm_fused_len} tokens, vocabulary {FLAGS.lm_fused_vocab}, width "
        f"{FLAGS.lm_fused_width} (2 layers, 32 heads / 8 KV heads); one [1, L, V] float32 "
        f"logits array is {logits / 2**20:.0f} MiB\n| logits, attention | step temporary "
        "memory (MiB) | beyond the gradient (MiB) | arguments (MiB) | compile (s) |\n"
        "|---|---|---|---|---|")
  rows = {}
  for name, fused, attention, label in specs:
    row = rows[name] = fused_logits_memory(fused, attention)
    row["beyond_grad_bytes"] = row["temp_bytes"] - 4 * row["params"]
    print(f"| {label} | {row['temp_bytes'] / 2**20:.0f} | "
          f"{row['beyond_grad_bytes'] / 2**20:.0f} | {row['argument_bytes'] / 2**20:.0f} | "
          f"{row['compile_s']:.0f} |", flush=True)
  base = rows["whole"]
  print(f"student parameters {base['params']:,} (float32 gradient "
        f"{4 * base['params'] / 2**20:.0f} MiB)", flush=True)
  for name in ("fused", "fused_chunked"):
    print(f"{name} / whole: step temporaries "
          f"{rows[name]['temp_bytes'] / base['temp_bytes']:.3f}, beyond the gradient "
          f"{rows[name]['beyond_grad_bytes'] / base['beyond_grad_bytes']:.3f}", flush=True)
  return {"temp_bytes_whole_logits": base["temp_bytes"],
          "temp_bytes_fused_logits": rows["fused"]["temp_bytes"],
          "temp_bytes_fused_chunked_attention": rows["fused_chunked"]["temp_bytes"],
          "student_params": base["params"]}


def sampling_rate(model_settings: dict, vocab: int, prompt_len: int, new_tokens: int
                  ) -> float:
  """Generated tokens/s of `generate.sample` (KV cache, one compiled loop) for configs/lm.py's
  model `model_settings` (random weights): `--batch_size` prompts of `prompt_len` tokens,
  `new_tokens` sampled at temperature 1 (median over `--repeats`)."""
  import functools

  import jax
  import numpy as np

  from distill_jax import models
  from distill_jax.tasks.language_model import generate

  model = models.build_model("transformer_lm", vocab, **{
      **model_settings, "context": max(prompt_len + new_tokens, model_settings["context"])})
  prompts = np.random.default_rng(0).integers(0, vocab, (FLAGS.batch_size, prompt_len))
  variables = jax.jit(lambda r: model.init(r, prompts[:1], train=False))(jax.random.PRNGKey(0))
  run = jax.jit(functools.partial(generate.sample, model, max_new_tokens=new_tokens))
  jax.block_until_ready(run(variables, prompts, rng=jax.random.PRNGKey(1)))  # Compiles.
  times = []
  for i in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(variables, prompts, rng=jax.random.PRNGKey(2 + i)))
    times.append(time.perf_counter() - start)
  return FLAGS.batch_size * new_tokens / sorted(times)[len(times) // 2]


def lm_tables() -> dict:
  """The language-model figures: tokens/s of the student-only and token-KD steps, and the
  step's temporary memory with the token loss chunked and unchunked at a large vocabulary."""
  chunk = FLAGS.chunk_size
  ce = {"token_ce": {"weight": 1.0, "chunk_size": chunk}}
  kd = {"token_ce": {"weight": 0.5, "chunk_size": chunk},
        "token_fkl": {"weight": 0.5, "chunk_size": chunk}}
  alone, distill = measure_lm(ce, FLAGS.vocab), measure_lm(kd, FLAGS.vocab)
  print(f"batch {FLAGS.batch_size} x {FLAGS.seq_len} tokens, vocabulary {FLAGS.vocab}, "
        f"chunk {chunk}\n| step | tokens/s |\n|---|---|")
  print(f"| student only (token CE) | {alone['tokens_per_s']:.0f} |")
  print(f"| token KD (CE + forward KL, teacher forward) | {distill['tokens_per_s']:.0f} |",
        flush=True)
  # GKD: every batch (fraction 1) is the student's continuation of each row's first half,
  # scored by the teacher; tokens/s counts the rows' tokens, as above.
  half = FLAGS.seq_len // 2
  gkd = measure_lm({"token_jsd": {"weight": 1.0, "beta": 0.5, "chunk_size": chunk}},
                   FLAGS.vocab, on_policy={"fraction": 1.0, "prompt_len": half,
                                           "max_new_tokens": FLAGS.seq_len - half})
  print(f"| on-policy GKD (student samples {FLAGS.seq_len - half} tokens, teacher scores, "
        f"JSD) | {gkd['tokens_per_s']:.0f} |", flush=True)
  lm = _lm_config_module()
  rates = {name: sampling_rate(settings, FLAGS.vocab, half, FLAGS.seq_len - half)
           for name, settings in (("student", lm.STUDENT), ("teacher", lm.TEACHER))}
  print(f"\nsampling (KV cache, temperature 1): {FLAGS.batch_size} prompts of {half} tokens, "
        f"{FLAGS.seq_len - half} new\n| model | generated tokens/s |\n|---|---|")
  for name, rate in rates.items():
    print(f"| {name} | {rate:.0f} |", flush=True)
  memory = {}
  for size in (0, chunk):
    terms = {name: {**settings, "chunk_size": size} for name, settings in kd.items()}
    memory[size] = measure_lm(terms, FLAGS.lm_big_vocab, time_it=False)["temp_bytes"]
  logits = FLAGS.batch_size * FLAGS.seq_len * FLAGS.lm_big_vocab * 4
  print(f"\nvocabulary {FLAGS.lm_big_vocab}: one [batch, length, vocab] float32 logits array "
        f"is {logits / 2**20:.0f} MiB\n| token loss | step temporary memory (MiB) |\n|---|---|")
  print(f"| unchunked | {memory[0] / 2**20:.0f} |")
  print(f"| chunked ({chunk} positions) | {memory[chunk] / 2**20:.0f} |", flush=True)
  return {**fused_logits_table(), "student_tokens_per_s": alone["tokens_per_s"],
          "kd_tokens_per_s": distill["tokens_per_s"],
          "gkd_tokens_per_s": gkd["tokens_per_s"],
          "student_sampling_tokens_per_s": rates["student"],
          "teacher_sampling_tokens_per_s": rates["teacher"],
          "temp_bytes_unchunked": memory[0], "temp_bytes_chunked": memory[chunk]}


def lm_step_temp_bytes(student_settings: dict, teacher_settings: dict, losses: dict,
                       vocab: int, batch_size: int, seq_len: int) -> int:
  """XLA's temporary bytes per device of the compiled LM train step (AdamW) with `losses`,
  student and teacher `transformer_lm(vocab, **settings)`, on `batch_size` rows of `seq_len`
  tokens, under --mode/--num_devices/--mesh (`lm_step_memory`)."""
  from distill_jax.train.parallel import Parallel

  parallel = Parallel(FLAGS.mode, FLAGS.num_devices, mesh=_mesh(),
                      teacher_sharding=FLAGS.teacher_sharding)
  return lm_step_memory(parallel, student_settings, teacher_settings, losses, vocab,
                        batch_size, seq_len)["temp_bytes"]


def lm_step_memory(parallel, student_settings: dict, teacher_settings: dict, losses: dict,
                   vocab: int, batch_size: int, seq_len: int) -> dict[str, int]:
  """The compiled LM train step (AdamW) with `losses`, student and teacher
  `transformer_lm(vocab, **settings)`, on `batch_size` rows of `seq_len` tokens, laid out by
  `parallel` (its tensor axis split by the models' rules, `declare_models`): XLA's
  `temp_bytes` per device, and the student's and teacher's parameter bytes on one device
  (`student_param_bytes`, `teacher_param_bytes`, from the shardings the step takes them
  with). Everything is abstract (shapes only): nothing is initialised or run, so the models
  may be larger than this host could train."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from distill_jax import models, tasks
  from distill_jax.losses.objective import build_objective
  from distill_jax.teachers import Teacher, init_shapes
  from distill_jax.train.compiled import build_applies, compile_steps, init_objective
  from distill_jax.train.state import create_train_state

  task = tasks.get_task("language_model")
  shape = (seq_len,)
  student = models.build_model("transformer_lm", vocab, **student_settings)
  teacher = models.build_model("transformer_lm", vocab, **teacher_settings)
  teachers = {"teacher": Teacher("teacher", "transformer_lm", teacher,
                                 init_shapes(teacher, shape), dtype=FLAGS.dtype)}
  parallel.declare_models(student, {"teacher": teacher})
  objective = build_objective(losses, list(teachers), {})
  tx = optax.adamw(1e-3)
  student_apply, teacher_applies = build_applies(
      student, "transformer_lm", teachers, objective, shape, student_dtype=FLAGS.dtype,
      input_key=task.input_key)
  train_step, _ = compile_steps(parallel, student_apply, teacher_applies, objective, tx,
                                task=task)
  batch = jax.eval_shape(lambda: task.example_batch(shape, batch_size))
  teacher_vars = {"teacher": teachers["teacher"].variables}

  def fresh_state(teacher_vars):
    variables = student.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))
    params, state = init_objective(objective, student_apply, teacher_applies, variables,
                                   teacher_vars, task.example_batch(shape, batch_size),
                                   jax.random.PRNGKey(1))
    return create_train_state(variables, params, state, tx, jax.random.PRNGKey(2))

  state = jax.eval_shape(fresh_state, teacher_vars)
  memory = train_step.lower(state, teacher_vars, batch).compile().memory_analysis()

  def device_bytes(tree, shardings) -> int:
    return sum(int(np.prod(sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings),
                                      strict=True))
  student_params = state.params["student"]
  return {"temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
          "student_param_bytes": device_bytes(student_params, parallel.state_shardings(
              {"params": {"student": student_params}})),
          "teacher_param_bytes": device_bytes(teacher_vars,
                                              parallel.teacher_shardings(teacher_vars))}


def tensor_memory_rows() -> list[dict]:
  """The token-KD step (CE + forward KL chunked by --chunk_size, a live teacher, AdamW, whole
  logits) at a Llama-3-1B-like shape (`--lm_fused_width`, 32 heads / 8 KV heads, MLP 4x,
  2 layers, vocabulary --lm_fused_vocab, --lm_fused_len tokens, student and teacher alike)
  on every device (8 with --host_devices=8), mesh data x tensor for each --lm_tensor_sizes,
  batch 1 row per data shard: per device, the teacher's and student's parameter bytes and the
  step's temporaries (compiled only), printed as a table."""
  import jax

  from distill_jax.train.parallel import Parallel

  vocab, length, width = FLAGS.lm_fused_vocab, FLAGS.lm_fused_len, FLAGS.lm_fused_width
  settings = {"num_layers": 2, "width": width, "num_heads": 32, "num_kv_heads": 8,
              "mlp_dim": 4 * width, "context": length}
  chunk = FLAGS.chunk_size
  kd = token_kd_terms(chunk)
  devices = jax.device_count()
  shape = (f"student and teacher 2 layers, width {width}, 32 heads / 8 KV heads, MLP "
           f"{4 * width}, vocabulary {vocab}, {length} tokens, {FLAGS.dtype}")
  print(f"\ntensor parallelism: token KD step (CE + forward KL chunked by {chunk}, live "
        f"teacher, AdamW, whole logits), {shape}, {devices} {jax.default_backend()} devices, "
        "batch 1 row per data shard; MiB per device", flush=True)
  print("| mesh | teacher params | student params | step temporaries | compile (s) |\n"
        "|---|---|---|---|---|", flush=True)
  rows = []
  for tensor in map(int, FLAGS.lm_tensor_sizes):
    mesh = {"data": devices // tensor, "fsdp": 1, "tensor": tensor}
    start = time.perf_counter()
    row = lm_step_memory(Parallel("jit", devices, mesh=mesh), settings, settings, kd, vocab,
                         devices // tensor, length)
    row = {"mesh": mesh, **row, "compile_s": time.perf_counter() - start}
    rows.append(row)
    mib = lambda key, row=row: f"{row[key] / 2**20:.0f}"
    print(f"| data={mesh['data']}, tensor={tensor} | {mib('teacher_param_bytes')} | "
          f"{mib('student_param_bytes')} | {mib('temp_bytes')} | {row['compile_s']:.0f} |",
          flush=True)
  if rows and rows[0]["mesh"]["tensor"] == 1:
    for row in rows[1:]:
      print(f"tensor={row['mesh']['tensor']}: teacher parameters "
            f"{row['teacher_param_bytes'] / rows[0]['teacher_param_bytes']:.3f}x, temporaries "
            f"{row['temp_bytes'] / rows[0]['temp_bytes']:.3f}x tensor=1's", flush=True)
  return rows


def attention_memory_rows() -> list[dict]:
  """The token-KD step's temporary memory with each model's attention written out (the
  explicit probabilities, as a loss tapping `attn/probs` runs it) vs through
  `jax.nn.dot_product_attention`, at `--attn_shape` (2 layers) for each `--attn_seq_lens`,
  batch 1, vocabulary `--vocab` (small, so the attention's share shows)."""
  width, heads, kv_heads, mlp_dim = (int(n) for n in FLAGS.attn_shape.split(","))
  sizes = {"num_layers": 2, "width": width, "num_heads": heads, "num_kv_heads": kv_heads,
           "mlp_dim": mlp_dim, "bos_id": 256}
  chunk = FLAGS.chunk_size
  kd = {"token_ce": {"weight": 0.5, "chunk_size": chunk},
        "token_fkl": {"weight": 0.5, "chunk_size": chunk}}
  print(f"\nattention: token KD step (CE + forward KL, teacher forward; AdamW), student and "
        f"teacher 2 layers, width {width}, {heads} heads / {kv_heads} KV heads, MLP {mlp_dim}, "
        f"vocabulary {FLAGS.vocab}, batch 1, {FLAGS.dtype}\n| length | attention | step "
        "temporary memory (MiB) | one [heads, L, L] float32 array (MiB) |\n|---|---|---|---|")
  rows = []
  for seq_len in map(int, FLAGS.attn_seq_lens):
    scores = heads * seq_len * seq_len * 4
    for label, extra in (("explicit probabilities", {"attention_probs": True}),
                         ("dot_product_attention", {})):
      settings = {**sizes, "context": seq_len, **extra}
      temp = lm_step_temp_bytes(settings, settings, kd, FLAGS.vocab, 1, seq_len)
      rows.append({"seq_len": seq_len, "attention": label, "temp_bytes": temp})
      print(f"| {seq_len} | {label} | {temp / 2**20:.0f} | {scores / 2**20:.0f} |", flush=True)
  return rows


def _rss_mib() -> float:
  """This process's resident memory now (MiB), from /proc (Linux)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def serve_table() -> list[dict]:
  """`--task=serve`: requests/s and generated tokens/s per --serve_batches value."""
  import json
  import tempfile
  import threading
  import urllib.request

  import jax
  import numpy as np

  from distill_jax.common.model_io import export_model
  from distill_jax.endpoints import serve
  from distill_jax.models import build_model

  layers, width, heads, context = map(int, FLAGS.serve_model.split(","))
  kwargs = {"num_layers": layers, "width": width, "num_heads": heads, "context": context}
  model = build_model("transformer_lm", 259, **kwargs)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, context), np.int32))
  directory = tempfile.mkdtemp(prefix="serve_bench_")
  export_model(os.path.join(directory, "model"), variables, {
      "model": "transformer_lm", "kwargs": kwargs, "num_classes": 259, "step": 0})
  rng = np.random.default_rng(0)
  prompts = ["".join(map(chr, rng.integers(97, 123, rng.integers(8, 25))))
             for _ in range(FLAGS.serve_requests)]
  print(f"\nserve: transformer_lm {layers} layers, width {width}, context {context}; "
        f"{FLAGS.serve_clients} clients, {FLAGS.serve_requests} greedy requests of "
        f"{FLAGS.serve_tokens} tokens; {jax.devices()[0].platform}\n| max_batch | requests/s | "
        "generated tokens/s | batches | RSS before -> after load (MiB) |\n|---|---|---|---|---|",
        flush=True)
  rows = []
  for max_batch in map(int, FLAGS.serve_batches):
    server = serve.start(directory, port=0, max_batch=max_batch,
                         max_new_tokens=FLAGS.serve_tokens, name="bench",
                         window_s=FLAGS.serve_window_ms / 1000)

    def post(prompt, url=server.url):
      body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": FLAGS.serve_tokens,
                         "temperature": 0}).encode()
      request = urllib.request.Request(url + "/completions", body,
                                       {"Content-Type": "application/json"})
      with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["usage"]["completion_tokens"]

    def drive(work):
      """Runs `work` (prompts) over --serve_clients threads; the generated tokens."""
      queue, done, lock = list(work), [], threading.Lock()

      def client():
        while True:
          with lock:
            if not queue:
              return
            prompt = queue.pop()
          done.append(post(prompt))
      threads = [threading.Thread(target=client) for _ in range(FLAGS.serve_clients)]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
      return sum(done)

    server.engine.warm_up(25, FLAGS.serve_tokens)  # Compiles every shape the load uses.
    before, batches = _rss_mib(), server.engine.batches
    start = time.perf_counter()
    tokens = drive(prompts)
    seconds = time.perf_counter() - start
    row = {"max_batch": max_batch, "requests_per_s": len(prompts) / seconds,
           "tokens_per_s": tokens / seconds, "batches": server.engine.batches - batches,
           "rss_before_mib": before, "rss_after_mib": _rss_mib()}
    server.close()
    rows.append(row)
    print(f"| {max_batch} | {row['requests_per_s']:.1f} | {row['tokens_per_s']:.0f} | "
          f"{row['batches']} | {before:.0f} -> {row['rss_after_mib']:.0f} |", flush=True)
  return rows


def main(argv: list[str]) -> None:
  del argv
  import json

  import jax

  from distill_jax.train.console import quiet_library_logs

  quiet_library_logs()  # No "Unable to initialize backend 'tpu'" and such on CPUs.
  if FLAGS.task == "serve":
    rows = serve_table()
    if FLAGS.json:
      print(json.dumps({"serve": rows}))
    return
  if FLAGS.task == "lm":
    if FLAGS.against == "torch":
      try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
      except ImportError:
        sys.exit(TORCH_MISSING.replace("PyTorch", "PyTorch and transformers"))
      summary = {"against_torch": lm_against_torch()}
    elif FLAGS.lm_tensor_only:
      summary = {"tensor_memory": tensor_memory_rows()}
    elif FLAGS.lm_fused_only:
      summary = fused_logits_table()
    elif FLAGS.attention_memory_only:
      summary = {"attention_memory": attention_memory_rows()}
    else:
      summary = {**lm_tables(), "attention_memory": attention_memory_rows()}
    if FLAGS.json:
      print(json.dumps(summary))
    return

  kd_terms, kd_ce, _ = load_methods()["kd"]
  if FLAGS.row:
    print(json.dumps(measure({"ce": {"weight": kd_ce}, **kd_terms})))
    return
  if FLAGS.scaling:
    rows = scaling_table()
    if FLAGS.json:
      for row in rows:
        print(json.dumps(row))
    return

  devices = jax.devices()[:FLAGS.num_devices or None]
  xla_flags = os.environ.get("XLA_FLAGS", "")
  print(f"device: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
        f"mode {FLAGS.mode}, batch {FLAGS.batch_size}, XLA_FLAGS={xla_flags!r}", flush=True)
  student_only = benchmark({"ce": {"weight": 1.0}})
  distill = benchmark({"ce": {"weight": kd_ce}, **kd_terms})
  forward = teacher_forward_rate()
  # Time per example: KD vs (student step + teacher forward).
  overhead = (1 / distill) / (1 / student_only + 1 / forward)
  print("| step | examples/s |\n|---|---|")
  print(f"| student only ({FLAGS.student}) | {student_only:.1f} |")
  print(f"| teacher forward ({FLAGS.teacher}) | {forward:.1f} |")
  print(f"| KD ({FLAGS.teacher} -> {FLAGS.student}) | {distill:.1f} |")
  print(f"KD step costs {student_only / distill:.2f}x the student-only step and "
        f"{overhead:.2f}x (student step + teacher forward).", flush=True)
  summary = {"jax": {"kd": distill, "student": student_only, "teacher_forward": forward,
                     "kd_over_student_plus_forward": overhead}}
  if FLAGS.against == "torch":
    try:
      torch = torch_rates()
    except ImportError:
      sys.exit(TORCH_MISSING)
    summary["torch"] = torch
    print("\n| step | JAX ex/s | PyTorch ex/s | JAX / PyTorch |\n|---|---|---|---|")
    for name, ours in (("KD", distill), ("student", student_only), ("teacher_forward", forward)):
      theirs = torch[name.lower() if name == "KD" else name]
      print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |", flush=True)
  if FLAGS.json:
    print(json.dumps(summary))
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
