"""Offline dataset builders, the registry and the streaming split, on tiny real-format files."""

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sre2l_jax.data import builders
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.data import streaming


def _config(tmp_path, name, manual_dir='', source_dir='', **kwargs):
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=str(tmp_path / 'tfds'), source_dir=str(source_dir),
      manual_dir=str(manual_dir), train_limit=0, test_limit=0, **kwargs))


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _encode(image: np.ndarray, fmt='JPEG') -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, fmt, quality=95)
  return out.getvalue()


def _write_cifar(folder, archive, root, label_key, split_sizes, num_classes, seed):
  """A CIFAR python archive: protocol-2 pickles of {b'data': (n, 3072) channel-major, ...}.

  Returns {member: (images (n, 32, 32, 3), labels (n,))}.
  """
  rng = np.random.default_rng(seed)
  written = {}
  with tarfile.open(folder / archive, 'w:gz') as tar:
    for member, n in split_sizes.items():
      images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
      labels = rng.integers(0, num_classes, n).tolist()
      batch = {b'batch_label': member.encode(), label_key: labels,
               b'data': images.transpose(0, 3, 1, 2).reshape(n, 3072),
               b'filenames': [f'{member}_{i}.png'.encode() for i in range(n)]}
      data = pickle.dumps(batch, protocol=2)
      # The official pickles were written by numpy 1, which names the module numpy.core.
      data = data.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
      _add(tar, f'{root}/{member}', data)
      written[member] = (images, np.asarray(labels))
    _add(tar, f'{root}/readme.html', b'<html></html>')
  return written


def _as_sorted_pairs(images, labels):
  return sorted((image.tobytes(), int(label)) for image, label in zip(images, labels))


def _expected(written, members):
  images = np.concatenate([written[m][0] for m in members])
  labels = np.concatenate([written[m][1] for m in members])
  return _as_sorted_pairs(images, labels)


def test_cifar10_round_trip(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  train_members = [f'data_batch_{i}' for i in range(1, 6)]
  written = _write_cifar(manual, 'cifar-10-python.tar.gz', 'cifar-10-batches-py', b'labels',
                         {**{m: 2 for m in train_members}, 'test_batch': 3}, 10, seed=0)
  config = _config(tmp_path, 'cifar10', manual_dir=manual)

  train = pipeline.load_split(config, 'train')
  assert isinstance(train, pipeline.InMemorySplit)
  assert train.images.shape == (10, 32, 32, 3) and train.images.dtype == np.uint8
  assert _as_sorted_pairs(train.images, train.labels) == _expected(written, train_members)

  images, labels = datasets.load_arrays(config, 'test')
  assert labels.dtype == np.int32
  assert _as_sorted_pairs(images, labels) == _expected(written, ['test_batch'])

  config.train_limit = 4
  assert pipeline.load_split(config, 'train').num_examples == 4


def test_cifar100_round_trip_fine_labels(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  written = _write_cifar(manual, 'cifar-100-python.tar.gz', 'cifar-100-python',
                         b'fine_labels', {'train': 5, 'test': 3}, 100, seed=1)
  config = _config(tmp_path, 'cifar100', manual_dir=manual)
  images, labels = datasets.load_arrays(config, 'train')
  assert _as_sorted_pairs(images, labels) == _expected(written, ['train'])
  split = pipeline.load_split(config, 'test')
  assert _as_sorted_pairs(split.images, split.labels) == _expected(written, ['test'])
  assert datasets.get_spec('cifar100').num_classes == 100


TINY_WNIDS = ['n09193705', 'n01443537', 'n04067472']  # wnids.txt order: unsorted


def _tiny_colour(label):
  return np.asarray([30 + 90 * label, 200 - 80 * label, 60 + 20 * label], np.uint8)


def _write_tiny(folder):
  """tiny-imagenet-200.zip: 3 classes x 2 train images, 4 labelled val images, 1 test image.

  Every image is flat in its class's colour (sorted-wnid label), so JPEG keeps it
  recognisable. Returns the val labels in val_annotations.txt order.
  """
  label = {w: i for i, w in enumerate(sorted(TINY_WNIDS))}
  flat = lambda w: np.broadcast_to(_tiny_colour(label[w]), (64, 64, 3)).copy()
  root = 'tiny-imagenet-200/'
  val = ['n04067472', 'n01443537', 'n09193705', 'n04067472']
  with zipfile.ZipFile(folder / 'tiny-imagenet-200.zip', 'w') as z:
    z.writestr(root + 'wnids.txt', '\n'.join(TINY_WNIDS) + '\n')
    z.writestr(root + 'words.txt', ''.join(f'{w}\tthing\n' for w in TINY_WNIDS))
    for wnid in TINY_WNIDS:
      z.writestr(f'{root}train/{wnid}/{wnid}_boxes.txt', f'{wnid}_0.JPEG\t0\t0\t63\t63\n')
      for i in range(2):
        z.writestr(f'{root}train/{wnid}/images/{wnid}_{i}.JPEG', _encode(flat(wnid)))
    annotations = ''
    for k, wnid in enumerate(val):
      image = flat(wnid)
      if k == 0:  # Tiny-ImageNet has some greyscale JPEGs: they must come out RGB
        image = image[..., 0]
      z.writestr(f'{root}val/images/val_{k}.JPEG', _encode(image))
      annotations += f'val_{k}.JPEG\t{wnid}\t0\t0\t63\t63\n'
    z.writestr(root + 'val/val_annotations.txt', annotations)
    z.writestr(root + 'test/images/test_0.JPEG', _encode(flat(TINY_WNIDS[0])))
  return [label[w] for w in val]


def _check_tiny(images, labels):
  assert images.shape[1:] == (64, 64, 3) and images.dtype == np.uint8
  for image, label in zip(images, labels):
    colour = _tiny_colour(label)
    if np.ptp(image, axis=-1).max() == 0:  # the greyscale one, written from channel 0
      colour = np.full(3, colour[0])
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), colour, atol=3)


