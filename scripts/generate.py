r"""Samples completions from a trained language model and writes them as JSON lines.

    python scripts/generate.py --workdir=runs/lm/teacher --prompts=prompts.txt \
        --max_new_tokens=64 --temperature=0.8 --top_k=40 --output=samples.jsonl
    python scripts/generate.py --workdir=runs/lm/teacher --num_prompts=100 --prompt_len=16 \
        --top_logprobs=5 --output=teacher.jsonl

The model is a finished run's export (`--workdir=RUN`, its `model/`; or `--checkpoint=DIR`, an
export directory). Prompts come from `--prompts=FILE` (one per line, or JSON lines with a
"prompt" field when the file ends in .jsonl) or, without it, from the run's held-out rows
(`--num_prompts` rows, their first `--prompt_len` tokens; the data settings are the run's
`config.json`, or `--config` with overrides, e.g. `--config.data.data_dir`).

Each output line is `{"prompt": str, "completion": str}`; with `--top_logprobs=K > 0` also
`"tokens"` (one string per completion token) and `"top_logprobs"` (per completion token, the K most
likely tokens -> log-probability, at temperature 1): what black-box distillation reads (see
`distill_jax.tasks.language_model.generate.completion_records` for how tokens are named). Greedy
with `--temperature=0`. Reproducible from `--seed`.

`--rows_as_text` needs no model: it writes `--num_prompts` held-out rows whole, each as
`{"prompt": "", "completion": TEXT}`: the held-out text in the black-box format, to score
students trained on a teacher's file on the same text as the others (`data.eval_files`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config (for prompts from its data).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "A trained run's working directory.")
flags.DEFINE_string("checkpoint", None, "An exported model directory (instead of --workdir).")
flags.DEFINE_string("prompts", None, "A text file (one prompt a line) or .jsonl ('prompt').")
flags.DEFINE_integer("num_prompts", 16, "Prompts from the data set's held-out split.")
flags.DEFINE_integer("prompt_len", 16, "Tokens of each held-out row used as its prompt.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate after each prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0: greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("top_logprobs", 0, "K > 0: also write each token's K most likely tokens.")
flags.DEFINE_integer("batch_size", 32, "Prompts decoded at once.")
flags.DEFINE_string("output", None, "The JSON-lines file to write.")
flags.DEFINE_bool("rows_as_text", False, "No model: write the held-out rows whole as "
                  "completions of an empty prompt.")


class GenerateError(ValueError):
  """Bad input to the script; the message names the flag, file or line."""


def read_prompts(path: str) -> list[str]:
  """Prompts from a text file (one a line) or a .jsonl file (objects with a "prompt")."""
  if not os.path.exists(path):
    raise GenerateError(f"--prompts={path}: no such file.")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not path.endswith(".jsonl"):
        prompts.append(line)
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise GenerateError(f"{path}:{number}: not JSON ({e}).") from None
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise GenerateError(f'{path}:{number}: expected an object with a "prompt" string.')
      prompts.append(record["prompt"])
  if not prompts:
    raise GenerateError(f"--prompts={path} holds no prompts.")
  return prompts


def load_model(workdir: str | None, checkpoint: str | None):
  """(module, variables) of the exported model of a run or an export directory."""
  from distill_jax import models
  from distill_jax.common.model_io import load_model_variables, read_model_meta
  from distill_jax.teachers import init_shapes, resolve_export_dir

  directory = resolve_export_dir(checkpoint or workdir)
  meta = read_model_meta(directory)
  module = models.build_model(meta["model"], meta["num_classes"], **(meta.get("kwargs") or {}))
  if not hasattr(module, "init_cache"):
    raise GenerateError(f"{directory} holds a {meta['model']}, not a language model with a "
                        "decoding cache (transformer_lm).")
  return module, load_model_variables(directory, init_shapes(module, (module.context,)))


def run_config(workdir: str | None):
  """The config: --config, else the run's config.json (None when neither exists)."""
  import ml_collections

  if FLAGS.config is not None:
    return FLAGS.config
  path = os.path.join(workdir or "", "config.json")
  if workdir and os.path.exists(path):
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  return None


