r"""Writes tests/fixtures/hf/: tiny open-weights checkpoints, as Hugging Face tools save them.

Made once, on a machine with PyTorch and transformers (neither is needed by the tests, which
read only the files written here):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    /tmp/torchenv/bin/python scripts/make_hf_fixtures.py --out=tests/fixtures/hf

What it writes:
- `tokenizer.json`: a byte-level BPE of 320 tokens trained (deterministically) on the first
  documents of Python's own documentation topics, with `<s>`, `</s>` and `<pad>` specials;
  `tokenizer_reference.json`: the ids it gives a few fixed strings.
- `llama/`, `qwen2/`, `mistral/`: randomly initialised models (width 32, 2 layers, 4 heads,
  2 key/value heads) saved with `save_pretrained` (config.json + model.safetensors) next to a
  copy of the tokenizer, each with `reference.npz` (`ids` int32 [2, 16] and the model's float32
  `logits` [2, 16, vocab]; no pickles). The layouts cover what the loader must get right:
  llama has llama3 RoPE scaling and an untied head; qwen2 has q/k/v biases and tied
  embeddings; mistral has linear RoPE scaling, an untied head and a sliding window.
- `versions.json`: the torch, transformers and tokenizers versions that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import tokenizers
import torch
import transformers

SPECIALS = ["<s>", "</s>", "<pad>"]
VOCAB = 320
STRINGS = ["Hello, world!", "def f(x):\n    return x + 1", "Ünïcödé text — with dashes",
           "  leading spaces and trailing  "]
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
              pad_token_id=2)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 512})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=True,
        rope_theta=1000000.0, use_sliding_window=False)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False,
        rope_theta=10000.0, sliding_window=32,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def corpus() -> list[str]:
  from pydoc_data import topics  # Real English text that ships with every Python.
  return [topics.topics[k] for k in sorted(topics.topics)[:40]]


def make_tokenizer(path: str) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus(), trainer=trainer)
  tok.save(path)
  return tok


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/fixtures/hf")
  args = parser.parse_args()
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  os.makedirs(args.out, exist_ok=True)
  tok_path = os.path.join(args.out, "tokenizer.json")
  tok = make_tokenizer(tok_path)
  assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
  with open(os.path.join(args.out, "tokenizer_reference.json"), "w") as f:
    json.dump({"strings": STRINGS, "ids": [tok.encode(s).ids for s in STRINGS]}, f, indent=1)
  ids = np.random.default_rng(0).integers(3, VOCAB, size=(2, 16)).astype(np.int32)
  for seed, (name, (config_cls, model_cls, extra)) in enumerate(MODELS.items()):
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **extra, attn_implementation="eager")
    model = model_cls(config).eval()
    with torch.no_grad():  # Random norms and biases too, so a misplaced one shows.
      for n, p in model.named_parameters():
        if n.endswith("norm.weight") or n.endswith(".bias"):
          p.copy_(1.0 + 0.2 * torch.randn_like(p) if n.endswith("norm.weight")
                  else 0.1 * torch.randn_like(p))
    directory = os.path.join(args.out, name)
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copy(tok_path, os.path.join(directory, "tokenizer.json"))
    with torch.no_grad():
      logits = model(torch.from_numpy(ids).long()).logits.float().numpy()
    np.savez(os.path.join(directory, "reference.npz"), ids=ids, logits=logits)
  os.remove(tok_path)  # Each model directory holds its copy; one source of truth less to drift.
  with open(os.path.join(args.out, "versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
               "tokenizers": tokenizers.__version__, "numpy": np.__version__}, f, indent=1)


if __name__ == "__main__":
  main()
