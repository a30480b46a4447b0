"""Relabel + evaluate: stored labels == online labels, exact view replay, top-k storage,
checksums and mismatches, missing stages, SIGKILL + resume of the students (trained
together), the report, and shard-level resume of relabel.

The teacher is a ConvNet-BN with random weights and random (non-trivial) BatchNorm running
statistics, and the distilled set is random uint8 noise (IPC 2): no squeeze or recover run
is needed. The data is conftest's `data`: the real Fashion-MNIST cut to its first images.
Models are tiny (width 8). Compilation dominates on a busy 2-core CPU, so besides the suite's
persistent compilation cache (conftest; subprocesses inherit it) the runs share programs: the
same relabel/student settings everywhere, so every student of a given label mode, the
re-runs of relabel and the resumed subprocess compile nothing new.
"""

import hashlib
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from sre2l_jax import evaluate
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import relabel
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

import testlib

SPEC = datasets.get_spec('fashion_mnist')
WIDTH = 8
IPC = 2  # 20 distilled images; student.batch_size 16 -> 2 steps per epoch (one wraps)
EPOCHS = 8  # relabel/student epochs of every run: 16 student steps
# Stored-vs-online tolerances (see test_stored_float32_and_online_train_the_same_student).
PARAM_ATOL = 1e-4  # float32 stored vs online (conv biases excepted, see max_abs_diff)
# float16 targets: measured 0 top-1 difference (of 256 test images) and a max parameter
# difference of 2.4e-3 after 16 steps; the tolerance allows ~5 test images.
FLOAT16_TOP1_TOL = 0.02


# What every run changes in the smoke config (also given as flags to the subprocesses).
OVERRIDES = {'teacher.width': WIDTH, 'student.width': WIDTH, 'recover.ipc': IPC,
             'student.epochs': EPOCHS, 'relabel.epochs_per_shard': 2,
             'evaluate.checkpoint_every_epochs': 1}


def make_config(data, *, evaluate_overrides=None, **relabel_overrides):
  config = testlib.fashion_config(data, OVERRIDES)
  config.relabel.update(**relabel_overrides)
  config.evaluate.update(**(evaluate_overrides or {}))
  return config


def sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def label_files(workdir):
  """{relative path: sha256} of every file under workdir/relabel/<set>/<labels>/ (not the
  stage's metrics in relabel/logs/, which a re-run appends to)."""
  out = {}
  root = os.path.join(workdir, 'relabel')
  for folder, _, names in os.walk(root):
    if folder != root and os.path.relpath(folder, root).split(os.sep)[0] != 'logs':
      for f in names:
        out[os.path.relpath(os.path.join(folder, f), root)] = sha256(os.path.join(folder, f))
  return out


def stored_dir(data, workdir, name='distilled', **relabel_overrides):
  """The stored labels of set `name` under make_config(data, mode='stored', ...)."""
  config = make_config(data, **{'mode': 'stored', 'storage': 'float32', **relabel_overrides})
  return label_store.label_dir(config, workdir, name)


def run_stages(config, workdir, stored):
  """relabel (stored mode) + evaluate in process; returns (evaluate result, final student
  variables of seed 0 per variant), read from the seed's folder (the finished student)."""
  if stored:
    testlib.run_stage(relabel, config, workdir)
  result = testlib.run_stage(evaluate, config, workdir)
  names = [name for name, _, _ in evaluate.variants(config)]
  caught = {}
  for name in names:
    _, state = testlib.restore_checkpoint(
        os.path.join(workdir, result['variants'][name]['dir'], 'seed0', 'checkpoints'))
    caught[name] = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return result, caught


def max_abs_diff(a, b):
  """Max |a - b| over two students' variables, the convolutions' biases and the BatchNorm
  running means that follow them excepted: each bias feeds a BatchNorm that subtracts it
  again, so its gradient is rounding noise, which Adam scales to steps of about the learning
  rate (the teacher's logits, computed for the stacked students' sets in one batch online and
  per set in relabel, round differently; see tests/test_students_together.py)."""
  a = traverse_util.flatten_dict(a, sep='/')
  b = traverse_util.flatten_dict(b, sep='/')
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a
             if not (k.startswith('params/conv') and k.endswith('/bias'))
             and not k.endswith('/mean'))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def base_workdir(data, tmp_path_factory):
  """A workdir holding a random teacher (squeeze/teacher) and a noise distilled set."""
  workdir = str(tmp_path_factory.mktemp('base'))
  testlib.write_teacher(make_config(data), workdir)
  testlib.write_noise_set(workdir, IPC, seed=0)
  return workdir


