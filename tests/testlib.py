"""Helpers shared by the tests: config files, random teachers, kill-and-resume, running main.

  load_config(name, arg)          configs/<name>.py's get_config(arg)
  fashion_config(data, overrides) a Fashion-MNIST config on a cut data dir, keys overridden
  write_noise_set(workdir, ipc)   a class-major distilled set of uniform noise in `workdir`
  copy_workdir(source, path)      a copy of a shared (read-only) workdir to change
  random_teacher(config, ...)     (model, variables) of config.teacher with random weights
  write_teacher(config, workdir)  the same, saved where squeeze saves a trained one
  context_of(config, workdir)     the stages' context (`context.resolve`), spec/mesh replaced
  run_stage(module, config, workdir)   module.run with the context resolved, as the runner does
  main_command(name, workdir, stages=...)   argv of `python -m sre2l_jax.main`
  run_command(command)            runs it from the repository root; asserts it succeeded
  kill_when(command, ready, log)  starts it, SIGKILLs it as soon as ready() holds
  checkpoint_steps(directory)     finalized Orbax steps; restore_checkpoint(directory, step)
  assert_share_of(top1, count)    a top-1 counts exactly `count` images
  network_differences(a, b, ...)  two trained networks compared by what an equivalence claim
                                  is about (see its docstring for the tolerance argument)
"""

import functools
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from sre2l_jax import checkpoint
from sre2l_jax import config_lib
from sre2l_jax import context
from sre2l_jax import export
from sre2l_jax import image_sets
from sre2l_jax import models
from sre2l_jax import teacher as teacher_lib
from sre2l_jax.data import batching
from sre2l_jax.data import builders
from sre2l_jax.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- configs


def config_file(name: str) -> str:
  """The path of configs/<name>.py."""
  return os.path.join(REPO, 'configs', f'{name}.py')


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of configs/<name>.py."""
  return config_lib.load_config_file(config_file(name), arg)


def fashion_config(data: dict, overrides: dict | None = None, *,
                   name: str = 'fashion_mnist_ipc10', arg: str = 'smoke'):
  """configs/<name>.py:<arg> reading the cut Fashion-MNIST of `data` (conftest's
  `fashion_mnist_cut`: {data_dir, source_dir}), with {'section.key': value} `overrides`."""
  config = load_config(name, arg)
  config.dataset.update(data_dir=data['data_dir'], source_dir=data['source_dir'])
  for key, value in (overrides or {}).items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def context_of(config, workdir: str = '', *, spec=None, mesh=None) -> context.Context:
  """The stages' context of `config` on `workdir`, as `context.resolve` makes it, with `spec`
  or `mesh` given instead (a validation test of a dataset that is not at hand)."""
  spec = datasets.spec_of(config.dataset) if spec is None else spec
  mesh = batching.create_mesh(config.mesh_shape) if mesh is None else mesh
  return context.Context(spec=spec, mesh=mesh, num_classes=spec.num_classes,
                         teacher_dir=teacher_lib.teacher_dir(config, workdir))


def run_stage(module, config, workdir: str) -> dict:
  """`module.run` (a stage) of `config` on `workdir`, its context resolved as the runner does."""
  return module.run(config, workdir, context.resolve(config, workdir))


# ----------------------------------------------------------------------------- workdirs


def write_noise_set(workdir: str, ipc: int, seed: int = 0, spec_name: str = 'fashion_mnist'):
  """A class-major 'distilled' set of uniform uint8 noise, `ipc` images per class, written
  where recover writes one: (images, labels)."""
  spec = datasets.get_spec(spec_name)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (spec.num_classes * ipc,) + spec.image_shape, dtype=np.uint8)
  labels = np.repeat(np.arange(spec.num_classes), ipc).astype(np.int32)
  export.write_tfds(image_sets.distilled_dir(workdir), images, labels, spec.num_classes)
  return images, labels


def copy_workdir(source, path) -> str:
  """A copy of workdir `source` at `path` (a module's shared workdir stays untouched)."""
  shutil.copytree(source, path)
  return str(path)


# ----------------------------------------------------------------------------- teachers


@functools.lru_cache
def _measure_statistics_fn(model, spec):
  """Jitted (params, key) -> BN-input statistics of `model` on 64 random smooth images."""
  low, high = datasets.pixel_bounds(spec)
  height, width, channels = spec.image_shape
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + spec.image_shape), train=False))
  init_stats = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, x.dtype),
                                      abstract['batch_stats'])

  @jax.jit
  def measure(params, key):
    # Random blobs: noise at a quarter of the resolution, upsampled, inside the pixel range.
    blobs = jax.image.resize(
        jax.random.normal(key, (64, height // 4, width // 4, channels)),
        (64,) + spec.image_shape, 'linear')
    blobs = jnp.clip(1.5 * blobs + 0.3, low, high)
    _, state = model.apply({'params': params, 'batch_stats': init_stats}, blobs, train=True,
                           mutable=['batch_stats', models.BN_INPUTS])
    stats = {}
    for path, x in models.iter_in_call_order(state[models.BN_INPUTS]):
      stats[path[-1][:-len('_input')]] = {'mean': jnp.mean(x, (0, 1, 2)),
                                          'var': jnp.var(x, (0, 1, 2))}
    return stats

  return measure


def random_teacher(config, seed: int = 0, *, statistics: str = 'random',
                   var_scale: float = 1.0):
  """config.teacher for config.dataset with random weights: (model, variables).

  Drawn on the host from the model's shapes (nothing compiled): kernels N(0, 1/fan_in), BN
  scales U(0.5, 1.5), every bias N(0, 0.2). The BN running statistics are
    'random'    means N(0, 0.5), variances U(0.2, 2): non-trivial, so that a layout or
                normalisation slip shows; no image need reach them.
    'measured'  those of the teacher's own BN inputs on random smooth images (as a BN
                network holds after training on them), so that recover can approach them;
                ConvNet-BN only (one jitted forward pass).
  `var_scale` multiplies the first BN layer's running variances (bn0): a poisoned teacher.
  """
  spec = datasets.get_spec(config.dataset.name)
  model = models.create_model(config.teacher, spec.num_classes)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + spec.image_shape), train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0.0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape)
    if name == 'scale':
      return rng.uniform(0.5, 1.5, leaf.shape)
    if name == 'mean':
      return rng.normal(0.0, 0.5, leaf.shape)
    if name == 'var':
      return rng.uniform(0.2, 2.0, leaf.shape)
    return rng.normal(0.0, 0.2, leaf.shape)  # conv, dense and BN biases

  to_jax = lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(draw(p, x), jnp.float32), tree)
  params = to_jax(abstract['params'])
  if statistics == 'measured':
    stats = _measure_statistics_fn(model, spec)(params, jax.random.PRNGKey(seed))
  elif statistics == 'random':
    stats = to_jax(abstract['batch_stats'])
  else:
    raise ValueError(f"statistics={statistics!r}; valid: 'random', 'measured'.")
  if var_scale != 1.0:
    stats['bn0']['var'] = stats['bn0']['var'] * var_scale
  return model, {'params': params, 'batch_stats': stats}


