"""Datasets by kind (data/user_data.py): an image folder, one .npz, a prepared TFDS dataset.

The reference is the Fashion-MNIST IDX builder: the same images written as a folder of PNGs
or as arrays prepare to the same pixels and labels, in the same order, and the smoke
pipeline recovers the same images from them. Every bad input is refused with one line
before anything is written, and what was prepared before stays as it was.
"""

import hashlib
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sre2l_jax import image_sets
from sre2l_jax import runner
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.data import streaming
from sre2l_jax.data import user_data
import testlib

FM = datasets.get_spec('fashion_mnist')
TRAIN, TEST = 512, 256  # the smoke config's train_limit / test_limit


@pytest.fixture(scope='module')
def fm(tmp_path_factory):
  """Fashion-MNIST cut to the smoke config's subset: (dataset keys, train, test arrays)."""
  keys = testlib.cut_fashion_mnist(tmp_path_factory.mktemp('fm'), TRAIN, TEST)
  config = _dataset(name='fashion_mnist', **keys)
  return keys, datasets.load_arrays(config, 'train'), datasets.load_arrays(config, 'test')


def _dataset(**kwargs) -> ml_collections.ConfigDict:
  c = testlib.load_config('fashion_mnist_ipc10', 'smoke').dataset
  c.update(kwargs)
  return c


def _class_folder(label: int) -> str:
  # Sorted folder names give the label order (the ImageFolder rule).
  return f'{label:02d}_{datasets.FASHION_MNIST_CLASSES[label].replace("/", "-")}'


def write_folder(root, images, labels) -> str:
  """Images as PNGs, `root/<class>/<position>.png`: file-name order is the arrays' order."""
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = os.path.join(root, _class_folder(int(label)))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image[..., 0]).save(os.path.join(folder, f'{i:05d}.png'))
  return str(root)


@pytest.fixture(scope='module')
def folder(fm, tmp_path_factory):
  """The subset as an image folder (PNG, grey) and its dataset config (FM's normalisation)."""
  _, train, test = fm
  root = tmp_path_factory.mktemp('folder')
  config = _dataset(name='image_folder', data_dir=str(root / 'tfds'), image_size=28,
                    channels=1, mean=FM.mean, std=FM.std,
                    train_dir=write_folder(root / 'train', *train),
                    test_dir=write_folder(root / 'test', *test))
  return config


@pytest.fixture(scope='module')
def npz(fm, tmp_path_factory):
  _, train, test = fm
  root = tmp_path_factory.mktemp('npz')
  path = str(root / 'fm.npz')
  np.savez(path, x_train=train[0][..., 0], y_train=train[1], x_test=test[0],
           y_test=test[1], class_names=np.asarray(datasets.FASHION_MNIST_CLASSES))
  return _dataset(name='arrays', data_dir=str(root / 'tfds'), arrays_file=path,
                  mean=FM.mean, std=FM.std)


def _assert_like_fashion_mnist(config, fm, class_names):
  _, train, test = fm
  spec = datasets.spec_of(config)
  assert (spec.num_classes, spec.image_shape, spec.mean, spec.std, spec.train_augment,
          spec.pad, spec.in_memory) == (10, (28, 28, 1), FM.mean, FM.std, FM.train_augment,
                                        FM.pad, True)
  assert datasets.class_names(config) == class_names
  for split, (images, labels) in (('train', train), ('test', test)):
    got = pipeline.load_split(config, split).arrays()
    np.testing.assert_array_equal(got[0], images)
    np.testing.assert_array_equal(got[1], labels)
    assert got[1].dtype == labels.dtype


def test_image_folder_prepares_like_the_idx_builder(fm, folder):
  _assert_like_fashion_mnist(folder, fm, [_class_folder(i) for i in range(10)])


def test_arrays_prepare_like_the_idx_builder(fm, npz):
  _assert_like_fashion_mnist(npz, fm, list(datasets.FASHION_MNIST_CLASSES))


def test_tfds_name_reads_a_prepared_dataset(fm):
  keys, train, test = fm
  # The IDX builder's own prepared files, read as a foreign TFDS dataset.
  config = _dataset(name='tfds:fashion_mnist_local', data_dir=keys['data_dir'])
  spec = datasets.spec_of(config)
  assert (spec.num_classes, spec.image_shape, spec.test_split) == (10, (28, 28, 1), 'test')
  np.testing.assert_array_equal(pipeline.load_split(config, 'train').arrays()[0], train[0])
  np.testing.assert_array_equal(pipeline.load_split(config, 'test').arrays()[1], test[1])
  # Normalisation computed in one pass over the training images and stored with them.
  x = train[0].astype(np.float64) / 255.0
  np.testing.assert_allclose(spec.mean, [x.mean()], rtol=1e-9)
  np.testing.assert_allclose(spec.std, [x.std()], rtol=1e-9)
  stats = os.path.join(spec.make_builder(config).data_dir, user_data.STATS)
  assert os.path.exists(stats)