@pytest.fixture(scope='module')
def online_run(data, base_workdir, tmp_path_factory):
  workdir = testlib.copy_workdir(base_workdir, tmp_path_factory.mktemp('online') / 'w')
  result, students = run_stages(make_config(data, mode='online'), workdir, stored=False)
  return workdir, result, students


@pytest.fixture(scope='module')
def stored_float32_run(data, base_workdir, tmp_path_factory):
  """Stored float32 labels for the distilled set and the random baseline (do not modify)."""
  workdir = testlib.copy_workdir(base_workdir, tmp_path_factory.mktemp('stored32') / 'w')
  config = make_config(data, mode='stored', storage='float32')
  result, students = run_stages(config, workdir, stored=True)
  return workdir, result, students


@pytest.fixture(scope='module')
def stored_float16_run(data, base_workdir, tmp_path_factory):
  workdir = testlib.copy_workdir(base_workdir, tmp_path_factory.mktemp('stored16') / 'w')
  config = make_config(data, mode='stored', storage='float16',
                       evaluate_overrides=dict(baselines=()))
  result, students = run_stages(config, workdir, stored=True)
  return workdir, result, students


# ----------------------------------------------------------------------------- 1. stored == online


@pytest.mark.equivalence
@pytest.mark.slow
def test_stored_float32_and_online_train_the_same_student(online_run, stored_float32_run):
  _, online, online_students = online_run
  _, stored, stored_students = stored_float32_run
  assert set(online['variants']) == set(stored['variants']) == {'distilled', 'random'}
  report = {}
  for name in online['variants']:
    a, b = online['variants'][name], stored['variants'][name]
    assert (a['labels'], b['labels']) == ('online', 'stored')
    assert a['steps'] == b['steps'] == EPOCHS * 2
    diff = max_abs_diff(online_students[name], stored_students[name])
    report[name] = (a['test_top1'][0], b['test_top1'][0], diff)
    # 0.1 point of accuracy = 0.001 as a fraction (one test image is 0.0039).
    assert abs(a['test_top1_mean'] - b['test_top1_mean']) < 1e-3, report
    assert diff <= PARAM_ATOL, report
  print('stored float32 vs online (top-1 online, top-1 stored, max |param diff|):', report)


@pytest.mark.equivalence
@pytest.mark.slow
def test_stored_float16_is_close_to_online(online_run, stored_float16_run):
  _, online, online_students = online_run
  _, stored, stored_students = stored_float16_run
  a, b = online['variants']['distilled'], stored['variants']['distilled']
  diff = max_abs_diff(online_students['distilled'], stored_students['distilled'])
  print(f'stored float16 vs online: top-1 {a["test_top1"][0]} vs {b["test_top1"][0]}, '
        f'max |param diff| {diff:.3g}')
  assert abs(a['test_top1_mean'] - b['test_top1_mean']) <= FLOAT16_TOP1_TOL
  assert 0 < diff < 1e-2  # the same student up to float16 rounding of the targets


# ----------------------------------------------------------------------------- 2. exact replay


def views_fn(mesh, cfg):
  """batch_views jitted as label_store.write_labels jits it (same program, same shardings)."""
  fn = views.create_batch_views(cfg, SPEC, mesh)
  sharded = batching.data_sharding(mesh)
  return lambda key, x: [np.asarray(a) for a in fn(key, jax.device_put(x, sharded))]


@pytest.mark.slow
def test_views_replay_exactly(data):
  config = make_config(data)
  images = np.random.default_rng(3).integers(0, 256, (SPEC.num_classes * IPC,) + SPEC.image_shape,
                                            np.uint8)
  schedule = views.create_schedule(config, len(images))
  assert (schedule.batch_size, schedule.steps_per_epoch) == (16, 2)
  eight = views_fn(batching.create_mesh(8), config.relabel)
  one = views_fn(batching.create_mesh(1), config.relabel)
  replayed = {}
  for epoch, batch in ((0, 0), (0, 1), (1, 0), (3, 1)):
    key, x = schedule.view_key(epoch, batch), images[schedule.batch_indices(epoch, batch)]
    first, again, single = eight(key, x), eight(key, x), one(key, x)
    for a, b, c in zip(first, again, single):  # views, lam, partner
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, c)
    assert 0.0 < first[1] < 1.0  # mix_prob 1: every batch is mixed
    replayed[epoch, batch] = first
  # Other epochs or batches give other views and other mixing (lambda, partners).
  pairs = [((0, 0), (1, 0)), ((0, 0), (0, 1)), ((1, 0), (3, 1))]
  for u, v in pairs:
    assert not np.array_equal(replayed[u][0], replayed[v][0])
    assert (replayed[u][1] != replayed[v][1]
            or not np.array_equal(replayed[u][2], replayed[v][2]))
  # The key alone (same images in the same order) changes crops and mixing.
  x = images[schedule.batch_indices(0, 0)]
  assert not np.array_equal(one(schedule.view_key(0, 0), x)[0],
                            one(schedule.view_key(2, 0), x)[0])
  assert np.isfinite(replayed[0, 0][0]).all()
  assert replayed[0, 0][0].shape == (16,) + SPEC.image_shape


