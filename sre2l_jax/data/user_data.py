"""Datasets by kind: the user's image folder, one `.npz` of arrays, or a prepared TFDS dataset.

  dataset.name='image_folder'  dataset.train_dir / dataset.test_dir hold one sub-folder per
      class (class names: the sub-folders' names, sorted, torchvision's ImageFolder order),
      PNG / JPEG / WebP of any size and mode; each image is converted to
      `dataset.channels` (1: grey, 3: RGB; converted images are counted and said once),
      resized so that its shorter side is `dataset.image_size` and centre-cropped square.
      Files with other extensions are skipped and counted (said once); an unreadable image
      is refused, naming the file. Records are stored in file-name order across the classes
      (ties: class order), not TFDS's hash order, so that the order is the user's to choose.
  dataset.name='arrays'  `dataset.arrays_file`, one `.npz` with x_train, y_train, x_test,
      y_test (uint8 images (N, H, W) or (N, H, W, C), integer labels) and optionally
      class_names; records in the arrays' order.
  dataset.name='tfds:NAME'  a TFDS dataset already prepared (ArrayRecord) in
      `dataset.data_dir` with 'image' and 'label' features, read without TensorFlow.

The folder and the arrays are decoded once into the named datasets' prepared format (TFDS
ArrayRecord of fixed-shape uint8 tensors) under `data_dir/sre2l_user/<kind>-<digest>/`,
the digest taken over the listing (relative path, size, modification time of each file) and
the settings that shape the records: a changed folder is prepared afresh, never a stale copy
reused, and a failed preparation leaves every prepared dataset as it was. Every check on
the input runs before a record is written. The normalisation is the config's
(`dataset.mean` / `dataset.std`) or, when these are empty, the training split's per-channel
pixel mean and std, computed in one pass and stored beside the prepared files (`STATS`).
"""

import contextlib
import dataclasses
import hashlib
import json
import os

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sre2l_jax import files
from sre2l_jax.data import builders

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp')
STATS = 'sre2l_stats.json'  # beside the prepared files: mean, std, class names
KINDS = ('image_folder', 'arrays')
TFDS_PREFIX = 'tfds:'


def is_kind(name: str) -> bool:
  """Whether dataset `name` is one of this module's kinds (not a registered dataset)."""
  return name in KINDS or name.startswith(TFDS_PREFIX)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A user dataset ready to read: its builder (prepared) and what a `DatasetSpec` needs."""
  builder: tfds.core.DatasetBuilder
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str
  test_split: str
  source: str  # what the records were read from, for messages
  identity: str  # the kind and a digest of the content (see the module docstring)


# ----------------------------------------------------------------------------- image folder


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The images of an image folder's splits: [(path, label)] in record order, the class
  names in label order, and how many non-image files were skipped."""
  class_names: tuple[str, ...]
  splits: dict
  skipped: int


def _class_folders(root: str, what: str) -> list[str]:
  if not root:
    raise ValueError(f'dataset.name=image_folder needs dataset.{what}_dir: a folder with one '
                     f'sub-folder of images per class.')
  if not os.path.isdir(root):
    raise ValueError(f'dataset.{what}_dir={root} is not a folder; set it to a folder with '
                     f'one sub-folder of images per class.')
  names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  if not names:
    raise ValueError(f'dataset.{what}_dir={root} has no class sub-folders; put each class\'s '
                     f'images in a sub-folder named after the class.')
  return names


def images_of(folder: str) -> tuple[list[str], int]:
  """(sorted image file names, count of other files) in `folder`."""
  names = sorted(e.name for e in os.scandir(folder) if e.is_file())
  images = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
  return images, len(names) - len(images)


