"""Several teachers (teacher.extra_teachers): specs, folders, loading, the recover loss as
the sum of the teachers' losses, soft labels as the average of theirs, squeeze training them."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import image_sets
from sre2l_jax import models
from sre2l_jax import recover
from sre2l_jax import squeeze
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import teacher_store
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.synthesis import sre2l

import testlib

EXTRA = ('convnet:width=6,depth=2', 'convnet:width=4,depth=1,pooling=max')


def _config(data_dir=''):
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.teacher.update(width=8, extra_teachers=EXTRA)
  config.dataset.data_dir = data_dir
  return config


def test_specs_and_folders():
  config = _config()
  spec = teacher_lib.parse_spec('convnet:width=32,depth=2', config.teacher)
  assert (spec.name, spec.width, spec.depth, spec.pooling) == ('convnet', 32, 2, 'avg')
  assert 'extra_teachers' not in spec
  with pytest.raises(ValueError, match='colour'):
    teacher_lib.parse_spec('convnet:colour=3', config.teacher)
  extras = teacher_lib.extra_configs(config, '/w')
  assert [w for _, w in extras] == ['/w/squeeze/teachers/convnet-width6-depth2',
                                    '/w/squeeze/teachers/convnet-width4-depth1-poolingmax']
  assert [(c.teacher.width, c.teacher.depth, c.teacher.pooling) for c, _ in extras] == [
      (6, 2, 'avg'), (4, 1, 'max')]
  assert all(c.teacher.extra_teachers == () for c, _ in extras)
  # A new extra teacher does not disturb the main teacher's squeeze run.
  plain = _config()
  plain.teacher.extra_teachers = ()
  assert fingerprints.record('squeeze', plain) == fingerprints.record('squeeze', config)


def _ensemble(config, seed=0):
  loaded = [testlib.random_teacher(config, seed)] + [
      testlib.random_teacher(c, seed + i + 1)
      for i, (c, _) in enumerate(teacher_lib.extra_configs(config, ''))]
  spec = datasets.get_spec(config.dataset.name)
  model = teacher_lib.create_model(config, spec.num_classes)
  assert isinstance(model, models.Ensemble) and len(model.members) == 3
  return loaded, model, models.ensemble.combine_variables([v for _, v in loaded])


@pytest.mark.equivalence
@pytest.mark.slow  # eager gradients of four teachers
def test_recover_loss_is_the_sum_of_the_teachers_losses():
  config = _config()
  loaded, model, variables = _ensemble(config)
  cfg = config.recover
  images = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  labels, uids = jnp.arange(2), jnp.arange(2)
  key, scale = jax.random.key(2), jnp.float32(0.5)

  def loss(x, m, v):
    return sre2l.group_loss(x, labels, uids, key, scale, model=m, teacher=v, cfg=cfg)

  total, metrics = loss(images, model, variables)
  singles = [loss(images, m, v) for m, v in loaded]
  np.testing.assert_allclose(total, sum(l for l, _ in singles), rtol=1e-5)
  for name in ('ce', 'bn_loss'):
    np.testing.assert_allclose(metrics[name], sum(m[name] for _, m in singles), rtol=1e-5)
  np.testing.assert_allclose(metrics['bn_loss_per_layer'], np.concatenate(
      [m['bn_loss_per_layer'] for _, m in singles]), rtol=1e-5)
  assert metrics['bn_loss_per_layer'].shape == (3 + 2 + 1,)
  grad = jax.grad(lambda x: loss(x, model, variables)[0])(images)
  grads = sum(jax.grad(lambda x, m=m, v=v: loss(x, m, v)[0])(images) for m, v in loaded)
  np.testing.assert_allclose(grad, grads, rtol=1e-4, atol=1e-6)
  bn, _ = sre2l.unaugmented_bn_loss(images, model=model, teacher=variables, cfg=cfg)
  np.testing.assert_allclose(bn, sum(sre2l.unaugmented_bn_loss(
      images, model=m, teacher=v, cfg=cfg)[0] for m, v in loaded), rtol=1e-5)


def test_soft_labels_are_the_average_of_the_teachers():
  config = _config()
  loaded, model, variables = _ensemble(config)
  t = config.evaluate.temperature
  assert model.temperature == t
  x = jax.random.normal(jax.random.key(3), (5, 28, 28, 1))
  got = jax.nn.softmax(model.apply(variables, x) / t)
  expected = np.mean([jax.nn.softmax(m.apply(v, x) / t) for m, v in loaded], axis=0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_load_all_and_load_read_each_teachers_folder(tmp_path):
  config = _config()
  workdir = str(tmp_path)
  written = [testlib.write_teacher(config, workdir, seed=0)[1]] + [
      testlib.write_teacher(c, w, seed=i + 1)[1]
      for i, (c, w) in enumerate(teacher_lib.extra_configs(config, workdir))]
  mesh = batching.create_mesh(8)
  loaded = teacher_lib.load_all(config, workdir, mesh)
  assert len(loaded) == 3
  for (_, got), want in zip(loaded, written):
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  model, variables = teacher_lib.load(config, workdir, mesh)
  assert isinstance(model, models.Ensemble)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables,
                         models.ensemble.combine_variables(written))
  shutil_dir = os.path.join(workdir, 'squeeze', 'teachers', 'convnet-width6-depth2')
  os.rename(shutil_dir, shutil_dir + '.gone')
  with pytest.raises(teacher_store.TeacherError, match='convnet-width6-depth2'):
    teacher_lib.load(config, workdir, mesh)


def test_extra_teachers_live_beside_a_given_teacher_dir(tmp_path):
  # With squeeze.teacher_dir (a teacher trained by another workdir), the extra teachers are
  # read from beside it, where that workdir's squeeze trained them, not from this workdir.
  config = _config()
  trained_in = str(tmp_path / 'teacher_run')
  config.squeeze.teacher_dir = os.path.join(trained_in, 'squeeze', 'teacher')
  got = [w for _, w in teacher_lib.extra_configs(config, str(tmp_path / 'other'))]
  config.squeeze.teacher_dir = ''
  want = [w for _, w in teacher_lib.extra_configs(config, trained_in)]
  assert got == want and got[0] == os.path.join(trained_in, 'squeeze', 'teachers',
                                               'convnet-width6-depth2')


@pytest.mark.slow
def test_squeeze_trains_every_teacher(data_dir, tmp_path):
  config = _config(data_dir)
  config.teacher.extra_teachers = EXTRA[:1]
  config.squeeze.epochs = 1
  config.dataset.train_limit = 256
  workdir = str(tmp_path)
  testlib.run_stage(squeeze, config, workdir)
  extra_workdir = os.path.join(workdir, 'squeeze', 'teachers', 'convnet-width6-depth2')
  meta = files.read_json(os.path.join(extra_workdir, 'squeeze', 'teacher', 'teacher.json'))
  assert meta['signature']['model']['width'] == 6 and meta['signature']['model']['depth'] == 2
  testlib.assert_share_of(meta['test_top1'], config.dataset.test_limit)
  model, _ = teacher_lib.load(config, workdir, batching.create_mesh(8))
  assert isinstance(model, models.Ensemble) and len(model.members) == 2


def test_recover_accepts_several_teachers_for_the_methods_that_sum_them():
  config = _config()
  spec = datasets.get_spec(config.dataset.name)
  # rded's candidates within the smoke split's classes (recover.validate counts them).
  config.recover.rded.update(factor=1, candidates=10)
  for method in ('sre2l', 'rded'):
    config.recover.method = method
    recover.validate(config, testlib.context_of(config, spec=spec))
  config.recover.method = 'edc'  # per-class statistics of one teacher
  with pytest.raises(ValueError, match='extra_teachers'):
    recover.validate(config, testlib.context_of(config, spec=spec))


def test_recover_teachers_main_lets_a_one_teacher_method_run_beside_extra_teachers():
  config = _config()
  config.recover.method = 'edc'
  config.recover.teachers = 'main'
  spec = datasets.get_spec(config.dataset.name)
  recover.validate(config, testlib.context_of(config, spec=spec))
  alone = teacher_lib.for_recover(config)
  # a copy: the caller's config keeps its teachers, for relabel and evaluate
  assert alone.teacher.extra_teachers == () and config.teacher.extra_teachers == EXTRA
  config.recover.teachers = 'first'
  with pytest.raises(ValueError, match="recover.teachers='first'"):
    recover.validate(config, testlib.context_of(config, spec=spec))


def test_recover_teachers_main_without_extra_teachers_is_recorded_as_all():
  """Without extra teachers 'main' and 'all' recover the same images: one record, so a
  workdir recovered under either is resumed and relabelled under the other."""
  config = _config()
  config.teacher.extra_teachers = ()
  main = config.copy_and_resolve_references()
  main.recover.teachers = 'main'
  assert (fingerprints.record('recover', teacher_lib.for_recover(main))
          == fingerprints.record('recover', teacher_lib.for_recover(config)))
  assert main.recover.teachers == 'main'  # the caller's config is left as it is
  config.teacher.extra_teachers = main.teacher.extra_teachers = EXTRA
  assert (fingerprints.record('recover', teacher_lib.for_recover(main))
          != fingerprints.record('recover', teacher_lib.for_recover(config)))


def _write_teachers(config, workdir):
  testlib.write_teacher(config, workdir, seed=0)
  for i, (c, w) in enumerate(teacher_lib.extra_configs(config, workdir)):
    testlib.write_teacher(c, w, seed=i + 1)


def _recovered(config, workdir):
  testlib.run_stage(recover, config, workdir)
  return image_sets.distilled_set(workdir)[0]


@pytest.mark.slow
def test_recover_teachers_main_recovers_against_the_main_teacher_alone(data_dir, tmp_path):
  """recover.teachers='main': the images of a run without the extra teachers (the same
  program on the same inputs in this process: equal), not those of their summed losses;
  the set is accepted for relabel under the config that names the extras, whose Ensemble
  labels it, and refused under teachers='all' (recorded settings differ)."""
  config = _config(data_dir)
  config.teacher.extra_teachers = EXTRA[:1]
  config.recover.update(ipc=1, iterations=4)
  main, every, plain = (str(tmp_path / n) for n in ('main', 'all', 'plain'))
  for workdir in (main, every):
    _write_teachers(config, workdir)
  testlib.write_teacher(config, plain, seed=0)
  config.recover.teachers = 'main'
  images = _recovered(config, main)
  alone = config.copy_and_resolve_references()
  alone.teacher.extra_teachers = ()
  np.testing.assert_array_equal(images, _recovered(alone, plain))
  summed = config.copy_and_resolve_references()
  summed.recover.teachers = 'all'
  assert not np.array_equal(images, _recovered(summed, every))
  image_sets.check_recovered(config, main, images)
  model, _ = teacher_lib.load(config, main, batching.create_mesh(config.mesh_shape))
  assert isinstance(model, models.Ensemble) and len(model.members) == 2
  with pytest.raises(ValueError, match='other settings'):
    image_sets.check_recovered(summed, main, images)


def test_stored_labels_of_several_teachers_depend_on_the_temperature():
  """The Ensemble's logits are taken at evaluate.temperature: stored labels must not be
  reused at another."""
  config = _config()
  config.relabel.storage = 'float16'
  hot = config.copy_and_resolve_references()
  hot.evaluate.temperature = 2 * config.evaluate.temperature
  assert fingerprints.record('labels', config) != fingerprints.record('labels', hot)
  config.teacher.extra_teachers = hot.teacher.extra_teachers = ()
  one, other = fingerprints.record('labels', config), fingerprints.record('labels', hot)
  assert {k: (v, other[k]) for k, v in one.items() if v != other[k]} == {}