def test_schedule_covers_every_image_each_epoch():
  for num_images, batch in ((20, 16), (20, 4), (7, 8), (100, 32)):
    schedule = views.Schedule(num_images, batch, epochs=5, seed=1)
    orders = []
    for epoch in range(schedule.epochs):
      index = np.concatenate([schedule.batch_indices(epoch, b)
                              for b in range(schedule.steps_per_epoch)])
      assert index.shape == (schedule.steps_per_epoch * batch,)
      assert all(len(schedule.batch_indices(epoch, b)) == batch
                 for b in range(schedule.steps_per_epoch))
      assert set(index.tolist()) == set(range(num_images)), (num_images, batch, epoch)
      np.testing.assert_array_equal(
          index, np.concatenate([schedule.batch_indices(epoch, b)
                                 for b in range(schedule.steps_per_epoch)]))
      orders.append(index)
    assert not all(np.array_equal(orders[0], o) for o in orders[1:])
  # Pure function of the seed: another Schedule object replays it, another seed does not.
  a, b = views.Schedule(20, 16, 3, 0), views.Schedule(20, 16, 3, 0)
  np.testing.assert_array_equal(a.batch_indices(2, 1), b.batch_indices(2, 1))
  assert not np.array_equal(a.batch_indices(2, 0), views.Schedule(20, 16, 3, 1)
                            .batch_indices(2, 0))


# ----------------------------------------------------------------------------- 3. top-k


def test_topk_labels_are_small_and_keep_the_top_probabilities(data, base_workdir, tmp_path):
  # 100 images, 7 batches of 16 views (the students' batch, so nothing new is compiled),
  # 20 epochs in one shard: 2240 label rows.
  config = make_config(data, epochs=20, epochs_per_shard=20)
  mesh = batching.create_mesh(config.mesh_shape)
  model, teacher = teacher_lib.load(config, base_workdir, mesh)
  images = np.random.default_rng(5).integers(0, 256, (100,) + SPEC.image_shape, np.uint8)
  schedule = views.create_schedule(config, len(images))
  temperature = config.evaluate.temperature
  manifests, labels = {}, {}
  for storage in ('float16', 'topk'):
    cfg = ml_collections.ConfigDict(config.relabel.to_dict())
    cfg.update(storage=storage, topk=1)
    directory = str(tmp_path / storage)
    manifests[storage] = label_store.write_labels(
        directory, images, schedule, cfg, SPEC,
        label_store.create_teacher_logits(model, teacher, mesh), mesh, temperature)
    assert manifests[storage]['complete'] and len(manifests[storage]['shards']) == 1
    labels[storage] = label_store.StoredLabels.open(directory, images, schedule, temperature,
                                                views.view_settings(cfg))
  ratio = manifests['float16']['bytes'] / manifests['topk']['bytes']
  print(f'label bytes: float16 {manifests["float16"]["bytes"]}, top-k k=1 '
        f'{manifests["topk"]["bytes"]} ({ratio:.2f}x smaller)')
  assert ratio >= 5.0

  # The targets: rows sum to 1 and the top-k probabilities are kept (k=1 as stored; k=3
  # compressed here from the float16 logits of the same views).
  logits = labels['float16'].epoch(7)['logits']
  probs = np.asarray(jax.nn.softmax(logits.astype(np.float32) / temperature))
  stored_k1 = labels['topk'].epoch(7)
  assert stored_k1['topk_probs'].shape == stored_k1['topk_index'].shape == (7, 16, 1)
  assert stored_k1['topk_index'].dtype == np.uint8
  for k, stored in ((1, stored_k1), (3, label_store.compress(logits, 'topk', 3, temperature))):
    np.testing.assert_array_equal(stored['topk_index'], np.argsort(-probs, axis=-1)[..., :k])
    targets = np.asarray(label_store.targets_from_stored(stored, SPEC.num_classes, temperature))
    assert targets.shape == (7, 16, SPEC.num_classes)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
    index = stored['topk_index'].astype(np.int64)
    kept = np.take_along_axis(targets, index, -1)
    np.testing.assert_array_equal(kept, stored['topk_probs'].astype(np.float32))
    np.testing.assert_allclose(kept, np.take_along_axis(probs, index, -1), atol=1e-3)
    np.testing.assert_array_equal(targets.argmax(-1), index[..., 0])

  # Hand-made rows: the rest of the mass is spread evenly over the other classes.
  stored = {'topk_probs': np.asarray([[0.5, 0.3]], np.float16),
            'topk_index': np.asarray([[4, 1]], np.uint8)}
  targets = np.asarray(label_store.targets_from_stored(stored, 10, 1.0))
  expected = np.full((1, 10), (1 - 0.5 - np.float32(np.float16(0.3))) / 8, np.float32)
  expected[0, 4], expected[0, 1] = 0.5, np.float16(0.3)
  np.testing.assert_allclose(targets, expected, atol=1e-6)