def list_image_folder(train_dir: str, test_dir: str) -> FolderListing:
  """Checks both splits' folders and lists their images (nothing is decoded).

  Raises ValueError, naming what to fix, for a missing folder, a class folder without
  images, a test class that training lacks.
  """
  classes = _class_folders(train_dir, 'train')
  test_classes = _class_folders(test_dir, 'test')
  missing = [c for c in test_classes if c not in classes]
  if missing:
    raise ValueError(f'dataset.test_dir={test_dir} has class folder(s) {missing[:5]} that '
                     f'dataset.train_dir={train_dir} lacks; the classes are the training '
                     f'folder\'s sub-folders, so add them there or remove them from the test '
                     f'folder.')
  label = {c: i for i, c in enumerate(classes)}
  splits, skipped = {}, 0
  for split, root, names in (('train', train_dir, classes), ('test', test_dir, test_classes)):
    items = []
    for name in names:
      images, others = images_of(os.path.join(root, name))
      skipped += others
      if not images:
        raise ValueError(f'Class folder {os.path.join(root, name)} has no images '
                         f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder.')
      items += [(image, label[name]) for image in images]
    # File-name order across the classes (see the module docstring).
    splits[split] = [(os.path.join(root, classes[c], n), c) for n, c in sorted(items)]
  return FolderListing(tuple(classes), splits, skipped)


def listing_digest(listing: FolderListing, *settings) -> str:
  """A digest of every listed file's (path, size, modification time) and `settings`."""
  h = hashlib.sha256(json.dumps([list(listing.class_names), list(map(str, settings))]).encode())
  for split in sorted(listing.splits):
    for path, label in listing.splits[split]:
      stat = os.stat(path)
      h.update(f'{split}\0{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:16]


def read_image(path: str, size: int, channels: int) -> tuple[np.ndarray, bool]:
  """An image file -> (uint8 (size, size, channels), whether its mode was converted).

  The shorter side is resized to `size` (PIL bilinear), then the centre square is kept.
  """
  mode = 'L' if channels == 1 else 'RGB'
  try:
    with Image.open(path) as image:
      converted = image.mode != mode
      image = image.convert(mode)
      width, height = image.size
      if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
      array = np.asarray(image, np.uint8)
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f'{path} is not a readable image ({" ".join(str(e).split())}); delete '
                     f'or replace it.') from None
  return (array[..., None] if channels == 1 else array), converted


class ImageFolderLocal(tfds.core.GeneratorBasedBuilder):
  """An image folder's splits (`FolderListing`) as fixed-shape uint8 records."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, listing: FolderListing | None = None, image_size: int = 0,
               channels: int = 3, **kwargs):
    self._listing, self._size, self._channels = listing, image_size, channels
    super().__init__(**kwargs)

  def _info(self):
    # disable_shuffling: the records in the order given, not TFDS's hash order.
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=('image', 'label'), disable_shuffling=True,
        features=builders.image_features((self._size, self._size, self._channels),
                                         len(self._listing.class_names)))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, items)
            for split, items in self._listing.splits.items()}

  def _generate_examples(self, split, items):
    converted = 0
    for i, (path, label) in enumerate(items):
      image, was_converted = read_image(path, self._size, self._channels)
      converted += was_converted
      yield i, {'image': image, 'label': label}
    if converted:
      logging.warning('image_folder: %d of %d %s images converted to %d channel(s) (mode %s).',
                      converted, len(items), split, self._channels,
                      'L' if self._channels == 1 else 'RGB')


# ----------------------------------------------------------------------------- arrays


def read_npz(path: str) -> dict:
  """An arrays file -> {'train': (images uint8 (N, H, W, C), labels int64), 'test': ...,
  'class_names': tuple}; every check before anything is written.

  Raises ValueError, naming what to fix, for a missing key, images that are not uint8 or not
  all of one size, labels that are not integers in range or do not match the images.
  """
  if not path:
    raise ValueError('dataset.name=arrays needs dataset.arrays_file: one .npz with x_train, '
                     'y_train, x_test, y_test (and optionally class_names).')
  if not files.exists(path):
    raise ValueError(f'dataset.arrays_file={path} does not exist.')
  try:
    data = dict(np.load(path, allow_pickle=False))
  except ValueError as e:
    if 'allow_pickle' in str(e):
      raise ValueError(f'{path}: an array holds Python objects (images of different sizes?); '
                       f'store x_train and x_test as uint8 arrays of equal-size images '
                       f'(N, H, W) or (N, H, W, C).') from None
    raise ValueError(f'{path} is not a readable .npz file ({e}).') from None
  except OSError as e:
    raise ValueError(f'{path} is not a readable .npz file ({e}).') from None
  missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in data]
  if missing:
    raise ValueError(f'{path} lacks {missing}; it needs x_train, y_train, x_test, y_test '
                     f'(uint8 images, integer labels), optionally class_names.')
  out = {}
  for split in ('train', 'test'):
    x, y = data[f'x_{split}'], data[f'y_{split}']
    if x.ndim == 3:
      x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4:
      raise ValueError(f'{path}: x_{split} is {x.dtype} {x.shape}; store uint8 images of one '
                       f'size, (N, H, W) or (N, H, W, C).')
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f'{path}: y_{split} is {y.dtype} {y.shape} for {len(x)} images; store '
                       f'one integer label per image.')
    out[split] = (x, y.astype(np.int64))
  if out['train'][0].shape[1:] != out['test'][0].shape[1:]:
    raise ValueError(f'{path}: x_train images are {out["train"][0].shape[1:]} but x_test '
                     f'images are {out["test"][0].shape[1:]}; store both at one size.')
  labels = np.concatenate([out['train'][1], out['test'][1]])
  names = data.get('class_names')
  num_classes = len(names) if names is not None else int(labels.max(initial=-1)) + 1
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(f'{path}: label {int(bad[0])} is out of range [0, {num_classes}) '
                     f'(class_names has {num_classes} names); fix the labels or the names.')
  absent = np.flatnonzero(np.bincount(out['train'][1], minlength=num_classes) == 0)
  if absent.size:
    raise ValueError(f'{path}: class(es) {absent[:5].tolist()} have no training images; '
                     f'number the classes 0..{num_classes - 1} without gaps.')
  out['class_names'] = tuple(str(n) for n in names) if names is not None else tuple(
      str(i) for i in range(num_classes))
  return out


class ArraysLocal(tfds.core.GeneratorBasedBuilder):
  """`read_npz`'s splits as fixed-shape uint8 records, in the arrays' order."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, arrays: dict | None = None, **kwargs):
    self._arrays = arrays
    super().__init__(**kwargs)

  def _info(self):
    # disable_shuffling: the records in the order given, not TFDS's hash order.
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=('image', 'label'), disable_shuffling=True,
        features=builders.image_features(self._arrays['train'][0].shape[1:],
                                         len(self._arrays['class_names'])))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ('train', 'test')}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(zip(*self._arrays[split])):
      yield i, {'image': image, 'label': int(label)}


