"""TFDS text sets by name: `tiny_shakespeare` and `lm1b` prepared by scripts/prepare_data.py's
TensorFlow-free builders (their download replaced by local files), then read, packed and
trained on by name like the embedded corpus."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import ROOT, run_cli

from distill_jax.data.text import catalog, packing
from distill_jax.models import tokenizers

TOK = tokenizers.ByteTokenizer()
# Shakespeare-like text with multi-byte characters, so characters and bytes differ.
LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "",
         "All:", "Speak, speak.", "MENENIUS: Thou rascal, that art worst in blood — señor…"]
SHAKESPEARE = "\n".join(LINES[i % len(LINES)] + f" {i}" for i in range(400))
LM1B = {"training-monolingual.tokenized.shuffled/news.en-00001-of-00100":
        ["The cat sat .", "Markets fell on Tuesday .", "Ünïcode words here ."],
        "training-monolingual.tokenized.shuffled/news.en-00002-of-00100":
        ["A second file .", "With two sentences ."],
        "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050":
        ["Held out one .", "Held out two ."]}


@pytest.fixture(scope="module")
def text_data_dir(tmp_path_factory):
  """A data_dir with both sets prepared from local stand-ins for their downloads."""
  root = tmp_path_factory.mktemp("corpora")
  (root / "input.txt").write_text(SHAKESPEARE)
  extracted = root / "lm1b_extracted"
  for name, lines in LM1B.items():
    path = extracted / catalog.LM1B_TOP / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f" {line} \n" for line in lines))  # Stripped when read.
  urls = {catalog.TINY_SHAKESPEARE_URL: str(root / "input.txt"),
          catalog.LM1B_URL: str(extracted)}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tfds.download.DownloadManager, "download", lambda self, url: urls[url])
    mp.setattr(tfds.download.DownloadManager, "download_and_extract",
               lambda self, url: urls[url])
    data_dir = str(root / "tfds")
    for name in ("tiny_shakespeare", "lm1b"):
      catalog.prepare(name, data_dir)
  return data_dir


def data_config(name, data_dir, **fields):
  return ml_collections.ConfigDict({"name": name, "data_dir": data_dir, "seq_len": 16,
                                    "tokenizer": "bytes", "train_split": "train",
                                    "eval_split": "test", **fields})


def test_tiny_shakespeare_is_read_by_name_with_tfds_splits(text_data_dir):
  # TFDS's split: the first 90% of the characters, then half of the rest each.
  n = len(SHAKESPEARE)
  train_end = int(n * 0.9)
  valid_end = train_end + int((n - train_end) * 0.5)
  expected = {"train": SHAKESPEARE[:train_end], "validation": SHAKESPEARE[train_end:valid_end],
              "test": SHAKESPEARE[valid_end:]}
  builder = tfds.builder("tiny_shakespeare", data_dir=text_data_dir)
  assert str(builder.version) == "1.0.0" and set(builder.info.splits) == set(expected)
  for split, document in expected.items():
    packed = packing.packed_split(data_config("tiny_shakespeare", text_data_dir), split)
    stream = TOK.encode(document)  # One document per split.
    assert packed.documents == 1 and packed.num_bytes == len(document.encode())
    np.testing.assert_array_equal(packed.tokens.reshape(-1)[:len(stream) - 1], stream[:-1])
    np.testing.assert_array_equal(packed.targets.reshape(-1)[:len(stream) - 1], stream[1:])


def test_lm1b_sentences_are_documents_and_max_documents_caps_them(text_data_dir):
  train = [line for name, lines in LM1B.items() if "heldout" not in name for line in lines]
  packed = packing.packed_split(data_config("lm1b", text_data_dir), "train")
  assert packed.documents == len(train) == 5
  assert packed.num_bytes == sum(len(line.encode()) for line in train)
  first = packing.packed_split(data_config("lm1b", text_data_dir, max_documents=2), "train")
  assert first.documents == 2
  stored = [r["text"].decode() for r in
            tfds.data_source("lm1b", split="train", data_dir=text_data_dir, download=False)]
  assert sorted(stored) == sorted(train)  # The same sentences, in TFDS's stored order.
  stream = np.concatenate([TOK.encode(s) for s in stored[:2]])
  np.testing.assert_array_equal(first.tokens.reshape(-1)[:len(stream) - 1], stream[:-1])
  assert packing.packed_split(data_config("lm1b", text_data_dir), "test").documents == 2


def test_a_language_model_trains_on_tiny_shakespeare_by_name(text_data_dir, tmp_path):
  workdir = tmp_path / "run"
  run_cli([f"--config={os.path.join(ROOT, 'configs', 'lm.py')}:teacher,tiny",
           f"--workdir={workdir}", "--config.data.name=tiny_shakespeare",
           f"--config.data.data_dir={text_data_dir}", "--config.data.eval_split=validation",
           "--config.num_steps=4", "--config.eval_samples=0"])
  result = json.load(open(workdir / "result.json"))
  assert result["steps"] == 4 and np.isfinite(result["final"]["eval/ce"])
  assert result["final"]["eval/ce"] < np.log(259)  # Four steps already beat a uniform guess.
