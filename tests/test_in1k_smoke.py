"""ImageNet-1K at 224x224: `configs/in1k_ipc50.py:smoke` through every stage on mock data.

The stages read ImageNet through TFDS's `imagenet2012` builder under
`tfds.testing.mock_data` (random JPEG-sized images, random labels). mock_data patches every
TFDS builder while it is active, including the one that exports and reads back the distilled
set, so it is entered around each ImageNet split load only (`mock_imagenet`); the splits it
returns keep serving mock records afterwards.
"""

import contextlib
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sre2l_jax import evaluate
from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import models
from sre2l_jax import recover
from sre2l_jax import relabel
from sre2l_jax import squeeze
from sre2l_jax import train_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import builders
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.data import streaming

import testlib


def get_config(arg, name='in1k_ipc50'):
  return testlib.load_config(name, arg)


def smoke_config(root):
  config = get_config('smoke')
  manual = os.path.join(root, 'manual')
  os.makedirs(manual, exist_ok=True)
  for name in builders.IMAGENET_MANUAL_FILES:  # passes the pre-check; the build is mocked
    open(os.path.join(manual, name), 'w').close()
  config.dataset.update(data_dir=os.path.join(root, 'tfds'), manual_dir=manual)
  return config


@contextlib.contextmanager
def mock_imagenet(num_examples=32):  # one batch of the smoke config's 32
  real = pipeline.load_split

  def load_split(dataset_config, split):
    with tfds.testing.mock_data(num_examples=num_examples):
      return real(dataset_config, split)

  with mock.patch.object(pipeline, 'load_split', load_split):
    yield


def test_config_is_the_paper_setting():
  config = get_config(None)
  assert config.dataset.name == 'imagenet2012'
  assert config.teacher.name == config.student.name == 'resnet18'
  assert config.teacher.stem == 'imagenet'
  r = config.recover
  assert (r.ipc, r.batch_size, r.iterations, r.lr, r.r_bn, r.first_bn_multiplier, r.jitter,
          r.min_scale, r.crop) == (50, 100, 4000, 0.25, 0.01, 10.0, 32, 0.08, 'per_image')
  assert (config.student.epochs, config.student.batch_size, config.relabel.mix) == (
      300, 1024, 'cutmix')
  e = config.evaluate
  assert (e.optimizer, e.lr, e.weight_decay, e.temperature, e.seeds) == (
      'adamw', 1e-3, 0.01, 20.0, 1)
  assert get_config('ipc=10').recover.ipc == 10


def test_tiny_and_cifar100_configs_follow_the_paper():
  tiny = get_config(None, 'tiny_ipc50')
  assert (tiny.dataset.name, tiny.teacher.stem, tiny.student.stem) == (
      'tiny_imagenet', 'small', 'small')
  s = tiny.squeeze
  assert (s.optimizer, s.lr, s.momentum, s.weight_decay, s.batch_size, s.epochs,
          s.warmup_epochs) == ('sgd', 0.2, 0.9, 1e-4, 256, 50, 5)
  r = tiny.recover
  assert (r.lr, r.r_bn, r.iterations, r.jitter, r.batch_size, r.ipc) == (
      0.1, 1.0, 4000, 4, 100, 50)
  e = tiny.evaluate
  assert (e.optimizer, e.lr, e.temperature, tiny.relabel.mode, tiny.student.epochs) == (
      'sgd', 0.2, 20.0, 'online', 100)

  cifar = get_config(None, 'cifar100_ipc50')
  assert (cifar.dataset.name, cifar.teacher.stem) == ('cifar100', 'small')
  s = cifar.squeeze
  assert (s.optimizer, s.lr, s.weight_decay, s.batch_size, s.epochs) == (
      'sgd', 0.1, 5e-4, 128, 200)
  r = cifar.recover
  assert (r.lr, r.r_bn, r.iterations, r.crop, r.jitter, r.batch_size, r.ipc) == (
      0.25, 0.01, 1000, 'none', 4, 100, 50)


@pytest.mark.parametrize('arg', [None, 'smoke'])
@pytest.mark.parametrize('name', ['in1k_ipc50', 'tiny_ipc50', 'cifar100_ipc50'])
def test_configs_pass_every_stage_check_on_eight_devices(name, arg):
  config = get_config(arg, name)
  spec = datasets.get_spec(config.dataset.name)
  mesh = batching.create_mesh(config.mesh_shape)
  assert mesh.size == 8
  ctx = testlib.context_of(config, spec=spec, mesh=mesh)
  squeeze.validate(config, ctx)
  recover.validate(config, ctx)
  evaluate.validate(config, ctx)
  num_images = image_sets.recovered_classes(config.recover, spec) * config.recover.ipc
  batching.check_batch_size(views.create_schedule(config, num_images).batch_size, mesh,
                            'student.batch_size')
  for stage_config in (config.squeeze, config.evaluate):
    train_lib.create_optimizer(stage_config, train_lib.warmup_cosine(0.1, 10))
  for model_config in (config.teacher, config.student):
    models.create_model(model_config, spec.num_classes)
  assert get_config('smoke,ipc=2,seeds=2', name).evaluate.seeds == 2