def file_digest(path: str, *settings) -> str:
  """A digest of a file's (path, size, modification time) and `settings`."""
  stat = os.stat(path)
  text = json.dumps([os.path.realpath(path), stat.st_size, stat.st_mtime_ns,
                     list(map(str, settings))])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- tfds:NAME


def prepared_tfds_dir(data_dir: str, name: str) -> str:
  """The folder of TFDS dataset `name` ('mnist' or 'mnist/config') prepared in `data_dir`:
  its highest version. Raises ValueError when there is none."""
  root = os.path.join(data_dir, name)
  versions = []
  if os.path.isdir(root):
    versions = [v for v in os.listdir(root)
                if os.path.exists(os.path.join(root, v, 'dataset_info.json'))]
  if not versions:
    raise ValueError(f'dataset.name={TFDS_PREFIX}{name}: no prepared dataset in {root} '
                     f'(a version folder with dataset_info.json). Prepare it with TFDS '
                     f'(file_format=array_record) and set dataset.data_dir to its data dir.')
  version = max(versions, key=lambda v: tuple(int(p) if p.isdigit() else -1
                                              for p in v.split('.')))
  return os.path.join(root, version)


def open_tfds(data_dir: str, name: str) -> tfds.core.DatasetBuilder:
  """The prepared TFDS dataset `name` in `data_dir`, checked: ArrayRecord files, an 'image'
  feature and a 'label' ClassLabel."""
  builder = tfds.builder_from_directory(prepared_tfds_dir(data_dir, name))
  features = builder.info.features
  if 'image' not in features or 'label' not in features or not isinstance(
      features['label'], tfds.features.ClassLabel):
    raise ValueError(f'{builder.data_dir}: {name} has features {list(features)}; '
                     f'{TFDS_PREFIX}NAME reads an \'image\' feature and a \'label\' ClassLabel.')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(f'{builder.data_dir}: {name} is stored as {builder.info.file_format.value}; '
                     f'prepare it with file_format=array_record (read without TensorFlow).')
  return builder


