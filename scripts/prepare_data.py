r"""Prepares data sets as ArrayRecord files in a data_dir, once, before any training.

Training never downloads: it reads `data_dir/NAME/VERSION/*.array_record-*` with
`tfds.data_source` (random access, no TensorFlow). This script makes those files.

Usage:
  python scripts/prepare_data.py cifar10 --data_dir=/data/tfds
  python scripts/prepare_data.py cifar10 cifar100 --data_dir=/data/tfds
  python scripts/prepare_data.py digits --data_dir=/data/tfds   # offline, from scikit-learn
  python scripts/prepare_data.py tiny_shakespeare lm1b --data_dir=/data/tfds   # text

`--data_dir` defaults to $DISTILL_JAX_DATA_DIR, else ~/.cache/distill_jax/tfds (what
training uses when the config's `data.data_dir` is unset).

Embedded data sets (`digits`, `pydoc_topics`) build offline from packages already installed (and
training builds them by itself on first use anyway). TFDS data sets such as
cifar10 / cifar100 download their source files, so run this on a machine with
internet access. Encoding their images (`tfds.features.Image`) needs TensorFlow:
install it (`pip install tensorflow-cpu`) on the machine that prepares the data;
the machines that train need neither TensorFlow nor network. The text sets
`tiny_shakespeare` and `lm1b` (for `configs/lm.py`) need no TensorFlow even here
(`distill_jax/data/text/catalog.py`). Copy the resulting
data_dir to the cluster's shared storage and point `data.data_dir` at it.

Before anything is written, every host a data set downloads from is tried once (through
$HTTPS_PROXY / $HTTP_PROXY when set, as the download would go), `--connect_timeout` seconds at
most: without network the script ends in seconds with one line naming the host and the error,
instead of TFDS retrying each download for minutes.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.resources.abc
import os
import sys
import time
from collections.abc import Sequence

from absl import app, flags, logging

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "TFDS data_dir to prepare into (default: $DISTILL_JAX_DATA_DIR, else "
    "~/.cache/distill_jax/tfds).")
_FILE_FORMAT = flags.DEFINE_string(
    "file_format", "array_record",
    "TFDS file format; training needs random access, i.e. array_record (or parquet).")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None,
    "For data sets whose files must be downloaded by hand (e.g. imagenet2012): where they are.")
_CONNECT_TIMEOUT = flags.DEFINE_float(
    "connect_timeout", 10.0,
    "Seconds to wait for each download host (tried once, before anything is written).")


def unreachable(name: str, urls: Sequence[str], timeout: float) -> str | None:
  """Why `name`'s downloads cannot start (one line), or None: each URL's host (or the proxy
  the environment sets for its scheme, as `requests` would use) is connected to once, within
  `timeout` seconds, name resolution included."""
  import socket
  import threading
  import urllib.parse
  import urllib.request

  proxies = urllib.request.getproxies()
  for host, port, scheme in sorted({(u.hostname, u.port or (443 if u.scheme == "https" else 80),
                                     u.scheme) for u in map(urllib.parse.urlsplit, urls)
                                    if u.hostname}):
    proxy = None if urllib.request.proxy_bypass(host) else proxies.get(scheme)
    target = urllib.parse.urlsplit(proxy if "//" in proxy else f"//{proxy}") if proxy else None
    address = (target.hostname, target.port or 80) if target else (host, port)
    outcome: list[BaseException | None] = []

    def connect(address: tuple[str, int] = address, outcome: list = outcome) -> None:
      try:
        socket.create_connection(address, timeout=timeout).close()
        outcome.append(None)
      except OSError as e:
        outcome.append(e)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout.
    thread.start()
    thread.join(timeout + 1)
    error = outcome[0] if outcome else TimeoutError(f"no answer within {timeout:g} s")
    if error is not None:
      via = f" through the proxy {address[0]}:{address[1]} (${scheme.upper()}_PROXY)" if proxy \
          else ""
      return (f"{name} downloads from {host}:{port}, which cannot be reached{via}: "
              f"{type(error).__name__}: {error}. Prepare it on a machine with internet access "
              "and copy the data_dir here (nothing was written).")
  return None


def download_urls(name: str, data_dir: str) -> list[str]:
  """The URLs TFDS will download `name` from (its registered checksums); none for an embedded
  set, or with --manual_dir (the files are at hand)."""
  import tensorflow_datasets as tfds

  from distill_jax.data import embedded

  if embedded.is_embedded(name) or _MANUAL_DIR.value:
    return []
  return list(tfds.builder(name, data_dir=data_dir).url_infos or {})


def _alias_importlib_resources() -> None:
  """Lets TFDS run without the `importlib_resources` backport.

  TFDS (4.9.x) looks up `importlib_resources.abc.Traversable` when it locates a
  builder's code, but only installs the backport on Python < 3.9; the standard
  library's `importlib.resources` has the same class on the Pythons we support.
  """
  try:
    importlib.import_module("importlib_resources")
  except ImportError:
    sys.modules["importlib_resources"] = importlib.resources


def prepare(name: str, data_dir: str) -> str:
  """Prepares `name` in `data_dir` (no-op if already there); returns its directory."""
  import tensorflow_datasets as tfds

  from distill_jax.data import embedded
  from distill_jax.data.text import catalog

  if embedded.is_embedded(name):
    return embedded.ensure_embedded(name, data_dir)
  kwargs = {}
  if _MANUAL_DIR.value:
    kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value)
  if name in catalog.BUILDERS:  # Text sets: the catalog's builders, without TensorFlow.
    return catalog.prepare(name, data_dir, _FILE_FORMAT.value, **kwargs)
  builder = tfds.builder(name, data_dir=data_dir, file_format=_FILE_FORMAT.value)
  builder.download_and_prepare(**kwargs)
  return os.fspath(builder.data_path)


def main(argv: Sequence[str]) -> None:
  names = argv[1:]
  if not names:
    raise app.UsageError("Name at least one data set, e.g. `prepare_data.py cifar10`.")
  _alias_importlib_resources()
  from distill_jax.data.sources import default_data_dir

  data_dir = (os.path.abspath(os.path.expanduser(_DATA_DIR.value)) if _DATA_DIR.value
              else default_data_dir())
  for name in names:  # Every download host first: offline, one line in seconds.
    problem = unreachable(name, download_urls(name, data_dir), _CONNECT_TIMEOUT.value)
    if problem:
      sys.exit(f"Error: {problem}")
  for name in names:
    start = time.time()
    logging.info("Preparing %s in %s ...", name, data_dir)
    path = prepare(name, data_dir)
    print(f"{name}: ready in {path} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
  app.run(main)