# ----------------------------------------------------------------------------- 4. checksums


def _fresh_evaluate(stored_float32_run, path):
  """A copy of the stored float32 workdir without its evaluate results."""
  workdir = testlib.copy_workdir(stored_float32_run[0], path)
  shutil.rmtree(os.path.join(workdir, 'evaluate'))
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_corrupted_label_shard_is_refused(data, stored_float32_run, tmp_path, damage):
  workdir = _fresh_evaluate(stored_float32_run, tmp_path / 'w')
  manifest = files.read_json(os.path.join(stored_dir(data, workdir), label_store.MANIFEST))
  name = manifest['shards'][0]['file']
  path = os.path.join(stored_dir(data, workdir), name)
  with open(path, 'r+b') as f:
    if damage == 'flip':
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x01]))
    else:
      f.truncate(os.path.getsize(path) - 7)
  config = make_config(data, mode='stored', storage='float32')
  with pytest.raises(label_store.LabelError,
                     match=r'(?s)' + name + r'.*corrupted.*--stages=relabel'):
    testlib.run_stage(evaluate, config, workdir)


@pytest.mark.slow
def test_labels_of_other_images_are_refused(data, stored_float32_run, tmp_path):
  workdir = _fresh_evaluate(stored_float32_run, tmp_path / 'w')
  testlib.write_noise_set(workdir, IPC, seed=1)  # the distilled set changed after relabel
  config = make_config(data, mode='stored', storage='float32')
  with pytest.raises(label_store.LabelError, match=r'(?s)other images.*--stages=relabel'):
    testlib.run_stage(evaluate, config, workdir)


@pytest.mark.slow
@pytest.mark.parametrize('change, message', [
    (dict(student=dict(batch_size=8)), 'batch_size is 16 in the labels but 8 now'),
    (dict(seed=1), 'seed is 0 in the labels but 1 now'),
    (dict(student=dict(epochs=EPOCHS + 2)), f'epochs is {EPOCHS} in the labels'),
    (dict(relabel=dict(min_scale=0.5)), 'min_scale'),
    (dict(relabel=dict(mix='mixup')), 'mix'),
])
def test_labels_made_under_other_settings_are_refused(data, stored_float32_run, tmp_path,
                                                      change, message):
  """Labels of other settings live in another folder (evaluate finds none there), and the
  manifest refuses them if they are read for the other settings all the same."""
  workdir = _fresh_evaluate(stored_float32_run, tmp_path / 'w')
  config = make_config(data, mode='stored', storage='float32')
  config.relabel.update(**change.get('relabel', {}))
  config.student.update(**change.get('student', {}))
  if 'seed' in change:
    config.seed = change['seed']
  other = label_store.label_dir(config, workdir, 'distilled')
  assert other != stored_dir(data, workdir) and not os.path.exists(other)
  with pytest.raises(label_store.LabelError,
                     match=r'(?s)No stored labels at ' + other + r'.*--stages=relabel'):
    testlib.run_stage(evaluate, config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'evaluate', 'result.json'))
  images, _ = image_sets.distilled_set(workdir)
  with pytest.raises(label_store.LabelError, match=r'(?s)' + message + r'.*--stages=relabel'):
    label_store.StoredLabels.open(stored_dir(data, workdir), images,
                                  views.create_schedule(config, len(images)),
                                  config.evaluate.temperature,
                                  views.view_settings(config.relabel))


