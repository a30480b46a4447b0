"""The Python API beside the command line: distil, load a distilled set, evaluate one.

  import sre2l_jax
  sre2l_jax.distill('fashion_mnist_ipc10:smoke', 'runs/fm')       # every configured stage
  images, labels, class_names = sre2l_jax.load_distilled('runs/fm')
  result = sre2l_jax.evaluate_set('fashion_mnist_ipc10:smoke', 'runs/fm')

A config is a `ml_collections.ConfigDict` (e.g. `config_lib.load_config_file(...)` with
keys changed) or the `--config` value of the command line: a shipped config's name or a
config file's path, with its ':arg' ('fashion_mnist_ipc10:smoke,ipc=1').
"""

import os

import ml_collections
import numpy as np

from sre2l_jax import config_lib
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import multihost
from sre2l_jax import runner
from sre2l_jax.data import datasets


def as_config(config) -> ml_collections.ConfigDict:
  """`config` itself (a ConfigDict), or the config a `--config` value names."""
  if isinstance(config, ml_collections.ConfigDict):
    return config
  path, _, arg = str(config).partition(':')
  return config_lib.load_config_file(path, arg or None)


def distill(config, workdir: str, stages=None) -> dict:
  """Runs `stages` (default `config.stages`: squeeze, recover, relabel, evaluate) of
  `config` on `workdir`, as `sre2l-jax --config=... --workdir=...` does; resumes a workdir
  that holds part of a run. Returns {stage: its result} (None for a stage that had finished
  already)."""
  config = as_config(config)
  multihost.set_cpu_devices(config.get('cpu_devices', 0))  # if JAX has not started yet
  return runner.run(config, workdir, list(stages or config.stages))


def load_distilled(workdir: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The distilled set a run recovered in `workdir`: images uint8 (N, H, W, C) class-major,
  labels int32 (N,), and the dataset's class names in label order."""
  images, labels = image_sets.distilled_set(workdir)
  config = ml_collections.ConfigDict(config_lib.upgrade(
      files.read_json(os.path.join(workdir, 'config.json'))))
  return images, labels, datasets.class_names(config.dataset)


def evaluate_set(config, workdir: str, images_dir: str = '') -> dict:
  """Trains and tests `config.evaluate`'s students on the distilled set of `workdir`, or on
  the image folder `images_dir` (a set made elsewhere: evaluate.images_dir), and on the
  same-protocol baselines (the evaluate stage; the teacher is `workdir`'s or
  squeeze.teacher_dir). Returns evaluate/result.json's content: {'variants': {name:
  {'test_top1_mean', 'test_top1_std', 'test_top1' (per seed), ...}}, ...}."""
  config = as_config(config)
  if images_dir:
    config.evaluate.images_dir = images_dir
  return distill(config, workdir, ['evaluate'])['evaluate']