def write_teacher(config, workdir: str, **kwargs):
  """A `random_teacher(config, **kwargs)` saved as workdir's squeezed teacher, replacing
  any there: (model, variables)."""
  model, variables = random_teacher(config, **kwargs)
  spec = datasets.get_spec(config.dataset.name)
  teacher_lib.save(os.path.join(workdir, 'squeeze', 'teacher'), variables,
                   teacher_lib.teacher_meta(config, spec), overwrite=True)
  return model, variables


# ----------------------------------------------------------------------------- main


def main_command(name: str, workdir, *, stages: str, arg: str = 'smoke',
                 overrides: dict | None = None, flags=()) -> list[str]:
  """argv of `python -m sre2l_jax.main --config=configs/<name>.py:<arg>`, with
  --config.<key>=<value> for every item of `overrides` and the extra `flags`."""
  config = config_file(name) + (f':{arg}' if arg else '')
  return ([sys.executable, '-m', 'sre2l_jax.main', *flags, f'--config={config}',
           f'--workdir={workdir}', f'--stages={stages}'] +
          [f'--config.{k}={v}' for k, v in (overrides or {}).items()])


def run_command(command: list[str], *, env: dict | None = None,
                timeout_s: float = 300) -> subprocess.CompletedProcess:
  """Runs `command` from the repository root to its end; asserts that it succeeded."""
  completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout_s, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  return completed


def kill_when(command: list[str], ready, log_path, *, env: dict | None = None,
              timeout_s: float = 300) -> None:
  """Starts `command` from the repository root and SIGKILLs it as soon as `ready()` is true
  (polled every 2 ms), e.g. once its first checkpoint is finalized.

  Fails the test, with the end of the process's output (written to `log_path`), if the
  process ends by itself first or `ready()` is still false after `timeout_s` seconds.
  """
  with open(log_path, 'w') as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    try:
      deadline = time.time() + timeout_s
      while not (ready_now := ready()):
        if process.poll() is not None or time.time() > deadline:
          break
        time.sleep(0.002)
      if ready_now:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
  if not ready_now:
    with open(log_path) as f:
      pytest.fail(f'The process ended (rc {process.returncode}) or ran {timeout_s} s before '
                  f'it was ready to be killed:\n{f.read()[-3000:]}')
  assert process.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------- equivalence


