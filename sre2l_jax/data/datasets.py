"""Dataset registry: one `DatasetSpec` per supported dataset, and loading into host memory.

Normalisation constants, resolutions and the training augmentation of every dataset live
here and nowhere else.
"""

import dataclasses
import json
import os
from typing import Callable, Sequence
import zipfile

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from sre2l_jax import files
from sre2l_jax.data import builders
from sre2l_jax.data import user_data

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the stages need to know about a dataset.

  image_shape: (H, W, C) the models see. train_augment: 'pad_crop_flip' (small images),
  'random_resized_crop_flip' (large images held in memory) or 'flip' (the host already
  cropped, see `streaming`). in_memory: whether a split fits in host RAM as uint8 arrays.
  check_source: called before a first build to fail early when the raw files are missing.
  class_names: the classes' names in label order (read offline; see `class_names`).
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_augment: str
  make_builder: Callable[[ml_collections.ConfigDict], tfds.core.DatasetBuilder]
  train_split: str = 'train'
  test_split: str = 'test'
  in_memory: bool = True
  pad: int = 4
  check_source: Callable[[ml_collections.ConfigDict], None] | None = None
  class_names: Callable[[ml_collections.ConfigDict], Sequence[str]] | None = None


def _data_dir(config) -> str:
  return os.path.expanduser(config.get('data_dir') or '~/tensorflow_datasets')


def manual_dir(config) -> str:
  """Where the user put the raw archives: manual_dir, else source_dir, else TFDS's default."""
  path = (config.get('manual_dir') or config.get('source_dir')
          or os.path.join(_data_dir(config), 'downloads', 'manual'))
  return os.path.expanduser(path)


FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# The archives' own `label_names` / `fine_label_names`, in label order.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')
CIFAR100_CLASSES = tuple('''
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house
    kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
    mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
    shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
    tank telephone television tiger tractor train trout tulip turtle wardrobe whale
    willow_tree wolf woman worm'''.split())


def _tiny_imagenet_classes(config) -> list[str]:
  """The first name of each class in `words.txt` of the zip, in label order (sorted wnids,
  as `builders.TinyImagenetLocal` numbers them)."""
  path = os.path.join(manual_dir(config), builders.TinyImagenetLocal.ARCHIVE)
  with files.open_file(path, 'rb') as f, zipfile.ZipFile(f) as archive:
    root = next(n[:-len('wnids.txt')] for n in archive.namelist()
                if os.path.basename(n) == 'wnids.txt')
    wnids = sorted(archive.read(root + 'wnids.txt').decode().split())
    words = dict(line.split('\t', 1) for line in
                 archive.read(root + 'words.txt').decode().splitlines() if '\t' in line)
  return [words.get(w, w).split(',')[0].strip() for w in wnids]


def _imagenet_classes(config) -> list[str]:
  """WordNet ids (n01440764, ...) in label order: TFDS's own list, installed with it (no
  human-readable names are available offline)."""
  del config
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.resource_path('tensorflow_datasets') / 'datasets' / 'imagenet2012' / 'labels.txt'
  return path.read_text().split()


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
  DATASETS[spec.name] = spec
  return spec


register(DatasetSpec(
    name='fashion_mnist', num_classes=10, image_shape=(28, 28, 1),
    class_names=lambda c: FASHION_MNIST_CLASSES,
    mean=(0.2860,), std=(0.3530,), train_augment='pad_crop_flip',
    make_builder=lambda c: builders.FashionMnistLocal(
        source_dir=c.get('source_dir'), data_dir=_data_dir(c), file_format='array_record')))

register(DatasetSpec(
    name='cifar10', num_classes=10, image_shape=(32, 32, 3),
    class_names=lambda c: CIFAR10_CLASSES,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), train_augment='pad_crop_flip',
    make_builder=lambda c: builders.Cifar10Local(
        manual_dir=manual_dir(c), data_dir=_data_dir(c), file_format='array_record')))

register(DatasetSpec(
    name='cifar100', num_classes=100, image_shape=(32, 32, 3),
    class_names=lambda c: CIFAR100_CLASSES,
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), train_augment='pad_crop_flip',
    make_builder=lambda c: builders.Cifar100Local(
        manual_dir=manual_dir(c), data_dir=_data_dir(c), file_format='array_record')))

register(DatasetSpec(
    name='tiny_imagenet', num_classes=200, image_shape=(64, 64, 3),
    class_names=_tiny_imagenet_classes,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, train_augment='random_resized_crop_flip',
    test_split='validation',
    make_builder=lambda c: builders.TinyImagenetLocal(
        manual_dir=manual_dir(c), data_dir=_data_dir(c), file_format='array_record')))

# TFDS's own builder: JPEG-encoded, variable-size records, decoded and cropped on the host.
register(DatasetSpec(
    name='imagenet2012', num_classes=1000, image_shape=(224, 224, 3),
    class_names=_imagenet_classes,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, train_augment='flip', test_split='validation',
    in_memory=False,
    make_builder=lambda c: tfds.builder('imagenet2012', data_dir=_data_dir(c),
                                        file_format='array_record'),
    check_source=lambda c: builders.check_imagenet_manual_dir(manual_dir(c))))