@pytest.mark.equivalence
@pytest.mark.slow  # ~20 s: squeeze and recover twice
def test_smoke_pipeline_recovers_the_same_images(fm, folder, tmp_path):
  keys, _, _ = fm
  recovered = []
  for name, dataset in (('fm', dict(name='fashion_mnist', **keys)), ('folder', folder)):
    config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
    config.dataset = ml_collections.ConfigDict(folder.to_dict() | dict(dataset))
    config.recover.ipc = 1
    workdir = str(tmp_path / name)
    runner.run(config, workdir, ['squeeze', 'recover'])
    recovered.append(image_sets.distilled_set(workdir))
  np.testing.assert_array_equal(recovered[0][0], recovered[1][0])
  np.testing.assert_array_equal(recovered[0][1], recovered[1][1])


def _tree_digest(root) -> str:
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in sorted(os.walk(root)):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      h.update(path.encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def _small_folder(root, classes=('a', 'b'), per_class=2, size=(6, 5), mode='RGB'):
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c in classes:
      os.makedirs(root / split / c, exist_ok=True)
      for i in range(per_class):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).convert(mode).save(root / split / c / f'{i}.png')
  return dict(name='image_folder', train_dir=str(root / 'train'),
              test_dir=str(root / 'test'), image_size=4, channels=3)


def _breaks(kind):
  """(what to do to a good small folder or npz, words the one-line error must hold)."""
  def empty_class(root):
    os.makedirs(root / 'train' / 'c')

  def test_only_class(root):
    os.makedirs(root / 'test' / 'z')
    (root / 'test' / 'a' / '0.png').rename(root / 'test' / 'z' / '0.png')

  def unreadable(root):
    (root / 'train' / 'b' / '1.png').write_bytes(b'not a png')

  return {'empty class folder': (empty_class, 'has no images'),
          'class only in test': (test_only_class, "'z'] that dataset.train_dir"),
          'unreadable image': (unreadable, '1.png is not a readable image')}[kind]


@pytest.mark.parametrize('kind', ['empty class folder', 'class only in test',
                                  'unreadable image'])
def test_bad_folder_one_line_and_prepared_data_unchanged(tmp_path, kind):
  keys = _small_folder(tmp_path)
  config = _dataset(data_dir=str(tmp_path / 'tfds'), **keys)
  datasets.spec_of(config)  # a good folder, prepared
  before = _tree_digest(tmp_path / 'tfds')
  change, words = _breaks(kind)
  change(tmp_path)
  with pytest.raises(ValueError) as error:
    datasets.spec_of(config)
  assert words in str(error.value) and '\n' not in str(error.value)
  assert _tree_digest(tmp_path / 'tfds') == before


def test_folder_skips_other_files_converts_modes_resizes(tmp_path, caplog):
  keys = _small_folder(tmp_path, size=(8, 6))
  (tmp_path / 'train' / 'a' / 'notes.txt').write_text('not an image')
  Image.fromarray(np.full((6, 8), 77, np.uint8)).save(tmp_path / 'train' / 'b' / '9.png')
  config = _dataset(data_dir=str(tmp_path / 'tfds'), **keys)
  with caplog.at_level('WARNING'):
    images, labels = pipeline.load_split(config, 'train').arrays()
  messages = [r.getMessage() for r in caplog.records]
  assert any('1 non-image file(s) skipped' in m for m in messages), messages
  assert any('1 of 5 train images converted to 3 channel(s)' in m for m in messages), messages
  assert images.shape == (5, 4, 4, 3) and labels.tolist() == [0, 1, 0, 1, 1]  # by file name
  # The grey image: every channel its value; 8 x 6 -> shorter side 4, centre crop.
  np.testing.assert_array_equal(images[-1], np.full((4, 4, 3), 77, np.uint8))
  # A changed folder is prepared afresh (its digest changes), never the stale copy reused.
  name = datasets.spec_of(config).name
  os.remove(tmp_path / 'train' / 'b' / '9.png')
  assert datasets.spec_of(config).name != name
  assert pipeline.load_split(config, 'train').num_examples == 4


def _npz_breaks(path, good):
  bad = dict(good)
  yield 'labels out of range', bad | {'y_test': np.asarray([0, 5])}, 'label 5 is out of range'
  sizes = np.empty(2, object)
  sizes[0], sizes[1] = np.zeros((3, 3), np.uint8), np.zeros((4, 4), np.uint8)
  yield 'different sizes', bad | {'x_train': sizes}, 'images of different sizes'
  yield 'train/test sizes', bad | {'x_test': np.zeros((2, 5, 5), np.uint8)}, 'store both at'
  yield 'float images', bad | {'x_train': np.zeros((2, 4, 4), np.float32)}, 'store uint8'
  yield 'missing key', {k: v for k, v in good.items() if k != 'y_test'}, "lacks ['y_test']"