def assert_share_of(fraction: float, count: int) -> None:
  """`fraction` (a top-1) is k / count for a whole k: it counts `count` images, not padding
  rows or another split's."""
  images = round(fraction * count)
  assert abs(fraction * count - images) < 1e-6 * count and 0 <= images <= count, (fraction, count)


def is_redundant(path: str) -> bool:
  """Whether a variable of a ConvNet-BN (flattened path, '/'-joined) has no real gradient:
  the convolutions' biases, each fed straight into a BatchNorm that subtracts it again, and
  the BatchNorm running means that track them.

  In training mode the loss does not depend on such a bias, so its computed gradient is
  float32 rounding noise (~1e-7 of the activations); Adam divides every gradient by its own
  running RMS, so a fresh Adam moves it by about +-lr per step in whatever direction the noise
  points. Two programs that round differently (another instruction set, devices, a stacked
  step) therefore end with such biases ~lr x steps apart whatever their algebra; only the
  networks' function and the other parameters carry the claim. (ResNets have no such biases.)
  """
  name = path.split('/')
  return ((name[0] == 'params' and name[-1] == 'bias' and name[-2].startswith('conv')) or
          (name[0] == 'batch_stats' and name[-1] == 'mean'))


def network_differences(model, a: dict, b: dict, images) -> dict:
  """Two networks' variables ({'params', 'batch_stats'}) compared by what they compute.

  Returns {'logits': max |logits_a - logits_b| / max |logits_b| on `images` (eval mode),
  'params': the largest relative L2 difference of a parameter tensor with a real gradient,
  'param_name': its path, 'redundant': the largest of the `is_redundant` ones (reported for
  the record, not a claim)}.
  """
  flat_a = traverse_util.flatten_dict(jax.device_get(a), sep='/')
  flat_b = traverse_util.flatten_dict(jax.device_get(b), sep='/')
  assert flat_a.keys() == flat_b.keys(), (flat_a.keys() ^ flat_b.keys())
  out = {'params': 0.0, 'param_name': None, 'redundant': 0.0}
  for key in flat_a:
    x, y = np.asarray(flat_a[key], np.float64), np.asarray(flat_b[key], np.float64)
    drift = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))
    if is_redundant(key):
      out['redundant'] = max(out['redundant'], drift)
    elif key.startswith('params/') and drift >= out['params']:
      out['params'], out['param_name'] = drift, key
  logits_a, logits_b = (np.asarray(model.apply(v, images, train=False), np.float64)
                        for v in (a, b))
  out['logits'] = float(np.abs(logits_a - logits_b).max() / np.abs(logits_b).max())
  return out


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_steps(directory) -> list[int]:
  """The finalized steps of an Orbax checkpoint directory (none if it does not exist)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def restore_checkpoint(directory, step: int | None = None):
  """(step, state as numpy arrays) of a checkpoint under `directory` (the latest by default)."""
  manager = checkpoint.create_manager(str(directory))
  step = step or manager.latest_step()
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, jax.tree_util.tree_map(np.asarray, state)


def write_idx(path, array):
  """`array` (uint8) as an IDX file (the Fashion-MNIST format) at `path`."""
  with open(path, 'wb') as f:
    f.write(struct.pack('>HBB', 0, 0x08, array.ndim))
    f.write(struct.pack(f'>{array.ndim}I', *array.shape))
    f.write(np.ascontiguousarray(array, np.uint8).tobytes())


def cut_fashion_mnist(root, train: int = 600, test: int = 300) -> dict:
  """A TFDS data dir of real Fashion-MNIST cut to its first `train` / `test` images, built
  under `root` (a pathlib folder). Returns the dataset config keys {data_dir, source_dir}."""
  source = root / 'idx'
  source.mkdir()
  sizes = {'train': train, 'test': test}
  for split, names in builders.FASHION_MNIST_FILES.items():
    for name in names:
      array = builders.read_idx(os.path.join(builders.FASHION_MNIST_DIR, name))
      write_idx(source / name[:-len('.gz')], array[:sizes[split]])
  out = {'data_dir': str(root / 'tfds'), 'source_dir': str(source)}
  datasets.prepare(ml_collections.ConfigDict(dict(name='fashion_mnist', **out)))
  return out


class BatchesOnly:
  """A split that gives its candidates only in batches, like a streamed one (no
  class_balanced_subset), counting the most images it handed out at once."""

  def __init__(self, split):
    self.split, self.most = split, 0

  def candidate_batches(self, *args):
    for images, labels, ids in self.split.candidate_batches(*args):
      self.most = max(self.most, len(images))
      yield images, labels, ids

  def take(self, ids):
    self.most = max(self.most, len(ids))
    return self.split.take(ids)
