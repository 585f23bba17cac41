"""Test set-up: 8 fake CPU devices, so pmap and meshes have something to split over.

XLA reads the flag when jax initialises its backend, so it is set here, before any
test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the whole session (the embedded sets build there once)."""
  return str(tmp_path_factory.mktemp("tfds"))