def test_bad_arrays_one_line_and_prepared_data_unchanged(tmp_path):
  path = str(tmp_path / 'data.npz')
  good = dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.asarray([0, 1]),
              x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.asarray([1, 0]),
              class_names=np.asarray(['a', 'b']))
  np.savez(path, **good)
  config = _dataset(name='arrays', data_dir=str(tmp_path / 'tfds'), arrays_file=path)
  assert datasets.spec_of(config).num_classes == 2
  before = _tree_digest(tmp_path / 'tfds')
  for what, arrays, words in _npz_breaks(path, good):
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as error:
      datasets.spec_of(config)
    assert words in str(error.value) and '\n' not in str(error.value), what
    assert _tree_digest(tmp_path / 'tfds') == before, what


def test_an_unchanged_arrays_file_is_read_once_per_process(tmp_path, monkeypatch):
  """Every stage asks for the dataset's spec: an arrays file is read and checked once, and
  again only when it changes (its size or modification time)."""
  path = tmp_path / 'data.npz'
  arrays = dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.asarray([0, 1]),
                x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.asarray([1, 0]))
  np.savez(path, **arrays)
  reads = []
  read_npz = user_data.read_npz
  monkeypatch.setattr(user_data, 'read_npz', lambda p: reads.append(p) or read_npz(p))
  config = _dataset(name='arrays', data_dir=str(tmp_path / 'tfds'), arrays_file=str(path))
  first = datasets.spec_of(config)
  assert datasets.spec_of(config).name == first.name and len(reads) == 1
  np.savez(path, **arrays | {'y_test': np.asarray([0, 1, 1]),
                             'x_test': np.zeros((3, 4, 4), np.uint8)})
  changed = datasets.spec_of(config)
  assert len(reads) == 2 and changed.name != first.name
  assert pipeline.load_split(config, 'test').num_examples == 3


def test_bad_input_is_one_line_from_main(tmp_path):
  keys = _small_folder(tmp_path)
  os.makedirs(tmp_path / 'train' / 'empty')
  command = testlib.main_command(
      'fashion_mnist_ipc10', tmp_path / 'run', stages='squeeze',
      overrides={f'dataset.{k}': v for k, v in (keys | {'data_dir': tmp_path / 'tfds'}).items()})
  completed = testlib.subprocess.run(command, cwd=testlib.REPO, capture_output=True,
                                     text=True, timeout=300, check=False)
  assert completed.returncode == 1
  lines = completed.stderr.strip().splitlines()
  assert lines[-1].startswith('sre2l_jax: Class folder') and 'empty has no images' in lines[-1]
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_a_folder_too_large_for_memory_is_streamed(tmp_path, monkeypatch):
  keys = _small_folder(tmp_path, size=(6, 6))
  config = _dataset(data_dir=str(tmp_path / 'tfds'), **keys)
  in_memory = pipeline.load_split(config, 'train')
  monkeypatch.setattr(datasets, 'IN_MEMORY_BYTES', 4 * 4 * 3 * 3)  # 3 of the 4 images
  spec = datasets.spec_of(config)
  assert not spec.in_memory and spec.train_augment == 'flip'  # the host crops streamed ones
  streamed = pipeline.load_split(config, 'train')
  assert isinstance(streamed, streaming.StreamingSplit)
  images, labels = streamed.class_balanced_subset(2, 2, np.random.default_rng(0))
  want, want_labels = in_memory.class_balanced_subset(2, 2, np.random.default_rng(0))
  assert images.shape == want.shape  # streamed images are centre-cropped on the host
  np.testing.assert_array_equal(labels, want_labels)  # the same records drawn


def test_a_run_lists_a_folder_once(tmp_path, monkeypatch):
  """Every stage asks for the dataset's spec; within one run (`runner.run`) a folder is
  listed (each file stat'ed for its digest) once, and a later run lists it again."""
  keys = _small_folder(tmp_path, per_class=4, size=(8, 8))
  listings = []
  list_folder = user_data.list_image_folder
  monkeypatch.setattr(user_data, 'list_image_folder',
                      lambda *a: listings.append(a) or list_folder(*a))
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.dataset.update(keys | dict(image_size=8, data_dir=str(tmp_path / 'tfds'), mean=(),
                                    std=()))
  config.squeeze.update(batch_size=8, eval_batch_size=8)  # 8 devices
  runner.run(config, str(tmp_path / 'run'), ['squeeze'])
  assert len(listings) == 1
  datasets.spec_of(config.dataset)
  datasets.spec_of(config.dataset)
  assert len(listings) == 3  # outside a run, every ask looks again