@pytest.mark.slow
def test_all_stages_on_mock_imagenet(tmp_path):
  config = smoke_config(str(tmp_path))
  workdir = str(tmp_path / 'work')
  with mock_imagenet():
    assert isinstance(pipeline.load_split(config.dataset, 'train'), streaming.StreamingSplit)
    results = {'squeeze': testlib.run_stage(squeeze, config, workdir)}
    results['recover'] = testlib.run_stage(recover, config, workdir)
    results['relabel'] = testlib.run_stage(relabel, config, workdir)
    results['evaluate'] = testlib.run_stage(evaluate, config, workdir)

  on_disk = {s: files.read_json(os.path.join(workdir, s, 'result.json'))
             for s in results}
  for stage, result in on_disk.items():
    assert result['stage'] == stage

  squeezed = on_disk['squeeze']
  assert squeezed['dataset'] == 'imagenet2012' and squeezed['steps'] == 2
  testlib.assert_share_of(squeezed['test_top1'], 16)  # the 16 mock test images, no padding
  assert os.path.exists(os.path.join(workdir, 'squeeze', 'teacher', 'teacher.json'))

  recovered = on_disk['recover']
  assert recovered['images'] == recovered['classes'] == 40
  assert np.isfinite(recovered['bn_loss_initial']) and np.isfinite(recovered['bn_loss_final'])
  images, labels = export.read_tfds(export.tfds_dataset_dir(image_sets.distilled_dir(workdir)))
  assert images.shape == (40, 224, 224, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(40))
  assert images.std() > 10  # noise-initialised images, not a constant
  assert os.path.exists(os.path.join(workdir, 'recover', 'grid.png'))

  assert on_disk['relabel']['mode'] == 'online'
  evaluated = on_disk['evaluate']
  assert list(evaluated['variants']) == ['distilled']
  distilled = evaluated['variants']['distilled']
  assert distilled['images'] == 40 and distilled['seeds'] == 1 and distilled['steps'] == 2
  testlib.assert_share_of(distilled['test_top1_mean'], 16)
  assert os.path.exists(os.path.join(workdir, 'report.md'))


def test_missing_imagenet_files_name_files_and_folder(tmp_path):
  config = smoke_config(str(tmp_path))
  manual = tmp_path / 'empty_manual'
  manual.mkdir()
  config.dataset.manual_dir = str(manual)
  workdir = tmp_path / 'work'
  with pytest.raises(builders.MissingDataError) as error:
    testlib.run_stage(squeeze, config, str(workdir))
  message = str(error.value)
  for name in builders.IMAGENET_MANUAL_FILES:
    assert name in message
  assert str(manual) in message
  assert not os.path.exists(workdir / 'squeeze')  # the workdir was not claimed


class ListSource:
  """A random-access source of ImageNet-like records (RGB, any size)."""

  def __init__(self, labels, seed=0):
    rng = np.random.default_rng(seed)
    self.records = []
    for label in labels:
      shape = (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3)
      self.records.append({'image': rng.integers(0, 256, shape, np.uint8), 'label': label})

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]

  def __getitems__(self, indices):
    return [self.records[i] for i in indices]


def test_random_subset_of_a_streaming_split(tmp_path):
  config = smoke_config(str(tmp_path))
  config.recover.num_classes = 10
  labels = [i % 12 for i in range(60)]  # 5 images of each of 12 classes
  split = streaming.StreamingSplit(ListSource(labels), len(labels), (224, 224, 3))
  with mock.patch.object(pipeline, 'load_split', lambda *_: split):
    images, subset_labels = image_sets.random_subset(config, 3)
    again, _ = image_sets.random_subset(config, 3)
    with pytest.raises(ValueError, match=r'random-subset baseline: 6 training images of every class are needed.*Remove "random" from evaluate.baselines'):
      image_sets.random_subset(config, 6)
  assert images.shape == (30, 224, 224, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(subset_labels, np.repeat(np.arange(10), 3))
  np.testing.assert_array_equal(images, again)  # a function of the seed
  # Every image is the centre crop of a distinct training record of its class.
  crops = {}
  for record in split.source.records:
    crops[streaming.center_crop(record['image'], (224, 224, 3)).tobytes()] = record['label']
  assert [crops[image.tobytes()] for image in images] == subset_labels.tolist()
  assert len({image.tobytes() for image in images}) == 30
