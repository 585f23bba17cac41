"""Text for language models: documents read, tokenized, packed into rows and batched.

One module per job; import the one you need (`from distill_jax.data.text import batches`):

- `packing.py`: a split's documents packed into rows of `data.seq_len` (`Packed`, `pack`,
  `packed_split`, `text_bytes`, `rows_digest`); short documents dropped and counted.
- `batches.py`: the train iterator and the eval pass over packed rows (`train_iterator`,
  `eval_batches`), with `iterators`' contract (saveable position, process shards).
- `info.py`: what a model and a run need to know of the data set (`TextInfo`,
  `get_text_info`).
- `corpus.py`: the embedded corpus `pydoc_topics` (Python's documentation topics).
- `catalog.py`: the TFDS catalog's `tiny_shakespeare` and `lm1b` builders, prepared without
  TensorFlow (`scripts/prepare_data.py`).
- `blackbox.py`: a black-box teacher's JSONL outputs as a data set (`data.name='jsonl'`).
- `cross_tokenizer.py`: the rows re-tokenised and aligned for a live teacher with its own
  tokenizer (`teachers.NAME.tokenizer`), and its vocabulary map onto the student's.

The tokenizers (`bytes`, `bpe`, `hf:<directory>`) live beside the models in `models/tokenizers.py`.
"""
