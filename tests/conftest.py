"""Test set-up: 8 fake CPU devices (must happen before JAX initialises its backends)."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite's one compilation-cache policy. Compiling dominates the suite on 2 cores; many
# tests compile the same small programs, also in the subprocesses of the kill-and-resume
# tests, which inherit these variables: every program is cached, however quick to compile.
# The cache is keyed on the XLA flags too, so an AVX2 run (README) does not reuse host code.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', '/tmp/sre2l_jax_test_compilation_cache')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def fashion_mnist_tfds(tmp_path_factory):
  """A TFDS data dir with Fashion-MNIST prepared once for the whole session."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sre2l_jax.data import datasets  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.prepare(ml_collections.ConfigDict(dict(name='fashion_mnist', data_dir=data_dir)))
  return data_dir


@pytest.fixture(scope='session')
def data(tmp_path_factory):
  """Real Fashion-MNIST cut to its first 600 train / 300 test images, prepared once for the
  session: {data_dir, source_dir} (testlib.fashion_config reads it). Do not modify."""
  import testlib  # pylint: disable=g-import-not-at-top
  return testlib.cut_fashion_mnist(tmp_path_factory.mktemp('fashion_mnist_cut'))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """An empty TFDS data dir per test module (Fashion-MNIST is prepared into it on first use)."""
  return str(tmp_path_factory.mktemp('tfds'))


def pytest_configure(config):
  del config
  assert jax.device_count() == 8, 'tests expect 8 fake CPU devices'
