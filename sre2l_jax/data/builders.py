"""Offline TFDS builders that write ArrayRecord and need no TensorFlow.

Images are stored as fixed-shape uint8 tensors (`tfds.features.Tensor`), not encoded
PNG/JPEG: encoding needs TensorFlow, and raw pixels are what the pipeline reads anyway.
Every builder reads files the user placed (on a local disk or in a bucket: paths go
through `files`); none downloads anything. ImageNet-1K is
the exception to the storage rule: it uses TFDS's own `imagenet2012` builder (JPEG-encoded,
variable-size images), checked up front by `check_imagenet_manual_dir`.
"""

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sre2l_jax import files

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


class MissingDataError(FileNotFoundError):
  """The files a dataset is built from are not where they are expected."""


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a numpy array (uint8 data only)."""
  data = files.read_bytes(path)
  if path.endswith('.gz'):
    data = gzip.decompress(data)
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
    if files.exists(path):
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
    paths = {split: [_find_idx(self._source_dir, f) for f in names]
             for split, names in FASHION_MNIST_FILES.items()}  # fail before writing anything
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
    features = image_features(shape, self._num_classes)
    # Position in the exported set (class-major), since TFDS shuffles records on write.
    features = tfds.features.FeaturesDict(
        {**features, 'index': tfds.features.Scalar(dtype=np.int64)})
    return tfds.core.DatasetInfo(builder=self, features=features,
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, (image, label) in enumerate(zip(self._images, self._labels)):
      yield i, {'image': image, 'label': int(label), 'index': i}


def _missing_archive(title: str, archive: str, folder: str, url: str) -> MissingDataError:
  return MissingDataError(
      f'{title} archive {archive} not found in {folder}. Download it from {url} and place it '
      f'in that folder unchanged (do not extract it), or set config.dataset.manual_dir to the '
      f'folder that holds it.')


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays only: the CIFAR batches need no more."""
  _ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
      ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('_codecs', 'encode'),  # how Python 3 writes bytes at pickle protocol 2
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'CIFAR batch refers to {module}.{name}; refusing to load.')
    return super().find_class(module, name)


def read_cifar_batch(archive_path: str, member: str, label_key: bytes):
  """One pickled batch of a CIFAR python archive: images uint8 (N, 32, 32, 3), labels (N,).

  `member` is the batch's file name inside the archive's folder (e.g. 'data_batch_1').
  """
  with files.open_file(archive_path, 'rb') as f, tarfile.open(fileobj=f, mode='r:gz') as tar:
    names = [n for n in tar.getnames() if os.path.basename(n) == member]
    if not names:
      raise ValueError(f'{archive_path} has no member {member!r}; is it the official '
                       f'python-version archive?')
    batch = _NumpyOnlyUnpickler(tar.extractfile(names[0]), encoding='bytes').load()
  data = np.asarray(batch[b'data'], np.uint8)
  labels = np.asarray(batch[label_key], np.int64)
  if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
    raise ValueError(f'{archive_path}:{member} holds data {data.shape} and {len(labels)} '
                     f'labels; expected (N, 3072) and N.')
  # Rows are channel-major: 1024 red, then 1024 green, then 1024 blue bytes.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class _CifarLocal(tfds.core.GeneratorBasedBuilder):
  """CIFAR from the official python archive in `manual_dir`."""
  VERSION = tfds.core.Version('1.0.0')
  TITLE = ''
  ARCHIVE = ''
  URL = ''
  NUM_CLASSES = 0
  LABEL_KEY = b''
  SPLIT_MEMBERS: dict[str, tuple[str, ...]] = {}

  def __init__(self, *, manual_dir: str | None = None, **kwargs):
    self._manual_dir = files.absolute(manual_dir or '.')
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=image_features((32, 32, 3),
                                                                       self.NUM_CLASSES),
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    path = os.path.join(self._manual_dir, self.ARCHIVE)
    if not files.exists(path):
      raise _missing_archive(self.TITLE, self.ARCHIVE, self._manual_dir, self.URL)
    return {split: self._generate_examples(path, members)
            for split, members in self.SPLIT_MEMBERS.items()}

  def _generate_examples(self, path, members):
    for member in members:
      images, labels = read_cifar_batch(path, member, self.LABEL_KEY)
      for i, (image, label) in enumerate(zip(images, labels)):
        yield f'{member}/{i}', {'image': image, 'label': int(label)}


