"""docs/architecture.md's recipes, followed to the letter: a toy dataset (a TFDS builder
writing ArrayRecord, registered with `datasets.register`) and a toy synthesis method (a
direct `synthesis.Method`, registered with `synthesis.register`), then the smoke pipeline
(squeeze, recover, relabel, evaluate) run on them through the stage runner."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sre2l_jax import image_sets
from sre2l_jax import runner
from sre2l_jax import synthesis
from sre2l_jax.data import builders
from sre2l_jax.data import datasets

import testlib

CLASSES, SIZE, PER_CLASS = 4, 16, 64


def stripe_images(label: int, count: int, rng: np.random.Generator) -> np.ndarray:
  """Class k: a bright horizontal band in the k-th quarter of the image, on noise."""
  images = rng.integers(0, 60, (count, SIZE, SIZE, 1), dtype=np.uint8)
  band = SIZE // CLASSES
  images[:, label * band:(label + 1) * band] = 200
  return images


# Recipe "a dataset", step 1: a builder that writes ArrayRecord without TensorFlow.
class ToyStripes(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=builders.image_features((SIZE, SIZE, 1), CLASSES),
                                 supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, PER_CLASS),
            'test': self._generate_examples(1, PER_CLASS // 2)}

  def _generate_examples(self, seed, count):
    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
      for i, image in enumerate(stripe_images(label, count, rng)):
        yield f'{label}_{i}', {'image': image, 'label': label}


# Recipe "a dataset", step 2: its spec, registered.
TOY_DATASET = datasets.register(datasets.DatasetSpec(
    name='toy_stripes', num_classes=CLASSES, image_shape=(SIZE, SIZE, 1), mean=(0.3,),
    std=(0.3,), train_augment='pad_crop_flip', pad=2,
    make_builder=lambda c: ToyStripes(data_dir=c.data_dir, file_format='array_record')))


# Recipe "a synthesis method": a direct method, each class's mean training image.
def class_means(config, spec, *, model, teacher, train, num_classes, mesh):
  del spec, model, teacher, mesh
  images, labels = train.arrays()
  means = np.stack([images[labels == k].mean(0) for k in range(num_classes)])
  return np.repeat(means.round().astype(np.uint8)[:, None], config.recover.ipc, axis=1)


def check_mean_settings(cfg, spec):
  del spec
  if cfg.ipc > 4:
    raise ValueError(f'class_mean: recover.ipc={cfg.ipc} repeats one image; use ipc <= 4.')


TOY_METHOD = synthesis.register(synthesis.Method(
    name='class_mean', kind='direct', synthesize=class_means, validate=check_mean_settings))


def toy_config(data_dir: str):
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.dataset.update(name='toy_stripes', data_dir=data_dir, train_limit=0, test_limit=0)
  config.teacher.update(width=8, depth=2)
  config.student.update(width=8, depth=2)
  config.squeeze.update(epochs=4, batch_size=32, eval_batch_size=64)
  config.recover.update(method='class_mean', ipc=2, batch_size=CLASSES)
  config.student.update(epochs=2, batch_size=8)
  config.evaluate.update(eval_batch_size=64, seeds=1, baselines=('random',))
  return config


def test_toy_dataset_and_method_run_the_pipeline(tmp_path):
  workdir = str(tmp_path / 'w')
  config = toy_config(str(tmp_path / 'data'))
  results = runner.run(config, workdir, ['squeeze', 'recover', 'relabel', 'evaluate'])
  assert results['squeeze']['test_top1'] > 0.9  # the stripes are easy: the dataset is real
  assert results['recover']['method'] == 'class_mean'
  # The distilled set is the registered method's: each class's mean image, ipc times.
  images, labels = image_sets.distilled_set(workdir)
  assert images.shape == (CLASSES * 2, SIZE, SIZE, 1)
  band = SIZE // CLASSES
  for k in range(CLASSES):
    bright = images[labels == k][:, k * band:(k + 1) * band].mean()
    assert bright > 150 and images[labels == k].mean() < bright
  assert set(results['evaluate']['variants']) == {'distilled', 'random'}
  assert os.path.exists(os.path.join(workdir, 'report.json'))
  # Its own validation runs up front, before squeeze trains.
  config.recover.ipc = 5
  with pytest.raises(ValueError, match='class_mean: recover.ipc=5'):
    runner.run(config, str(tmp_path / 'refused'), ['squeeze', 'recover'])
  assert not os.path.exists(os.path.join(tmp_path, 'refused', 'squeeze'))
