r"""Trains the embedded corpus's BPE tokenizer (`data.tokenizer='bpe'`) and writes it, or checks
that the committed one is what this Python's corpus gives.

    python scripts/train_bpe.py            # writes distill_jax/models/bpe/tokenizer.json
    python scripts/train_bpe.py --check    # exit 1 (and say so) if the committed file differs

The corpus is the train split of `pydoc_topics` (Python's documentation topics; the 8 held-out
test documents are never read), so the file depends on the Python version that made it, which
`bpe/README.md` records. It is committed rather than trained on first use so that every machine
tokenizes alike (see `distill_jax/models/tokenizers.py`).
"""

from __future__ import annotations

import argparse
import os
import sys

from distill_jax.data.text.corpus import pydoc_texts
from distill_jax.models.tokenizers import BPE_DIR, BPE_VOCAB_SIZE, train_bpe


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="compare with the committed file instead of writing it")
  args = parser.parse_args(argv)
  text = train_bpe(pydoc_texts("train"), BPE_VOCAB_SIZE)
  path = os.path.join(BPE_DIR, "tokenizer.json")
  if args.check:
    with open(path, encoding="utf-8") as f:
      same = f.read() == text
    print(f"{path}: {'the same as' if same else 'DIFFERS from'} the BPE this Python "
          f"({sys.version.split()[0]}) trains.")
    return 0 if same else 1
  os.makedirs(BPE_DIR, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"Wrote {path} ({len(text)} characters, {BPE_VOCAB_SIZE} ids).")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
