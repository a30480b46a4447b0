"""The image sets students are trained on: the distilled set recover wrote, and the
class-balanced random real subset (the same-protocol baseline)."""

import os

import ml_collections
import numpy as np

from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import rngs
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline

BASELINES = ('random', 'hard_label')


def recovered_classes(cfg: ml_collections.ConfigDict, spec: datasets.DatasetSpec) -> int:
  """How many classes get images: classes 0..N-1 with N = recover.num_classes if set (> 0,
  smoke runs on 1000-class datasets), else all of the dataset's classes."""
  return cfg.num_classes or spec.num_classes


def distilled_dir(workdir: str) -> str:
  """Where recover writes the distilled set as a TFDS dataset."""
  return os.path.join(workdir, 'recover', 'tfds')


def distilled_set(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """The recovered images (uint8, class-major) and labels, or a clear error."""
  directory = distilled_dir(workdir)
  if not files.exists(directory):
    raise FileNotFoundError(
        f'No distilled set in {directory}. Run the recover stage first: python -m '
        f'sre2l_jax.main --config=<config> --workdir={workdir} --stages=recover')
  return export.read_tfds(export.tfds_dataset_dir(directory))


def random_subset(config: ml_collections.ConfigDict, ipc: int) -> tuple[np.ndarray, np.ndarray]:
  """A class-balanced random subset of real training images (the same-protocol baseline),
  of the classes the recover stage covers: images uint8 (C * ipc, H, W, C), labels int32."""
  spec = datasets.get_spec(config.dataset.name)
  train = pipeline.load_split(config.dataset, 'train')
  return train.class_balanced_subset(recovered_classes(config.recover, spec), ipc,
                                     rngs.numpy_rng('random_subset', config.seed))


def image_sets(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """{'distilled': (images, labels), 'random': (images, labels)} as evaluate uses them."""
  sets = {'distilled': distilled_set(workdir)}
  if 'random' in config.evaluate.baselines:
    sets['random'] = random_subset(config, config.recover.ipc)
  return sets
