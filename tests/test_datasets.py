"""Offline dataset builders, the registry, batching and both kinds of split, on tiny
real-format files."""

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sre2l_jax.data import batching
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
  assert isinstance(train, pipeline.InMemorySplit) and isinstance(train, pipeline.Split)
  images, labels = train.arrays()
  assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
  assert _as_sorted_pairs(images, labels) == _expected(written, train_members)

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


@pytest.fixture(scope='module')
def imagenet_config(tmp_path_factory):
  """A real-format ImageNet (2 classes x 5 train images, 10 val images), built on first use."""
  root = tmp_path_factory.mktemp('imagenet')
  manual = root / 'manual'
  manual.mkdir()
  _write_imagenet(manual)
  return _config(root, 'imagenet2012', manual_dir=manual)


def test_imagenet_real_format_streaming(imagenet_config):
  config = imagenet_config
  sharding = batching.data_sharding(batching.create_mesh())

  train = pipeline.load_split(config, 'train')
  assert isinstance(train, streaming.StreamingSplit) and train.num_examples == 10
  assert isinstance(train, pipeline.Split)
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
  sharding = batching.data_sharding(batching.create_mesh())
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


def test_streaming_class_balanced_subset_reads_records_in_a_random_order(imagenet_config):
  train = pipeline.load_split(imagenet_config, 'train')
  # Expected: walk default_rng(seed).permutation(10) over the raw records, keeping the first
  # 3 of each class, each centre-cropped to the model input; class-major.
  order = np.random.default_rng([3, 0xba5e]).permutation(train.num_examples)
  records = [train.source[int(i)] for i in order]
  expected = {0: [], 1: []}
  for record in records:
    if len(expected[record['label']]) < 3:
      expected[record['label']].append(streaming.center_crop(record['image'], (224, 224, 3)))
  for chunk in (1024, 4):  # chunks that hold every record, or cut the order into pieces
    rng = np.random.default_rng([3, 0xba5e])
    images, labels = train.class_balanced_subset(2, 3, rng, chunk=chunk)
    assert images.shape == (6, 224, 224, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(images, np.stack(expected[0] + expected[1]))
    # The rng advanced by exactly one permutation.
    after = np.random.default_rng([3, 0xba5e])
    after.permutation(train.num_examples)
    assert rng.random() == after.random()
  # num_classes=1 keeps class 0 only; another seed draws other images.
  images, labels = train.class_balanced_subset(1, 3, np.random.default_rng(4))
  assert labels.tolist() == [0, 0, 0] and not np.array_equal(images, np.stack(expected[0]))
  with pytest.raises(batching.TooFewPerClass, match=r'^6 training images of every class are needed; 2 classes'):
    train.class_balanced_subset(2, 6, np.random.default_rng(0))


def test_streaming_candidate_batches_hold_one_batch_and_draw_the_subset(imagenet_config):
  """candidate_batches: class_balanced_subset's examples, in reading order, `batch_size` at a
  time (what RDED and the scored start keep per candidate instead of the images); `take`
  reads chosen ones again, identical."""
  train = pipeline.load_split(imagenet_config, 'train')
  expected_images, expected_labels = train.class_balanced_subset(
      2, 3, np.random.default_rng([3, 0xba5e]))
  rng = np.random.default_rng([3, 0xba5e])
  batches = list(train.candidate_batches(2, 3, rng, batch_size=4, chunk=3))
  assert [len(labels) for _, labels, _ in batches] == [4, 2]
  images, labels, ids = (np.concatenate(parts) for parts in zip(*batches))
  assert ids.dtype == np.int64 and len(set(ids.tolist())) == 6
  # Reading order: the permutation's order of the records kept.
  order = np.random.default_rng([3, 0xba5e]).permutation(train.num_examples).tolist()
  assert [order.index(i) for i in ids] == sorted(order.index(i) for i in ids)
  assert [train.source[int(i)]['label'] for i in ids] == labels.tolist()
  by_class = np.argsort(labels, kind='stable')
  np.testing.assert_array_equal(images[by_class], expected_images)
  np.testing.assert_array_equal(labels[by_class], expected_labels)
  np.testing.assert_array_equal(train.take(ids[::-1]), images[::-1])
  with pytest.raises(batching.TooFewPerClass, match=r'6 training images .* 2 classes'):
    list(train.candidate_batches(2, 6, np.random.default_rng(0), batch_size=4))


def test_streaming_split_has_no_arrays(imagenet_config):
  train = pipeline.load_split(imagenet_config, 'train')
  with pytest.raises(ValueError, match=r"needs a dataset held in memory.*imagenet2012's "
                                       r"'train' split is streamed"):
    train.arrays()


def test_in_memory_class_balanced_subset_is_the_random_subset_draw():
  data = np.random.default_rng(0)
  images = data.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
  labels = data.integers(0, 12, 200).astype(np.int32)
  split = pipeline.InMemorySplit(images, labels)
  for seed in (0, 1):
    # relabel.random_subset before issue 10, written out.
    expected_rng = np.random.default_rng([seed, 0xba5e])
    index = np.concatenate([expected_rng.choice(np.flatnonzero(labels == c), 5, replace=False)
                            for c in range(10)])
    rng = np.random.default_rng([seed, 0xba5e])
    got_images, got_labels = split.class_balanced_subset(10, 5, rng)
    np.testing.assert_array_equal(got_images, images[index])
    np.testing.assert_array_equal(got_labels, labels[index])
    assert got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_labels, np.repeat(np.arange(10), 5))
    assert rng.random() == expected_rng.random()  # the same draws, no more
    # candidate_batches: the same draw, class-major, in batches; take reads them again.
    batches = list(split.candidate_batches(10, 5, np.random.default_rng([seed, 0xba5e]), 16))
    assert [len(ids) for _, _, ids in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate([ids for _, _, ids in batches]), index)
    np.testing.assert_array_equal(np.concatenate([im for im, _, _ in batches]), images[index])
    np.testing.assert_array_equal(split.take(index[:3]), images[index[:3]])
  rare = np.flatnonzero(np.bincount(labels, minlength=12) < 30)[0]
  with pytest.raises(batching.TooFewPerClass, match=rf'30 training images .*\[{rare}'):
    split.class_balanced_subset(12, 30, np.random.default_rng(0))
  held_images, held_labels = split.arrays()
  assert held_images is images and held_labels is labels


