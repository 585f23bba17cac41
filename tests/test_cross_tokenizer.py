"""Cross-tokenizer distillation: the embedded corpus's BPE, the alignment of two tokenizations
by byte offsets, the vocabulary map (prefix marginalisation), the `xtok_kl` and `uld` losses
against NumPy references, and live teachers with their own tokenizer end to end."""

import numpy as np

from distill_jax.data.text.corpus import pydoc_texts
from distill_jax.models import tokenizers
from distill_jax.models.tokenizers import get_tokenizer, train_bpe


def test_bpe_is_deterministic_and_encodes_like_the_others():
  texts = pydoc_texts("train")
  first, second = train_bpe(texts, 300), train_bpe(texts, 300)
  assert first == second  # Same corpus -> the same vocabulary and merges.
  assert first != train_bpe(texts[:5], 300)  # ... and another corpus another one.
  bpe = get_tokenizer("bpe")
  assert (bpe.name, bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.pad_id) == ("bpe", 1024, 0, 1, 2)
  text = "Hello wörld:\n  return x"
  ids = bpe.encode(text)
  assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id and bpe.decode(ids) == text
  body, starts = bpe.encode_with_offsets(text)
  np.testing.assert_array_equal(body, ids[1:-1])
  # Each token's bytes (byte_lengths) add up to the text's; its start is where the text's
  # characters before it end ('ö' is two byte tokens sharing its start).
  lengths = bpe.byte_lengths()[body]
  assert lengths.sum() == len(text.encode("utf-8"))
  pieces = [bpe.decode(body[i:i + 1]) for i in range(len(body))]
  assert all(text.startswith(p, int(s)) for p, s in zip(pieces, starts, strict=True)
             if "\ufffd" not in p)
  # It compresses the held-out split (never trained on) and round-trips it.
  test = pydoc_texts("test")
  assert all(bpe.decode(bpe.encode(t)) == t for t in test)
  n_bytes = sum(len(t.encode("utf-8")) for t in test)
  assert n_bytes / sum(len(bpe.encode(t)) - 2 for t in test) > 2.0
  assert tokenizers.BPE_VOCAB_SIZE == 1024
