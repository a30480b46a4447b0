"""Evaluating a distilled set made elsewhere (evaluate.images_dir): a folder in the reference
repos' layout gives the numbers the same images give when recovered in the workdir."""

import os

import numpy as np
import pytest

from sre2l_jax import evaluate
from sre2l_jax import export
from sre2l_jax import image_sets
from sre2l_jax.data import datasets
import testlib

SPEC = datasets.get_spec('fashion_mnist')
IPC = 2


def make_config(data, **evaluate):
  config = testlib.fashion_config(data)
  config.teacher.width = config.student.width = 8
  config.recover.ipc = IPC
  config.student.epochs = 2
  config.evaluate.update(baselines=('random', 'hard_label'), **evaluate)
  return config


@pytest.mark.equivalence
@pytest.mark.slow  # ~50 s: two evaluations of four student variants
def test_reference_layout_folder_equals_the_recovered_set(data, tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10 * IPC,) + SPEC.image_shape, np.uint8)
  labels = np.repeat(np.arange(10), IPC).astype(np.int32)
  workdir = str(tmp_path / 'recovered')
  testlib.write_teacher(make_config(data), workdir)
  export.write_tfds(image_sets.distilled_dir(workdir), images, labels, 10)
  # new{class:03d}/class{class:03d}_id{i:03d}.png: the reference's names, lossless.
  folder = str(tmp_path / 'external')
  export.write_image_folder(folder, images.reshape((10, IPC) + SPEC.image_shape))
  assert sorted(os.listdir(os.path.join(folder, 'new003'))) == ['class003_id000.png',
                                                               'class003_id001.png']

  read, read_labels = image_sets.external_set(folder, SPEC, 10, IPC)
  np.testing.assert_array_equal(read, images)  # pixels and order: the numbers' premise
  np.testing.assert_array_equal(read_labels, labels)
  recovered = testlib.run_stage(evaluate, make_config(data), workdir)
  other = str(tmp_path / 'other')  # no distilled set of its own; the same teacher
  external = testlib.run_stage(
      evaluate, _with_teacher(make_config(data, images_dir=folder), workdir), other)
  assert external['images_dir'] == folder
  for name in ('distilled', 'random', 'distilled_hard', 'random_hard'):
    assert external['variants'][name]['test_top1'] == recovered['variants'][name]['test_top1']
  # Keyed on content: a changed folder is a new set (its students' folder), never reused.
  config = make_config(data, images_dir=folder)
  export.write_image_folder(folder, 255 - images.reshape((10, IPC) + SPEC.image_shape))
  changed, _ = image_sets.external_set(folder, SPEC, 10, IPC)
  assert (evaluate.student_settings(config, False, changed) !=
          evaluate.student_settings(config, False, images))


def _with_teacher(config, workdir):
  config.squeeze.teacher_dir = os.path.join(workdir, 'squeeze', 'teacher')
  return config


def test_bad_images_dir_is_one_line(data, tmp_path):
  config = make_config(data, images_dir=str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='is not a folder'):
    evaluate.validate(config, None)  # refused before the context is read
  folder = tmp_path / 'set'
  export.write_image_folder(str(folder), np.zeros((10, 3) + SPEC.image_shape, np.uint8))
  with pytest.raises(ValueError, match=r'holds 3 images; recover.ipc=2 .*--config.recover.ipc=3 if'):
    image_sets.external_set(str(folder), SPEC, 10, IPC)
