"""Squeeze stage: kill-and-resume equals an uninterrupted run, 8 vs 1 devices, bad input,
result.json contents. Runs the `smoke` Fashion-MNIST config on the real IDX files."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from absl import app

from sre2l_jax import checkpoint
from sre2l_jax import files
from sre2l_jax import runner
from sre2l_jax import squeeze
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import builders
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline

import testlib

# 8 steps/epoch (512 images, batch 64) x 3 epochs, a checkpoint every 2 steps.
OVERRIDES = {'squeeze.epochs': 3, 'squeeze.checkpoint_every_steps': 2}
TOTAL_STEPS = 24


def make_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The smoke config with OVERRIDES, then `overrides` ('a__b' means a.b)."""
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.dataset.data_dir = data_dir
  for key, value in {**OVERRIDES,
                     **{k.replace('__', '.'): v for k, v in overrides.items()}}.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def command(workdir, data_dir) -> list[str]:
  return testlib.main_command('fashion_mnist_ipc10', workdir, stages='squeeze',
                              overrides={'dataset.data_dir': data_dir, **OVERRIDES})


def teacher_arrays(config, workdir) -> dict:
  _, variables = teacher_lib.load(config, workdir, batching.create_mesh(-1))
  return jax.tree_util.tree_map(np.asarray, variables)