@pytest.mark.slow
def test_incomplete_labels_are_refused(data, stored_float32_run, tmp_path):
  """A relabel run killed between shards leaves a manifest without `complete`."""
  workdir = _fresh_evaluate(stored_float32_run, tmp_path / 'w')
  path = os.path.join(stored_dir(data, workdir), label_store.MANIFEST)
  manifest = files.read_json(path)
  os.remove(os.path.join(stored_dir(data, workdir), manifest['shards'][-1]['file']))
  manifest['shards'] = manifest['shards'][:-1]
  del manifest['complete'], manifest['bytes']
  files.write_json(path, manifest)
  config = make_config(data, mode='stored', storage='float32')
  with pytest.raises(label_store.LabelError, match=r'(?s)incomplete.*--stages=relabel'):
    testlib.run_stage(evaluate, config, workdir)


# ----------------------------------------------------------------------------- 5. missing stages


def test_missing_stages_are_named(data, base_workdir, tmp_path):
  config = make_config(data, mode='online')
  empty = str(tmp_path / 'empty')
  shutil.copytree(os.path.join(base_workdir, 'squeeze'), os.path.join(empty, 'squeeze'))
  with pytest.raises(FileNotFoundError, match=r'(?s)recover.*--stages=recover'):
    testlib.run_stage(evaluate, config, empty)
  with pytest.raises(FileNotFoundError, match=r'--stages=recover'):
    testlib.run_stage(relabel, make_config(data, mode='stored'), empty)
  workdir = testlib.copy_workdir(base_workdir, tmp_path / 'w')
  with pytest.raises(label_store.LabelError, match=r'(?s)No stored labels.*--stages=relabel'):
    testlib.run_stage(evaluate, make_config(data, mode='stored'), workdir)


# ----------------------------------------------------------------------------- 6. SIGKILL + resume


def main_command(workdir, data):
  return testlib.main_command(
      'fashion_mnist_ipc10', workdir, stages='evaluate',
      overrides={'dataset.data_dir': data['data_dir'], 'dataset.source_dir': data['source_dir'],
                 **OVERRIDES})


@pytest.mark.equivalence
@pytest.mark.slow
def test_sigkill_and_rerun_equals_uninterrupted_run(data, base_workdir, online_run, tmp_path):
  """The subprocess runs the online_run's configuration (its uninterrupted reference)."""
  # The students of this configuration: evaluate/distilled/<settings digest>/seed0.
  student = os.path.join(online_run[1]['variants']['distilled']['dir'], 'seed0')
  total = EPOCHS * 2
  workdir = testlib.copy_workdir(base_workdir, tmp_path / 'killed')
  # The students train together (evaluate/stacks/<digest>/checkpoints holds their state
  # until every result is written). Asserts that the run died of the SIGKILL.
  testlib.kill_when(main_command(workdir, data), lambda: stack_steps(workdir),
                    tmp_path / 'log.txt', timeout_s=240)
  killed_step = stack_steps(workdir)[-1]
  assert 0 < killed_step < total, f'killed too late: {stack_steps(workdir)}'
  assert not os.path.exists(os.path.join(workdir, student, 'result.json'))
  assert not os.path.exists(os.path.join(workdir, 'evaluate', 'result.json'))

  testlib.run_command(main_command(workdir, data), timeout_s=240)
  resumed = files.read_json(os.path.join(workdir, student, 'result.json'))
  assert resumed['resumed_from_step'] == killed_step > 0
  assert resumed['steps'] == total
  assert not stack_steps(workdir)  # removed once every member's result is written

  reference_dir, reference, _ = online_run
  ref_student = files.read_json(os.path.join(reference_dir, student, 'result.json'))
  assert ref_student['resumed_from_step'] == 0
  assert resumed['test_top1'] == ref_student['test_top1']
  result = files.read_json(os.path.join(workdir, 'evaluate', 'result.json'))
  assert result['variants'] == reference['variants']
  # The finished students (kept in their seed folders) hold the same state, bit for bit.
  checkpoints = os.path.join(workdir, student, 'checkpoints')
  ref_checkpoints = os.path.join(reference_dir, student, 'checkpoints')
  assert (testlib.checkpoint_steps(checkpoints)[-1] ==
          testlib.checkpoint_steps(ref_checkpoints)[-1] == total)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         testlib.restore_checkpoint(checkpoints, total)[1],
                         testlib.restore_checkpoint(ref_checkpoints, total)[1])