def test_in_memory_eval_batches_pad_the_last_batch():
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  split = pipeline.InMemorySplit(images, np.arange(10, dtype=np.int32))
  sharding = batching.data_sharding(batching.create_mesh())
  batches = list(split.eval_batches(8, sharding))
  assert len(batches) == 2 and all(b['mask'].sharding == sharding for b in batches)
  np.testing.assert_array_equal(np.asarray(batches[1]['label']), [8, 9, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(batches[1]['image']).ravel(),
                                [8, 9, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(batches[1]['mask']), [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(batches[0]['label']), np.arange(8))
  assert float(batches[0]['mask'].sum()) == 8.0


def test_eval_indices_and_train_indices():
  passes = list(batching.eval_indices(10, 4))
  assert [index.tolist() for index, _ in passes] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
  assert [mask.tolist() for _, mask in passes][-1] == [1, 1, 0, 0]
  assert all(mask.dtype == np.float32 for _, mask in passes)
  # Epoch e is default_rng([seed, e]).permutation cut into drop-remainder batches.
  steps = list(zip(range(7), batching.train_indices(10, 4, seed=5, start_step=1)))
  for step, (epoch, index) in steps:
    want = np.random.default_rng([5, (step + 1) // 2]).permutation(10)
    first = (step + 1) % 2 * 4
    assert epoch == (step + 1) // 2
    np.testing.assert_array_equal(index, want[first:first + 4])
  with pytest.raises(ValueError, match='exceeds the 3 examples'):
    next(batching.train_indices(3, 4, seed=0, start_step=0))


def test_create_mesh_keeps_the_device_order():
  devices = jax.devices()
  for n in (1, 3, len(devices)):
    mesh = batching.create_mesh(n)
    assert mesh.axis_names == ('data',) and list(mesh.devices.flat) == devices[:n]
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  assert list(batching.create_mesh(-1).devices.flat) == devices
  with pytest.raises(ValueError, match=f'mesh_shape={len(devices) + 1},'):
    batching.create_mesh(len(devices) + 1)
  mesh = batching.create_mesh(4)
  batching.check_batch_size(8, mesh, 'x')
  with pytest.raises(ValueError, match='x=6 must be a positive multiple'):
    batching.check_batch_size(6, mesh, 'x')


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