def snapshot(directory) -> dict:
  """Every path under `directory` with its size and mtime."""
  out = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs + names:
      st = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), directory)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def uninterrupted(fashion_mnist_tfds, tmp_path_factory):
  """One uninterrupted in-process squeeze run shared by the tests: (config, workdir, result)."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  config = make_config(fashion_mnist_tfds)
  result = testlib.run_stage(squeeze, config, workdir)
  return config, workdir, result


@pytest.mark.equivalence
@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(uninterrupted, fashion_mnist_tfds, tmp_path):
  config, ref_workdir, ref_result = uninterrupted
  workdir = tmp_path / 'killed'
  ckpt_dir = workdir / 'squeeze' / 'checkpoints'
  result_path = workdir / 'squeeze' / 'result.json'
  # The subprocesses inherit conftest's XLA_FLAGS: 8 devices like the in-process run.
  # kill_when asserts that the run died of the SIGKILL.
  testlib.kill_when(command(workdir, fashion_mnist_tfds),
                    lambda: testlib.checkpoint_steps(ckpt_dir), tmp_path / 'killed.log')
  assert not result_path.exists(), 'the killed run reached the end'
  steps_at_kill = testlib.checkpoint_steps(ckpt_dir)
  assert steps_at_kill and steps_at_kill[-1] < TOTAL_STEPS, steps_at_kill

  testlib.run_command(command(workdir, fashion_mnist_tfds))
  result = files.read_json(result_path)
  assert 0 < result['resumed_from_step'] < TOTAL_STEPS, result
  assert result['resumed_from_step'] >= steps_at_kill[-1]
  assert result['steps'] == ref_result['steps'] == TOTAL_STEPS
  assert ref_result['resumed_from_step'] == 0
  assert result['test_top1'] == ref_result['test_top1']

  ref, got = teacher_arrays(config, ref_workdir), teacher_arrays(config, str(workdir))
  assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(got)
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_result_json(uninterrupted):
  config, workdir, returned = uninterrupted
  result = files.read_json(os.path.join(workdir, 'squeeze', 'result.json'))
  assert result == json.loads(json.dumps(returned))
  assert result['stage'] == 'squeeze'
  assert result['dataset'] == 'fashion_mnist'
  assert result['model']['name'] == 'convnet' and result['model']['width'] == 16
  assert result['test_top1_unit'] == 'fraction'
  # 3 smoke epochs on 512 images beat chance (0.1) on the 256 test images.
  assert 0.15 < result['test_top1'] <= 1.0
  assert result['test_top1'] * 256 == round(result['test_top1'] * 256)
  assert result['epochs'] == config.squeeze.epochs == 3
  assert result['steps'] == TOTAL_STEPS
  assert result['devices'] == 8
  assert 0 < result['images_per_second'] < 1e7
  assert 0 < result['wall_seconds'] < 600
  assert os.path.exists(os.path.join(workdir, 'squeeze', 'teacher', 'teacher.json'))


def _train_steps(num_devices: int, steps: int = 3):
  """Losses and final params of a few classification steps on a `num_devices` mesh."""
  mesh = batching.create_mesh(num_devices)
  spec = datasets.get_spec('fashion_mnist')
  model_config = ml_collections.ConfigDict(dict(name='convnet', width=8, depth=1))
  from sre2l_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(model_config, spec.num_classes)
  opt_config = ml_collections.ConfigDict(dict(optimizer='sgd', weight_decay=5e-4,
                                              decay_all=False, momentum=0.9, nesterov=True))
  tx = train_lib.create_optimizer(opt_config, train_lib.warmup_cosine(0.1, 10, 2))
  state = train_lib.create_train_state(model, tx, spec.image_shape, jax.random.PRNGKey(0),
                                       mesh)
  sharded = batching.data_sharding(mesh)
  step = train_lib.create_classification_step(spec, mesh, label_smoothing=0.1)
  rng = np.random.default_rng(0)
  split = pipeline.InMemorySplit(rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
                                 rng.integers(0, 10, 64).astype(np.int32))
  batches = split.train_batches(16, 0, 0, sharded)
  losses = []
  for i in range(steps):
    batch = next(batches)
    assert len(batch['image'].sharding.device_set) == num_devices
    state, metrics = step(state, batch, jax.random.fold_in(jax.random.PRNGKey(1), i))
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.tree_util.tree_map(
      np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})


@pytest.mark.equivalence
@pytest.mark.slow
def test_8_devices_match_1_device():
  losses8, variables8 = _train_steps(8)
  losses1, variables1 = _train_steps(1)
  assert np.all(np.isfinite(losses8)) and losses8[0] != losses8[-1]
  np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(variables8), jax.tree_util.tree_leaves(variables1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_missing_fashion_mnist_files(tmp_path):
  source = tmp_path / 'empty'
  source.mkdir()
  config = make_config(str(tmp_path / 'fresh_tfds'))
  config.dataset.source_dir = str(source)
  workdir = tmp_path / 'workdir'
  with pytest.raises(builders.MissingDataError) as error:
    testlib.run_stage(squeeze, config, str(workdir))
  message = str(error.value)
  assert str(source) in message
  assert 'train-images-idx3-ubyte.gz' in message
  assert 'dataset-fashion-mnist' in message  # the Debian package
  assert 'source_dir' in message
  assert not workdir.exists()


@pytest.mark.parametrize('key, value, valid', [
    ('teacher.name', 'vgg19', ['convnet', 'resnet18', 'resnet50']),  # vgg11 is a student
    ('dataset.name', 'mnist', ['fashion_mnist', 'cifar10', 'imagenet2012']),
])
def test_unknown_names_list_valid_ones(tmp_path, key, value, valid):
  section, name = key.split('.')
  config = make_config(str(tmp_path / 'tfds'))
  config[section][name] = value
  with pytest.raises(ValueError) as error:
    testlib.run_stage(squeeze, config, str(tmp_path / 'workdir'))
  message = str(error.value)
  assert repr(value) in message and 'valid' in message
  for v in valid:
    assert v in message
  assert not (tmp_path / 'workdir').exists()


@pytest.mark.slow
@pytest.mark.parametrize('key, value, expected', [
    ('teacher.width', 8, 'teacher.width: saved 16, now 8'),
    ('squeeze.batch_size', 32, 'squeeze.batch_size: saved 64, now 32'),
    ('seed', 1, 'seed: saved 0, now 1'),
])
def test_config_mismatch_refused_before_touching_workdir(uninterrupted, tmp_path, key, value,
                                                         expected):
  config, ref_workdir, _ = uninterrupted
  workdir = tmp_path / 'copy'
  shutil.copytree(ref_workdir, workdir)
  before = snapshot(workdir)
  changed = ml_collections.ConfigDict(config.to_dict())
  if '.' in key:
    section, name = key.split('.')
    changed[section][name] = value
  else:
    changed[key] = value
  with pytest.raises(checkpoint.ConfigMismatchError) as error:
    testlib.run_stage(squeeze, changed, str(workdir))
  message = str(error.value)
  assert expected in message
  assert '--workdir' in message
  assert snapshot(workdir) == before


@pytest.mark.parametrize('batch_size, fragment', [
    (0, 'squeeze.batch_size=0 must be a positive multiple'),
    (-8, 'squeeze.batch_size=-8 must be a positive multiple'),
    (12, 'squeeze.batch_size=12 must be a positive multiple of the number of devices'),
    (1024, 'squeeze.batch_size=1024 exceeds the 512 training images'),
])
def test_bad_batch_sizes_refused(fashion_mnist_tfds, tmp_path, batch_size, fragment):
  config = make_config(fashion_mnist_tfds, squeeze__batch_size=batch_size)
  workdir = tmp_path / 'workdir'
  with pytest.raises(ValueError) as error:
    testlib.run_stage(squeeze, config, str(workdir))
  assert fragment in str(error.value)
  assert not isinstance(error.value, checkpoint.ConfigMismatchError)
  # A refused config leaves nothing behind, so the corrected one may use the same workdir.
  assert not workdir.exists(), snapshot(workdir)


def test_bad_eval_batch_size_refused(fashion_mnist_tfds, tmp_path):
  config = make_config(fashion_mnist_tfds, squeeze__eval_batch_size=100)
  with pytest.raises(ValueError, match=r'squeeze.eval_batch_size=100 must be a positive '
                                       r'multiple of the number of devices on the data axis '
                                       r'\(8\)'):
    testlib.run_stage(squeeze, config, str(tmp_path / 'workdir'))


def test_unknown_stage_refused():
  with pytest.raises(app.UsageError) as error:
    runner.parse_stages(['squeeze', 'sqeeze'])
  message = str(error.value)
  assert 'sqeeze' in message
  for stage in ('squeeze', 'recover', 'relabel', 'evaluate'):
    assert stage in message
  with pytest.raises(app.UsageError):
    runner.parse_stages([' ', ''])
  assert runner.parse_stages(['recover', 'squeeze']) == ['squeeze', 'recover']