def stack_steps(workdir):
  """The finalized checkpoint steps of every stack of students in `workdir`'s evaluate."""
  root = os.path.join(workdir, 'evaluate', 'stacks')
  names = os.listdir(root) if os.path.isdir(root) else []
  return sorted(s for n in names for s in testlib.checkpoint_steps(
      os.path.join(root, n, 'checkpoints')))


# ----------------------------------------------------------------------------- 7. report


@pytest.mark.slow
def test_report_has_the_variants_and_the_storage_table(stored_float32_run, online_run):
  workdir, result, _ = stored_float32_run
  data = files.read_json(os.path.join(workdir, 'report.json'))
  variants = data['stages']['evaluate']['variants']
  assert set(variants) == {'distilled', 'random'}
  assert variants == result['variants']
  assert 'improvement_over_random' in data['dd_ranking']
  assert set(data['storage']) == {'distilled', 'random'}
  for name, s in data['storage'].items():
    manifest = files.read_json(os.path.join(workdir, s['dir'], label_store.MANIFEST))
    assert s['dir'].startswith(f'relabel/{name}/float32-')
    assert s['label_bytes'] == manifest['bytes'] > 0
    assert s['storage'] == 'float32'
    assert s['image_bytes'] == 10 * IPC * 28 * 28
  with open(os.path.join(workdir, 'report.md')) as f:
    md = f.read()
  assert '## Student top-1 on the real test split' in md
  assert '## Storage' in md
  for name in ('distilled', 'random'):
    assert f'| {name} | stored |' in md
    assert f'| {name} | {data["storage"][name]["label_bytes"]} | float32 |' in md
  assert 'evaluate' in data['wall_seconds'] and 'relabel' in data['wall_seconds']
  # Online mode: the same variants, no storage table.
  online_dir = online_run[0]
  online = files.read_json(os.path.join(online_dir, 'report.json'))
  assert set(online['stages']['evaluate']['variants']) == {'distilled', 'random'}
  assert not online.get('storage')
  with open(os.path.join(online_dir, 'report.md')) as f:
    assert '## Storage' not in f.read()


# ----------------------------------------------------------------------------- 8. relabel resume


@pytest.mark.equivalence
@pytest.mark.slow
def test_relabel_resumes_at_shard_granularity(data, stored_float32_run, tmp_path):
  first_dir = stored_float32_run[0]
  first = label_files(first_dir)
  workdir = testlib.copy_workdir(first_dir, tmp_path / 'w')
  directory = stored_dir(data, workdir)
  manifest = files.read_json(os.path.join(directory, label_store.MANIFEST))
  assert len(manifest['shards']) == EPOCHS // 2
  kept = {s['file']: os.stat(os.path.join(directory, s['file'])).st_mtime_ns
          for s in manifest['shards'][:-1]}
  os.remove(os.path.join(directory, manifest['shards'][-1]['file']))
  manifest['shards'] = manifest['shards'][:-1]
  del manifest['complete'], manifest['bytes']
  files.write_json(os.path.join(directory, label_store.MANIFEST), manifest)

  testlib.run_stage(relabel, make_config(data, mode='stored', storage='float32'), workdir)
  assert label_files(workdir) == first
  for name, mtime in kept.items():  # finished shards were not rewritten
    assert os.stat(os.path.join(directory, name)).st_mtime_ns == mtime


@pytest.mark.slow
def test_relabel_rewrites_from_the_first_bad_shard(data, stored_float32_run, tmp_path):
  """A corrupted middle shard: every shard from it on is rewritten, the labels equal the
  first run's (a later intact shard must not make relabel skip the bad one)."""
  first_dir = stored_float32_run[0]
  first = label_files(first_dir)
  workdir = testlib.copy_workdir(first_dir, tmp_path / 'w')
  directory = stored_dir(data, workdir)
  manifest = files.read_json(os.path.join(directory, label_store.MANIFEST))
  with open(os.path.join(directory, manifest['shards'][1]['file']), 'r+b') as f:
    f.truncate(100)
  testlib.run_stage(relabel, make_config(data, mode='stored', storage='float32'), workdir)
  assert label_files(workdir) == first


# ----------------------------------------------------------------------------- 9. EDC's student