def test_tiny_imagenet(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  val_labels = _write_tiny(manual)
  config = _config(tmp_path, 'tiny_imagenet', manual_dir=manual)

  train = pipeline.load_split(config, 'train')
  assert train.images.shape == (6, 64, 64, 3)
  assert sorted(train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
  _check_tiny(train.images, train.labels)

  test = pipeline.load_split(config, 'test')  # the spec's test split is 'validation'
  assert test.images.shape == (4, 64, 64, 3)
  assert sorted(test.labels.tolist()) == sorted(val_labels)
  _check_tiny(test.images, test.labels)
  grey = [image for image in test.images if np.ptp(image, axis=-1).max() == 0]
  assert len(grey) == 1


IMAGENET_WNIDS = ('n01440764', 'n01443537')  # labels 0 and 1 in TFDS's labels.txt


def _write_imagenet(folder, per_class=5, num_val=10, files=('train', 'val')):
  """ILSVRC2012_img_train.tar (a tar of per-class tars of JPEGs) and ILSVRC2012_img_val.tar."""
  rng = np.random.default_rng(0)
  sizes = [(60, 90), (120, 80), (240, 260), (50, 50), (300, 200)]
  jpeg = lambda k: _encode(rng.integers(0, 256, sizes[k % len(sizes)] + (3,), np.uint8))
  if 'train' in files:
    with tarfile.open(folder / 'ILSVRC2012_img_train.tar', 'w') as outer:
      for wnid in IMAGENET_WNIDS:
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode='w') as tar:
          for i in range(per_class):
            _add(tar, f'{wnid}_{i}.JPEG', jpeg(i))
        _add(outer, f'{wnid}.tar', inner.getvalue())
  if 'val' in files:
    with tarfile.open(folder / 'ILSVRC2012_img_val.tar', 'w') as tar:
      for i in range(1, num_val + 1):
        _add(tar, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg(i))


def _imagenet_val_labels(n):
  """Labels TFDS assigns to the first n val images (validation_labels.txt, name order)."""
  names = tfds.features.ClassLabel(
      names_file=tfds.core.tfds_path('datasets/imagenet2012/labels.txt'))
  path = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
  return [names.str2int(w) for w in path.read_text().split()[:n]]


def test_imagenet_real_format_streaming(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  _write_imagenet(manual)
  config = _config(tmp_path, 'imagenet2012', manual_dir=manual)
  sharding = pipeline.data_sharding(pipeline.create_mesh())

  train = pipeline.load_split(config, 'train')
  assert isinstance(train, streaming.StreamingSplit) and train.num_examples == 10
  batch = next(train.train_batches(8, seed=0, start_step=0, sharding=sharding))
  assert batch['image'].shape == (8, 224, 224, 3) and batch['image'].dtype == np.uint8
  assert batch['image'].sharding == sharding
  assert set(np.asarray(batch['label']).tolist()) <= {0, 1}

  test = pipeline.load_split(config, 'test')
  batches = list(test.eval_batches(8, sharding))
  assert [float(b['mask'].sum()) for b in batches] == [8.0, 2.0]
  assert all(b['image'].shape == (8, 224, 224, 3) for b in batches)
  labels = np.concatenate([np.asarray(b['label']) for b in batches])
  mask = np.concatenate([np.asarray(b['mask']) for b in batches]) > 0
  assert sorted(labels[mask].tolist()) == sorted(_imagenet_val_labels(10))


def test_imagenet_streaming_is_a_function_of_seed_and_step(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  for name in builders.IMAGENET_MANUAL_FILES:  # passes the pre-check; the build is mocked
    (manual / name).touch()
  config = _config(tmp_path, 'imagenet2012', manual_dir=manual)
  sharding = pipeline.data_sharding(pipeline.create_mesh())
  # mock_data serves random images of random sizes (5 to 49 pixels a side) per index.
  with tfds.testing.mock_data(num_examples=16):
    split = pipeline.load_split(config, 'train')
    assert split.steps_per_epoch(8) == 2

    def batch(seed, step):
      b = next(split.train_batches(8, seed=seed, start_step=step, sharding=sharding))
      return np.asarray(b['image']), np.asarray(b['label'])

    first = batch(0, 0)
    assert first[0].shape == (8, 224, 224, 3) and first[0].dtype == np.uint8
    np.testing.assert_array_equal(batch(0, 0)[0], first[0])
    np.testing.assert_array_equal(batch(0, 0)[1], first[1])
    assert not np.array_equal(batch(0, 1)[0], first[0])
    assert not np.array_equal(batch(1, 0)[0], first[0])
    resumed = split.train_batches(8, seed=0, start_step=0, sharding=sharding)
    next(resumed)
    np.testing.assert_array_equal(np.asarray(next(resumed)['image']), batch(0, 1)[0])


def test_center_crop_and_random_resized_crop_shapes():
  image = np.arange(300 * 200 * 3, dtype=np.uint32).reshape(300, 200, 3).astype(np.uint8)
  assert streaming.center_crop(image, (224, 224, 3)).shape == (224, 224, 3)
  # A flat image stays flat through either crop.
  flat = np.full((37, 91, 1), 77, np.uint8)
  assert (streaming.center_crop(flat, (64, 64, 1)) == 77).all()
  crop = streaming.random_resized_crop(flat, np.random.default_rng(0), (64, 64, 1))
  assert crop.shape == (64, 64, 1) and (crop == 77).all()
  for seed in range(20):
    top, left, h, w = streaming.sample_crop_box(np.random.default_rng(seed), 37, 91)
    assert 0 <= top and top + h <= 37 and 0 <= left and left + w <= 91 and h > 0 and w > 0


@pytest.mark.parametrize('name, archive', [
    ('cifar10', 'cifar-10-python.tar.gz'),
    ('cifar100', 'cifar-100-python.tar.gz'),
    ('tiny_imagenet', 'tiny-imagenet-200.zip'),
])
def test_missing_archive_names_file_and_folder(tmp_path, name, archive):
  manual = tmp_path / 'empty'
  manual.mkdir()
  with pytest.raises(builders.MissingDataError) as error:
    datasets.load_arrays(_config(tmp_path, name, manual_dir=manual), 'train')
  assert archive in str(error.value) and str(manual) in str(error.value)


def test_manual_dir_falls_back_to_source_dir(tmp_path):
  source = tmp_path / 'src'
  source.mkdir()
  with pytest.raises(builders.MissingDataError, match=str(source)):
    datasets.load_arrays(_config(tmp_path, 'cifar10', source_dir=source), 'train')


def test_imagenet_missing_files(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  config = _config(tmp_path, 'imagenet2012', manual_dir=manual)
  with pytest.raises(builders.MissingDataError) as error:
    datasets.prepare(config)
  message = str(error.value)
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
  assert str(manual) in message and 'manual' in message
  (manual / 'ILSVRC2012_img_train.tar').touch()
  with pytest.raises(builders.MissingDataError) as error:
    pipeline.load_split(config, 'train')
  assert f'archive(s) ILSVRC2012_img_val.tar not found in {manual}' in str(error.value)
  assert not os.path.exists(tmp_path / 'tfds' / 'imagenet2012')


def test_fashion_mnist_missing_files(tmp_path):
  source = tmp_path / 'empty'
  source.mkdir()
  with pytest.raises(builders.MissingDataError) as error:
    datasets.load_arrays(_config(tmp_path, 'fashion_mnist', source_dir=source), 'train')
  assert 'train-images-idx3-ubyte.gz' in str(error.value)
  assert str(source) in str(error.value)


def test_read_idx(tmp_path):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  header = struct.pack('>HBB3I', 0, 0x08, 3, 2, 3, 4)
  good = tmp_path / 'good-idx3-ubyte.gz'
  with gzip.open(good, 'wb') as f:
    f.write(header + images.tobytes())
  np.testing.assert_array_equal(builders.read_idx(str(good)), images)

  truncated = tmp_path / 'truncated-idx3-ubyte'
  truncated.write_bytes(header + images.tobytes()[:-5])
  with pytest.raises(ValueError, match='truncated'):
    builders.read_idx(str(truncated))
  short = tmp_path / 'short-idx3-ubyte'
  short.write_bytes(b'\x00\x00')
  with pytest.raises(ValueError, match='too short'):
    builders.read_idx(str(short))