class Cifar10Local(_CifarLocal):
  """CIFAR-10 from `cifar-10-python.tar.gz` in `manual_dir`."""
  TITLE = 'CIFAR-10'
  ARCHIVE = 'cifar-10-python.tar.gz'
  URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
  NUM_CLASSES = 10
  LABEL_KEY = b'labels'
  SPLIT_MEMBERS = {'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
                   'test': ('test_batch',)}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place {ARCHIVE} (from {URL}) in manual_dir.'


class Cifar100Local(_CifarLocal):
  """CIFAR-100 (fine labels) from `cifar-100-python.tar.gz` in `manual_dir`."""
  TITLE = 'CIFAR-100'
  ARCHIVE = 'cifar-100-python.tar.gz'
  URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
  NUM_CLASSES = 100
  LABEL_KEY = b'fine_labels'
  SPLIT_MEMBERS = {'train': ('train',), 'test': ('test',)}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place {ARCHIVE} (from {URL}) in manual_dir.'


def decode_rgb(data: bytes, name: str, shape=None) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 (H, W, 3); checks (H, W, 3) == `shape` when given."""
  with Image.open(io.BytesIO(data)) as image:
    array = np.asarray(image.convert('RGB'))
  if shape is not None and array.shape != tuple(shape):
    raise ValueError(f'{name} decodes to {array.shape}, expected {tuple(shape)}.')
  return array


class TinyImagenetLocal(tfds.core.GeneratorBasedBuilder):
  """Tiny-ImageNet from `tiny-imagenet-200.zip` in `manual_dir`.

  Splits 'train' (500 per class) and 'validation' (the labelled val set, 50 per class; the
  official test images carry no labels). Labels index the sorted wnids, the order
  torchvision's ImageFolder gives the reference's `train/` folder (wnids.txt is unsorted).
  """
  VERSION = tfds.core.Version('1.0.0')
  ARCHIVE = 'tiny-imagenet-200.zip'
  URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place {ARCHIVE} (from {URL}) in manual_dir.'
  SHAPE = (64, 64, 3)

  def __init__(self, *, manual_dir: str | None = None, **kwargs):
    self._manual_dir = files.absolute(manual_dir or '.')
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=image_features(self.SHAPE, 200),
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    path = os.path.join(self._manual_dir, self.ARCHIVE)
    if not files.exists(path):
      raise _missing_archive('Tiny-ImageNet', self.ARCHIVE, self._manual_dir, self.URL)
    with files.open_file(path, 'rb') as f, zipfile.ZipFile(f) as archive:
      names = archive.namelist()
      roots = [n[:-len('wnids.txt')] for n in names if os.path.basename(n) == 'wnids.txt']
      if not roots:
        raise ValueError(f'{path} has no wnids.txt; is it the official {self.ARCHIVE}?')
      root = roots[0]
      wnids = sorted(archive.read(root + 'wnids.txt').decode().split())
      annotations = archive.read(root + 'val/val_annotations.txt').decode().splitlines()
    label = {wnid: i for i, wnid in enumerate(wnids)}
    train = [(n, label[n.split('/')[-3]]) for n in sorted(names)
             if n.startswith(root + 'train/') and n.endswith('.JPEG')
             and n.split('/')[-2] == 'images']
    val = [(root + 'val/images/' + line.split('\t')[0], label[line.split('\t')[1]])
           for line in annotations if line.strip()]
    return {'train': self._generate_examples(path, train),
            'validation': self._generate_examples(path, val)}

  def _generate_examples(self, path, items):
    with files.open_file(path, 'rb') as f, zipfile.ZipFile(f) as archive:
      for name, label in items:
        image = decode_rgb(archive.read(name), f'{path}:{name}', self.SHAPE)
        yield name, {'image': image, 'label': label}


IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def check_imagenet_manual_dir(manual_dir: str) -> None:
  """Raises MissingDataError unless both ILSVRC2012 archives TFDS's builder reads are there.

  TFDS's `imagenet2012` builder silently skips a missing split and then counts the dataset
  as prepared, so the check has to come first.
  """
  missing = [f for f in IMAGENET_MANUAL_FILES
             if not files.exists(os.path.join(manual_dir, f))]
  if missing:
    raise MissingDataError(
        f'ImageNet-1K archive(s) {", ".join(missing)} not found in {manual_dir}. TFDS\'s '
        f'imagenet2012 builder reads the official ILSVRC2012_img_train.tar (the tar of '
        f'per-class tars) and ILSVRC2012_img_val.tar from its manual dir (default '
        f'<data_dir>/downloads/manual); register at https://image-net.org/download-images, '
        f'place both files there unextracted, or set config.dataset.manual_dir to their folder.')
