"""Byte-level tokens, packing with masks and document boundaries, the embedded pydoc corpus."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from distill_jax.data.text import batches, packing
from distill_jax.data.text import info as text_info
from distill_jax.models import tokenizers

TOK = tokenizers.ByteTokenizer()


def test_byte_tokenizer_round_trips_utf8():
  s = "naïve café: 3 ≤ 4\n"
  ids = TOK.encode(s)
  assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id and len(ids) == len(s.encode()) + 2
  assert TOK.decode(ids) == s
  assert TOK.vocab_size == 259 and max(TOK.bos_id, TOK.eos_id, TOK.pad_id) == 258


def test_pack_covers_every_pair_once_with_masks_and_boundaries():
  docs = [TOK.encode("hello"), TOK.encode(""), np.zeros(0, np.int32), TOK.encode("ab"),
          np.asarray([TOK.bos_id], np.int32), TOK.encode("xyz")]
  packed = packing.pack(docs, 4, TOK)
  kept = [d for d in docs if len(d) >= 2]
  assert packed.dropped == 2 and packed.documents == len(kept) == 4
  stream = np.concatenate(kept)
  # Every adjacent pair (a, b) of the stream is one position, in order; the rest is padding.
  pairs = np.stack([packed.tokens.reshape(-1), packed.targets.reshape(-1)], 1)
  np.testing.assert_array_equal(pairs[:len(stream) - 1], np.stack([stream[:-1], stream[1:]], 1))
  n = len(stream)
  assert np.all(pairs[n - 1:, 1] == TOK.pad_id) and np.all(pairs[n:, 0] == TOK.pad_id)
  assert packed.tokens.shape == (int(np.ceil((len(stream) - 1) / 4)), 4)
  mask = packed.mask.reshape(-1)
  # Masked: padding and the next document's BOS; kept: every other target.
  expected = np.zeros_like(mask)
  expected[:len(stream) - 1] = stream[1:] != TOK.bos_id
  np.testing.assert_array_equal(mask, expected)
  doc = np.repeat(np.arange(4), [len(d) for d in kept])
  np.testing.assert_array_equal(packed.document.reshape(-1)[:n], doc)
  assert np.all(packed.document.reshape(-1)[n:] == -1)
  # Bits per byte count the text bytes predicted: 5 + 0 + 2 + 3.
  assert packed.num_bytes == 10


def test_pack_with_nothing_to_pack_says_so():
  with pytest.raises(ValueError, match="all 2 have fewer than two tokens"):
    packing.pack([np.zeros(1, np.int32), np.zeros(0, np.int32)], 8, TOK)


@pytest.fixture(scope="module")
def corpus(data_dir):
  return ml_collections.ConfigDict({"name": "pydoc_topics", "data_dir": data_dir, "seq_len": 32,
                                    "train_split": "train", "eval_split": "test"})


def test_embedded_corpus_has_a_held_out_split(corpus):
  from pydoc_data import topics

  info = text_info.get_text_info(corpus)
  assert info.vocab_size == 259 and info.seq_len == 32
  assert info.documents == {"train": len(topics.topics) - 8, "test": 8}
  assert info.dropped == {"train": 0, "test": 0}
  ids = {s: {int(r["id"]) for r in tfds.data_source("pydoc_topics", split=s,
                                                    data_dir=corpus.data_dir)}
         for s in ("train", "test")}
  assert not ids["train"] & ids["test"] and len(ids["train"] | ids["test"]) == len(topics.topics)
  names = sorted(topics.topics)
  stored = tfds.data_source("pydoc_topics", split="test", data_dir=corpus.data_dir)[0]
  assert stored["text"].tobytes().decode() == topics.topics[names[stored["id"]]]
  total = sum(len(t.encode()) for t in topics.topics.values())
  assert info.num_bytes["train"] + info.num_bytes["test"] == total


def test_train_batches_are_deterministic_split_by_process_and_resumable(corpus):
  one = batches.train_iterator(corpus, global_batch_size=8, seed=3)
  first = [next(one) for _ in range(3)]
  halves = [batches.train_iterator(corpus, global_batch_size=8, seed=3, process_index=i,
                                process_count=2) for i in range(2)]
  for batch in first:
    parts = [next(h) for h in halves]
    for key in ("tokens", "targets", "mask", "document", "id"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  resumed = batches.train_iterator(corpus, global_batch_size=8, seed=3)
  resumed.set_state({**one.get_state(), "step": 2})
  np.testing.assert_array_equal(next(resumed)["tokens"], first[2]["tokens"])
  assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
  assert first[0]["tokens"].shape == (8, 32) and first[0]["tokens"].dtype == np.int32


def test_eval_pass_covers_the_split_once_and_pads(corpus):
  config = ml_collections.ConfigDict({**corpus.to_dict(), "eval_subset": 70})
  passes = list(batches.eval_batches(config, global_batch_size=32))
  assert len(passes) == 3
  ids = np.concatenate([b["id"] for b in passes])
  np.testing.assert_array_equal(ids[:70], np.arange(70))
  assert np.all(ids[70:] == -1) and np.all(passes[-1]["mask"][6:] == 0)
  full = packing.packed_split(corpus, "test")
  np.testing.assert_array_equal(passes[1]["tokens"], full.tokens[32:64])