def tfds_splits(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """(training split, evaluation split): 'train', and 'test' or else 'validation'."""
  splits = builder.info.splits
  test = next((s for s in ('test', 'validation') if s in splits), None)
  if 'train' not in splits or test is None:
    raise ValueError(f'{builder.data_dir} has splits {list(splits)}; {TFDS_PREFIX}NAME needs '
                     f'\'train\' and \'test\' (or \'validation\').')
  return 'train', test


# ----------------------------------------------------------------------------- statistics


def pixel_statistics(source, channels: int, chunk: int = 4096) -> tuple[list, list]:
  """Per-channel mean and std of a split's pixels in [0, 1], in one pass (float64 sums)."""
  total = np.zeros(channels)
  squares = np.zeros(channels)
  count = 0
  for start in range(0, len(source), chunk):
    records = source.__getitems__(list(range(start, min(len(source), start + chunk))))
    for record in records:
      x = np.asarray(record['image'], np.float64).reshape(-1, channels) / 255.0
      total += x.sum(0)
      squares += (x * x).sum(0)
      count += len(x)
  mean = total / max(count, 1)
  std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0.0))
  return mean.tolist(), np.maximum(std, 1e-6).tolist()


def read_or_compute_stats(builder, train_split: str, channels: int) -> dict:
  """`STATS` beside the prepared files; computed and written on first use."""
  path = os.path.join(builder.data_dir, STATS)
  if files.exists(path):
    return files.read_json(path)
  mean, std = pixel_statistics(builder.as_data_source(split=train_split), channels)
  stats = {'mean': mean, 'std': std}
  files.atomic_write(path, json.dumps(stats))
  return stats


# ----------------------------------------------------------------------------- preparing


def _build(builder) -> None:
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')


# prepare()'s results for arrays files, keyed by the dataset config, the data dir and the
# file's (path, size, modification time): every stage asks for the dataset's spec, and each
# ask read and checked the whole file again (gigabytes for a large one).
_PREPARED_ARRAYS = {}
# prepare()'s results within `one_look_per_run` (None outside), keyed by the dataset config
# and the data dir.
_RUN_LOOKS: dict | None = None


@contextlib.contextmanager
def one_look_per_run():
  """Within (one run of the stages: `runner.run`), each user dataset is listed, checked and
  prepared at its first use only: the stages ask for the dataset's spec many times in a run
  (9 in squeeze and recover of the smoke config), and each ask of an image folder's listed
  it and stat'ed every file for its digest (a million files for ImageNet). One look also
  keeps the run's stages on the same data when the folder changes under a running job.
  Outside, every ask looks again: a Colab session that changes its folder between two runs
  gets the change. Nested: the outer run's looks."""
  global _RUN_LOOKS
  outer = _RUN_LOOKS
  if outer is None:
    _RUN_LOOKS = {}
  try:
    yield
  finally:
    _RUN_LOOKS = outer