def get_spec(name: str) -> DatasetSpec:
  """The spec of registered dataset `name` (`spec_of` also knows the user's kinds)."""
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; valid datasets: {sorted(DATASETS)}, or '
                     f'{list(user_data.KINDS)} or {user_data.TFDS_PREFIX}NAME (your own data).')
  return DATASETS[name]


def identity(config: ml_collections.ConfigDict) -> str:
  """What results are keyed on: a registered dataset's name; for the user's kinds, the
  kind and a digest of the content (so a changed folder is never silently reused)."""
  return spec_of(config).name if user_data.is_kind(config.name) else config.name


# A user dataset whose training split is larger (uint8 bytes) is streamed, not held in RAM.
IN_MEMORY_BYTES = 16 << 30


def spec_of(config: ml_collections.ConfigDict) -> DatasetSpec:
  """The spec of dataset config `config`: a registered dataset's, or for the user's kinds
  (`user_data`: image_folder, arrays, tfds:NAME) one read from the data, which is checked
  and prepared here once (by process 0), so every bad input is refused before any stage."""
  if not user_data.is_kind(config.name):
    return get_spec(config.name)
  check_user_data_dir(config)
  first = jax.process_index() == 0
  prepared = user_data.prepare(config, _data_dir(config), build=first) if first else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'prepare {config.name}')
  if not first:
    prepared = user_data.prepare(config, _data_dir(config), build=False)
  shape = prepared.image_shape
  split = prepared.builder.info.splits[prepared.train_split]
  in_memory = split.num_examples * int(np.prod(shape)) <= IN_MEMORY_BYTES
  # Small images: pad-and-crop, like CIFAR; larger ones: random resized crops, like
  # Tiny-ImageNet; streamed ones are cropped on the host (`streaming`).
  augment = ('flip' if not in_memory else
             'pad_crop_flip' if max(shape[:2]) <= 32 else 'random_resized_crop_flip')
  return DatasetSpec(
      name=prepared.identity, num_classes=len(prepared.class_names), image_shape=shape,
      mean=prepared.mean, std=prepared.std, train_augment=augment,
      make_builder=lambda c: prepared.builder, train_split=prepared.train_split,
      test_split=prepared.test_split, in_memory=in_memory,
      class_names=lambda c: prepared.class_names)


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The names of `config.name`'s classes in label order, for figures.

  Where the names cannot be read (no Tiny-ImageNet zip at hand, say), or there are not as
  many as classes, the class indices ('0', '1', ...): a name never stops a stage.
  """
  spec = spec_of(config)
  try:
    names = [str(n) for n in spec.class_names(config)] if spec.class_names else []
  except (OSError, KeyError, ValueError, StopIteration, zipfile.BadZipFile):
    names = []
  return names if len(names) == spec.num_classes else [str(i) for i in range(spec.num_classes)]


# Written beside the prepared files: where the raw files were read from.
SOURCE_RECORD = 'sre2l_source.json'


class DataSourceError(ValueError):
  """The prepared files in data_dir were built from other raw files than the config names."""


def source_of(config) -> str:
  """The folder the raw files are read from (fashion_mnist: source_dir or the Debian
  package's folder; the others: `manual_dir`)."""
  if config.name == 'fashion_mnist':
    return os.path.expanduser(config.get('source_dir') or builders.FASHION_MNIST_DIR)
  if user_data.is_kind(config.name):
    return config.get('train_dir') or config.get('arrays_file') or _data_dir(config)
  return manual_dir(config)


def _real(path: str) -> str:
  """`path` with links resolved when local (a URL as it is), for comparing places."""
  return path if files.is_remote(path) else os.path.realpath(files.absolute(path))


# A host's copy of prepared files read from a bucket: $XDG_CACHE_HOME/sre2l_jax/data (by default
# ~/.cache/sre2l_jax/data), one per host, shared by its processes.
HOST_COPY_MARK = '.sre2l_copied'


def host_copy_root() -> str:
  """Where this host keeps its copies of datasets prepared in a bucket."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(cache, 'sre2l_jax', 'data')


def with_host_copy(config, spec: DatasetSpec, copy_root: str | None = None):
  """`config` with a gs:// data_dir replaced by this host's copy of the prepared dataset.

  ArrayRecord's C++ reader opens local files only, and random access to a bucket costs a
  request per record, so each host copies the prepared folder (`<data_dir>/<name>/<version>`,
  not the raw archives) once, 16 files at a time, to `copy_root` (default `host_copy_root()`),
  and reads it from there; a copy finished earlier (its mark file written last) is reused,
  one left half-made is made again. Processes of one host share it (a lock file).
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  remote_dir = _data_dir(config)
  remote = spec.make_builder(config)  # TFDS reads a bucket through etils.epath
  if not remote.is_prepared():
    raise ValueError(
        f'dataset.data_dir={remote_dir} holds no prepared {config.name} ({remote.data_dir}): '
        f'a bucket is read here, never written (ArrayRecord writes local files only). Prepare '
        f'it into a gcsfuse mount of the bucket (bash launch/tpu_pod.sh data) or on a local '
        f'disk and upload the folder, then give the gs:// data_dir again.')
  relative = os.path.relpath(remote.data_dir.split('://', 1)[1],
                             remote_dir.split('://', 1)[1])
  local_dir = os.path.join(copy_root or host_copy_root(), remote_dir.replace('://', '/'))
  target = os.path.join(local_dir, relative)
  os.makedirs(local_dir, exist_ok=True)
  with open(os.path.join(local_dir, '.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per host; the others wait for it
    if not os.path.exists(os.path.join(target, HOST_COPY_MARK)):
      files.rmtree(target)
      files.copy_tree(remote.data_dir, target, threads=16)
      with open(os.path.join(target, HOST_COPY_MARK), 'w') as f:
        f.write(remote.data_dir + '\n')
  local = ml_collections.ConfigDict(config.to_dict())
  local.data_dir = local_dir
  return local


def check_user_data_dir(config) -> None:
  """Refuses a data_dir in a bucket for the user's kinds, which are decoded into data_dir
  here (the named datasets' prepared files in a bucket are copied to the host instead,
  `with_host_copy`)."""
  if files.is_remote(_data_dir(config)):
    raise ValueError(
        f'dataset.data_dir={_data_dir(config)}: dataset.name={config.name!r} is decoded into '
        f'data_dir on this host; give a local folder (the images themselves may be anywhere '
        f'this host reads).')


def check_source(config, builder) -> None:
  """Refuses prepared files built from another folder than the one the config names
  explicitly (source_dir / manual_dir); without a name in the config any source is used."""
  path = os.path.join(builder.data_dir, SOURCE_RECORD)
  named = config.get('source_dir') or config.get('manual_dir')
  if not named or not files.exists(path):
    return
  recorded = files.read_json(path)['source']
  if _real(recorded) != _real(source_of(config)):
    raise DataSourceError(
        f'{builder.data_dir} holds {config.name} prepared from {recorded}, but the config '
        f'reads it from {source_of(config)}. Set dataset.source_dir/manual_dir back to '
        f'{recorded}, or use another dataset.data_dir (or delete {builder.data_dir}) to '
        f'build it from {source_of(config)}.')


def prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Builds the dataset's ArrayRecord files once (process 0), then returns its builder.

  The raw files are read from `manual_dir(config)`, which also becomes TFDS's manual dir. A
  gs:// data_dir must hold the prepared files; they are read from this host's copy
  (`with_host_copy`).
  Where they came from is recorded beside the prepared files (`SOURCE_RECORD`); prepared
  files of another source than the config names are refused (`check_source`).
  """
  spec = spec_of(config)
  if files.is_remote(_data_dir(config)):
    config = with_host_copy(config, spec)
  builder = spec.make_builder(config)
  if jax.process_index() == 0 and not builder.is_prepared():
    if spec.check_source is not None:
      spec.check_source(config)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir(config)))
    if files.isdir(builder.data_dir):  # (not under tfds.testing.mock_data)
      files.atomic_write(os.path.join(builder.data_dir, SOURCE_RECORD),
                         json.dumps({'source': files.absolute(source_of(config))}))
  else:
    check_source(config, builder)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'prepare {config.name}')
    builder = spec.make_builder(config)
  return builder


def load_arrays(config: ml_collections.ConfigDict, split: str,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split into memory: images uint8 (N, H, W, C), labels int32 (N,).

  `limit` keeps the first `limit` examples (smoke runs).
  """
  source = prepare(config).as_data_source(split=split)
  n = len(source) if not limit else min(limit, len(source))
  images, labels = [], []
  for start in range(0, n, 4096):
    records = source.__getitems__(list(range(start, min(n, start + 4096))))
    images.append(np.stack([r['image'] for r in records]))
    labels.append(np.asarray([r['label'] for r in records], np.int32))
  return np.concatenate(images), np.concatenate(labels)


def normalise(images, spec: DatasetSpec):
  """uint8 or [0, 1] images -> normalised float32 (works on numpy and jax arrays)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = images.astype(jnp.float32)
  if images.dtype == np.uint8:
    x = x / 255.0
  return (x - jnp.asarray(spec.mean)) / jnp.asarray(spec.std)


def denormalise(images, spec: DatasetSpec) -> np.ndarray:
  """Normalised float images -> uint8 in [0, 255] (host numpy)."""
  x = np.asarray(images, np.float32) * np.asarray(spec.std) + np.asarray(spec.mean)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def pixel_bounds(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (low, high) of valid pixels in normalised space."""
  mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
  return (0.0 - mean) / std, (1.0 - mean) / std
