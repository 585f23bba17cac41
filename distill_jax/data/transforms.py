"""Per-example transforms: pure NumPy functions of raw images and integer keys.

`augment_images` crops (and flips) a batch of raw images and `normalize_images` scales
them to normalised float32; both are pure, so a batch is a function of its inputs alone.
Their randomness comes in as explicit words from `hash_keys`: pseudo-random numbers from
a counter-based hash (SplitMix64 finaliser) of integer keys (seed, stream, epoch,
example id) rather than a stateful generator: it is cheap to vectorise, has no state to
save, and gives the same numbers on every NumPy version and machine. The `STREAM_*`
constants keep the shuffle's and the augmentation's numbers independent.

Nothing here reads data or configs (that is `sources`); `iterators` applies these to
the examples it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AUGMENTATIONS = ("crop_flip", "crop", "none")

# Hash streams: independent random numbers for the shuffle and the augmentation.
STREAM_SHUFFLE = 1
STREAM_AUGMENT = 2


def augment_images(images: np.ndarray, mode: str, padding: int, bits: np.ndarray) -> np.ndarray:
  """Random crop from the zero-padded image (and, for 'crop_flip', a horizontal flip).

  `bits` holds one random 64-bit word per image: bits 0..15 pick the row offset,
  16..31 the column offset, bit 32 the flip. Done as one gather over the batch.
  """
  if mode == "none" or (mode == "crop" and padding == 0):
    return images
  n, h, w, _ = images.shape
  size = np.uint64(2 * padding + 1)
  dy = (bits % size).astype(np.int64)
  dx = ((bits >> np.uint64(16)) % size).astype(np.int64)
  if mode == "crop_flip":
    flip = ((bits >> np.uint64(32)) & np.uint64(1)).astype(bool)
  else:
    flip = np.zeros(n, bool)
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = dy[:, None] + np.arange(h)
  cols = dx[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalize_images(images: np.ndarray, pixel_max: float, mean: Sequence[float],
                     std: Sequence[float]) -> np.ndarray:
  """Raw pixels as float32 `(x / pixel_max - mean) / std`, per channel."""
  scale = np.float32(1.0 / pixel_max)
  mean = np.asarray(mean, np.float32)
  inv_std = np.float32(1.0) / np.asarray(std, np.float32)
  return (images.astype(np.float32) * scale - mean) * inv_std


GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio: the hashes' odd increment.


def mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijection on uint64 that scrambles every bit."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hash_keys(*keys: int | np.ndarray) -> np.ndarray:
  """Random-looking uint64 words from integer keys (broadcast; at least 1-D)."""
  arrays = [np.atleast_1d(np.asarray(k % 2**64 if isinstance(k, int) else k)).astype(np.uint64)
            for k in keys]
  arrays = np.broadcast_arrays(*arrays)
  h = np.full(arrays[0].shape, GOLDEN, np.uint64)
  for a in arrays:  # 1-D+ arrays: uint64 arithmetic wraps silently, as intended.
    h = mix64(h ^ (a + np.uint64(GOLDEN)))
  return h