def main(argv: list[str]) -> None:
  del argv
  from distill_jax.train.console import quiet_library_logs

  quiet_library_logs()  # Orbax's INFO lines while the model loads; warnings still show.
  if not (FLAGS.workdir or FLAGS.checkpoint or FLAGS.rows_as_text) or not FLAGS.output:
    raise app.UsageError("--workdir (or --checkpoint) and --output are required.")
  try:
    write_rows() if FLAGS.rows_as_text else write_completions()
  except Exception as e:  # noqa: BLE001 - named errors become one line; others re-raise.
    from distill_jax.common.model_io import CheckpointError

    if isinstance(e, GenerateError | CheckpointError):
      sys.exit(f"generate: {e}")
    raise


def held_out_rows(config) -> list:
  """The first --num_prompts packed rows of the config's eval split (token ids)."""
  from distill_jax.data.text import packing

  if config is None:
    raise GenerateError("Without --prompts the prompts come from the run's data: give "
                        "--config or a --workdir with a config.json.")
  return list(packing.packed_split(config.data, config.data.get("eval_split", "test")).tokens[
      :FLAGS.num_prompts])


def write_records(records: list[dict]) -> None:
  with open(FLAGS.output, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_rows() -> None:
  """--rows_as_text: the held-out rows, decoded, as completions of an empty prompt."""
  from distill_jax.models import tokenizers

  config = run_config(FLAGS.workdir)
  tokenizer = tokenizers.get_tokenizer(config.data.get("tokenizer", "bytes") if config else "bytes")
  records = [{"prompt": "", "completion": tokenizer.decode(row)} for row in held_out_rows(config)]
  write_records(records)
  logging.info("Wrote %d held-out rows to %s.", len(records), FLAGS.output)


def write_completions() -> None:
  import functools

  import jax
  import numpy as np
  from tqdm import tqdm

  from distill_jax.models import tokenizers
  from distill_jax.tasks.language_model import generate

  generate.check_settings(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  model, variables = load_model(FLAGS.workdir, FLAGS.checkpoint)
  config = run_config(FLAGS.workdir)
  tokenizer = tokenizers.get_tokenizer(config.data.get("tokenizer", "bytes") if config else "bytes")
  if FLAGS.prompts:
    prompts = read_prompts(FLAGS.prompts)
    # [BOS, bytes...]: the prompt's document goes on (no EOS).
    encoded = [tokenizer.encode(p)[:-1] for p in prompts]
  else:
    encoded = [row[:FLAGS.prompt_len] for row in held_out_rows(config)]
    prompts = [tokenizer.decode(row) for row in encoded]
  prompt_len = max(len(e) for e in encoded)
  if prompt_len + FLAGS.max_new_tokens > model.context:
    raise GenerateError(f"The longest prompt ({prompt_len} tokens) plus --max_new_tokens="
                        f"{FLAGS.max_new_tokens} exceeds the model's context of {model.context}:"
                        " shorten the prompts or generate fewer tokens.")
  sample = jax.jit(functools.partial(
      generate.sample, model, max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      return_logprobs=FLAGS.top_logprobs > 0))
  rng = jax.random.PRNGKey(FLAGS.seed)
  records = []
  with tqdm(total=len(prompts), unit="prompt", desc="generate",
            disable=len(prompts) <= FLAGS.batch_size) as bar:
    for start in range(0, len(prompts), FLAGS.batch_size):
      chunk = encoded[start:start + FLAGS.batch_size]
      batch = np.full((FLAGS.batch_size, prompt_len), tokenizer.pad_id, np.int32)
      lengths = np.ones(FLAGS.batch_size, np.int32)
      for i, ids in enumerate(chunk):  # Left-padded: every prompt ends at the same column.
        batch[i, prompt_len - len(ids):], lengths[i] = ids, len(ids)
      generate.check_prompts(batch, lengths, tokenizer.pad_id)  # The jitted sample cannot.
      out = jax.device_get(sample(variables, batch, rng=jax.random.fold_in(rng, start),
                                  prompt_lengths=lengths))
      records += generate.completion_records(
          tokenizer, prompts[start:start + len(chunk)], out[0], out[1], prompt_len,
          out[2] if FLAGS.top_logprobs > 0 else None, FLAGS.top_logprobs)
      bar.update(len(chunk))
  write_records(records)
  logging.info("Wrote %d completions to %s.", len(records), FLAGS.output)


if __name__ == "__main__":
  app.run(main)