def prepare(config, data_dir: str, build: bool = True) -> Prepared:
  """Checks the user's data named by dataset config `config` and prepares it once (when
  `build`; other processes open what process 0 built). Returns what the stages need.
  Within `one_look_per_run`, a dataset looked at before in the run is not looked at again;
  an arrays file already checked and prepared in this process, unchanged since, is not
  read again."""
  if _RUN_LOOKS is None:
    return _prepare_unless_read(config, data_dir, build)
  key = _settings_key(config, data_dir)
  if key not in _RUN_LOOKS:
    _RUN_LOOKS[key] = _prepare_unless_read(config, data_dir, build)
  return _RUN_LOOKS[key]


def _prepare_unless_read(config, data_dir: str, build: bool) -> Prepared:
  path = config.get('arrays_file') if config.name == 'arrays' else ''
  if not path or not os.path.isfile(path):
    return _prepare(config, data_dir, build)
  key = _settings_key(config, data_dir) + (file_digest(path),)
  if key not in _PREPARED_ARRAYS:
    _PREPARED_ARRAYS[key] = _prepare(config, data_dir, build)
  return _PREPARED_ARRAYS[key]


def _settings_key(config, data_dir: str) -> tuple:
  return json.dumps(config.to_dict(), sort_keys=True, default=str), data_dir


def _prepare(config, data_dir: str, build: bool) -> Prepared:
  name = config.name
  channels = int(config.get('channels') or 3)
  if name == 'image_folder':
    size = int(config.get('image_size') or 0)
    if size <= 0 or channels not in (1, 3):
      raise ValueError(f'dataset.name=image_folder needs dataset.image_size > 0 (got {size}) '
                       f'and dataset.channels 1 or 3 (got {channels}).')
    listing = list_image_folder(config.get('train_dir'), config.get('test_dir'))
    if listing.skipped:
      logging.warning('image_folder: %d non-image file(s) skipped (only %s are read).',
                      listing.skipped, ', '.join(IMAGE_EXTENSIONS))
    digest = listing_digest(listing, size, channels)
    builder = ImageFolderLocal(
        listing=listing, image_size=size, channels=channels, file_format='array_record',
        data_dir=os.path.join(data_dir, 'sre2l_user', f'image_folder-{digest}'))
    class_names, source, splits = listing.class_names, config.train_dir, ('train', 'test')
    identity = f'image_folder-{digest}'
  elif name == 'arrays':
    path = config.get('arrays_file')
    arrays = read_npz(path)
    identity = f'arrays-{file_digest(path)}'
    builder = ArraysLocal(arrays=arrays, file_format='array_record',
                          data_dir=os.path.join(data_dir, 'sre2l_user', identity))
    class_names, source, splits = arrays['class_names'], path, ('train', 'test')
  elif name.startswith(TFDS_PREFIX):
    builder = open_tfds(data_dir, name[len(TFDS_PREFIX):])
    class_names = tuple(builder.info.features['label'].names)
    source, splits = builder.data_dir, tfds_splits(builder)
    identity = name + '/' + os.path.basename(builder.data_dir)
  else:
    raise ValueError(f'Unknown dataset kind {name!r}; valid: {list(KINDS)} or '
                     f'{TFDS_PREFIX}NAME.')
  if build:
    _build(builder)
  shape = builder.info.features['image'].shape
  if len(shape) != 3 or None in shape:
    raise ValueError(f'{source}: images of shape {shape}; the stages need one (H, W, C) '
                     f'(prepare the dataset at a fixed size).')
  stats = read_or_compute_stats(builder, splits[0], shape[-1])
  mean = tuple(config.get('mean') or stats['mean'])
  std = tuple(config.get('std') or stats['std'])
  if len(mean) != shape[-1] or len(std) != shape[-1]:
    raise ValueError(f'dataset.mean={mean} / dataset.std={std}: give one value per channel '
                     f'({shape[-1]}), or leave them empty to use the training images\'.')
  return Prepared(builder, tuple(class_names), tuple(shape), mean, std, *splits, source,
                  identity)
