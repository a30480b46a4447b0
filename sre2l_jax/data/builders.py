"""Offline TFDS builders that write ArrayRecord and need no TensorFlow.

Images are stored as fixed-shape uint8 tensors (`tfds.features.Tensor`), not encoded
PNG/JPEG: encoding needs TensorFlow, and raw pixels are what the pipeline reads anyway.
Every builder reads files the user placed locally; none downloads anything.
"""

import gzip
import os
import struct

import numpy as np
import tensorflow_datasets as tfds

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


class MissingDataError(FileNotFoundError):
  """The files a dataset is built from are not where they are expected."""


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a numpy array (uint8 data only)."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4:
    raise ValueError(f'{path} is not an IDX file (too short).')
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f'{path} is not a uint8 IDX file (magic {data[:4].hex()}).')
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if payload.size != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: header says {shape}, found {payload.size} bytes.')
  return payload.reshape(shape)


def _find_idx(source_dir: str, name: str) -> str:
  for candidate in (name, name[:-3]):  # gzipped or not
    path = os.path.join(source_dir, candidate)
    if os.path.exists(path):
      return path
  raise MissingDataError(
      f'Fashion-MNIST file {name} not found in {source_dir}. Install the Debian package '
      f'(`apt-get install -y dataset-fashion-mnist`, which puts the IDX files in '
      f'{FASHION_MNIST_DIR}) or place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
      f't10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and set '
      f'config.dataset.source_dir to it.')


def image_features(shape, num_classes):
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=tuple(shape), dtype=np.uint8),
      'label': tfds.features.ClassLabel(num_classes=num_classes),
  })


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files (`source_dir`, default the Debian package's)."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = source_dir or FASHION_MNIST_DIR
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=image_features((28, 28, 1), 10),
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    paths = {split: [_find_idx(self._source_dir, f) for f in files]
             for split, files in FASHION_MNIST_FILES.items()}  # fail before writing anything
    return {split: self._generate_examples(*p) for split, p in paths.items()}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
      raise ValueError(f'{images_path} has {len(images)} images but {labels_path} has '
                       f'{len(labels)} labels.')
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[..., None], 'label': int(label)}


class DistilledImages(tfds.core.GeneratorBasedBuilder):
  """A distilled set exported by the recover stage, readable with `tfds.builder_from_directory`."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, images: np.ndarray | None = None, labels: np.ndarray | None = None,
               num_classes: int = 0, **kwargs):
    self._images, self._labels, self._num_classes = images, labels, num_classes
    super().__init__(**kwargs)

  def _info(self):
    shape = self._images.shape[1:] if self._images is not None else (None, None, None)
    return tfds.core.DatasetInfo(builder=self,
                                 features=image_features(shape, self._num_classes),
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, (image, label) in enumerate(zip(self._images, self._labels)):
      yield i, {'image': image, 'label': int(label)}
