"""Recover stage: device-count invariance, per-group statistics, a PyTorch reference of the
loss and its gradient, SIGKILL + resume, bad input, and the exports.

The teacher is a ConvNet-BN with random weights and BN parameters, and running statistics
taken from its own BN inputs on random smooth images (`testlib.random_teacher`, 'measured'
statistics): no training is needed to exercise the stage. Models are tiny (width 8).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image
from torch import nn as tnn

from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import models
from sre2l_jax import recover
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import teacher_store
from sre2l_jax import train_lib
from sre2l_jax.data import datasets
from sre2l_jax.synthesis import optimize
from sre2l_jax.synthesis import sre2l

import testlib
from benchmarks import torch_reference

SPEC = datasets.get_spec('fashion_mnist')
WIDTH = 8
# The run shared by the resume test (a subprocess, killed and re-run) and the "loss falls"
# and export tests. Groups of 5 classes, 3 images per class: 6 real groups (8 devices would
# pad them to 8). The config's lr and r_bn (0.25, 0.01).
# r_bn 0.01 (ImageNet's): the CE term keeps the random teacher's labels reachable.
RUN = dict(ipc=3, batch_size=5, iterations=40, checkpoint_every_steps=2, log_every_steps=2,
           r_bn=0.01)


def make_config(data_dir, mesh_shape=1, width=WIDTH, **recover_overrides):
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.teacher.width = width
  config.dataset.data_dir = str(data_dir)
  config.mesh_shape = mesh_shape
  config.recover.update(ipc=2, iterations=6, checkpoint_every_steps=3, log_every_steps=3)
  config.recover.update(**recover_overrides)
  return config


def random_teacher(config, seed=0, var_scale=1.0):
  """A random teacher whose running statistics recover can approach: (model, variables).

  Arbitrary random running statistics would mostly be unreachable by any image, and the BN
  loss could not fall. `var_scale` scales the first running variances (a poisoned teacher).
  """
  return testlib.random_teacher(config, seed, statistics='measured', var_scale=var_scale)


def write_teacher(config, workdir, **kwargs):
  _, variables = testlib.write_teacher(config, workdir, statistics='measured', **kwargs)
  return variables


def tfds_dir(root):
  """The builder directory (holding dataset_info.json) under a `write_tfds` root."""
  found = [r for r, _, files in os.walk(root) if 'dataset_info.json' in files]
  assert len(found) == 1, found
  return found[0]


def restore_state(workdir, step=None):
  """(step, state as numpy) of a recover checkpoint (the latest by default)."""
  return testlib.restore_checkpoint(os.path.join(workdir, 'recover', 'checkpoints'), step)


def listing(directory):
  """Every file under `directory` with its size and mtime: detects any modification."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory, data_dir):
  """A workdir holding only `squeeze/teacher` (random weights and running statistics)."""
  workdir = str(tmp_path_factory.mktemp('teacher_workdir'))
  write_teacher(make_config(data_dir), workdir)
  return workdir


def new_workdir(teacher_workdir, path):
  shutil.copytree(os.path.join(teacher_workdir, 'squeeze'), os.path.join(path, 'squeeze'))
  return str(path)


# ----------------------------------------------------------------------------- 1 vs 8 devices


@pytest.mark.equivalence
@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_images(teacher_workdir, data_dir, tmp_path):
  # 8 devices pad the 6 real groups to 8; each device then holds one group.
  overrides = dict(RUN, iterations=6, checkpoint_every_steps=3, log_every_steps=3)
  outputs = {}
  for devices in (1, 8):
    workdir = new_workdir(teacher_workdir, tmp_path / f'devices{devices}')
    result = testlib.run_stage(
        recover, make_config(data_dir, mesh_shape=devices, **overrides), workdir)
    assert result['devices'] == devices
    assert result['groups'] == 6
    step, state = restore_state(workdir)
    assert step == 6 == int(state['step'])
    assert state['images'].shape == (6 if devices == 1 else 8, 5) + SPEC.image_shape
    images, labels = export.read_tfds(tfds_dir(result['outputs']['tfds']))
    outputs[devices] = (jax.tree_util.tree_map(lambda x: x[:6] if x.ndim == 5 else x, state),
                        images, labels, result)
  state1, images1, labels1, result1 = outputs[1]
  state8, images8, labels8, result8 = outputs[8]
  # Equal up to float rounding. XLA's CPU kernels round differently for a batch of 6 groups
  # (1 device) and of 1 group (8 devices): gradients differ by ~1e-7 relative. Adam turns
  # that into more on a pixel whose gradient is ~eps (1e-8), where m / (sqrt(v) + eps) is
  # most sensitive (3e-4 was seen once with another teacher); here the maximum is ~2e-5,
  # inside the 1e-4 the issue asks for. A real device dependence (statistics pooled across
  # groups, keys tied to the device, padding groups leaking into real ones) moves every
  # pixel by O(lr).
  diff = np.abs(state1['images'] - state8['images'])
  assert np.mean(diff <= 1e-5) >= 0.999, np.quantile(diff, [0.5, 0.999, 1.0])
  assert diff.max() <= 1e-4
  adam1, adam8 = state1['opt_state'][0], state8['opt_state'][0]
  for moment in ('mu', 'nu'):  # running averages of the gradients: no eps amplification
    assert (np.abs(adam1[moment] - adam8[moment]).max() <=
            1e-4 * np.abs(adam1[moment]).max()), moment
  assert np.abs(images1.astype(int) - images8).max() <= 1
  assert np.mean(images1 == images8) >= 0.999
  np.testing.assert_array_equal(labels1, labels8)
  np.testing.assert_array_equal(labels1, np.repeat(np.arange(10), 3))
  assert result1['bn_loss_initial'] == pytest.approx(result8['bn_loss_initial'], rel=1e-5)
  assert result1['bn_loss_final'] == pytest.approx(result8['bn_loss_final'], rel=1e-4)
  assert result1['teacher_top1_on_synthetic'] == result8['teacher_top1_on_synthetic']


# ----------------------------------------------------------------------------- per group


@pytest.mark.slow
def test_statistics_are_per_group(data_dir):
  config = make_config(data_dir)
  cfg = config.recover
  model, teacher = random_teacher(config, seed=1)
  labels, uids, real = optimize.group_layout(10, 2, 10, 1)
  assert real == 2 and labels.shape == (2, 10)
  images = jax.random.normal(jax.random.PRNGKey(0), labels.shape + SPEC.image_shape)
  changed = images.at[0].set(
      jax.random.normal(jax.random.PRNGKey(1), labels.shape[1:] + SPEC.image_shape) * 2.0)
  key = jax.random.PRNGKey(7)
  keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(2))
  loss_fn = lambda x, y, u, k: sre2l.group_loss(x, y, u, k, jnp.float32(cfg.min_scale),
                                                  model=model, teacher=teacher, cfg=cfg)

  def total(x):  # like recover_step: the sum of the vmapped per-group losses
    losses, metrics = jax.vmap(loss_fn)(x, labels, uids, keys)
    return losses.sum(), (losses, metrics)

  loss_and_grad = jax.jit(jax.grad(total, has_aux=True))
  grad_a, (loss_a, metrics_a) = loss_and_grad(images)
  grad_b, (loss_b, metrics_b) = loss_and_grad(changed)
  # Group 1 does not see group 0's images...
  np.testing.assert_allclose(loss_b[1], loss_a[1], rtol=1e-6)
  for name in ('ce', 'bn_loss', 'bn_loss_per_layer', 'accuracy'):
    np.testing.assert_allclose(metrics_b[name][1], metrics_a[name][1], rtol=1e-6)
  np.testing.assert_allclose(grad_b[1], grad_a[1], rtol=1e-5, atol=1e-9)
  # ...while group 0's loss and gradient change.
  assert abs(float(loss_b[0] - loss_a[0])) > 1e-3 * abs(float(loss_a[0]))
  assert abs(float(metrics_b['bn_loss'][0] - metrics_a['bn_loss'][0])) > 1e-3
  assert np.abs(grad_b[0] - grad_a[0]).max() > 1e-3 * np.abs(grad_a[0]).max()

  # recover_step: one Adam step leaves group 1's images as they would be without group 0.
  tx = optax.adam(1e-1, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=1e-8)
  low, high = datasets.pixel_bounds(SPEC)
  recovery = optimize.Recovery(method=sre2l, model=model, cfg=cfg, tx=tx,
                               bounds=(jnp.asarray(low), jnp.asarray(high)))
  step = jax.jit(lambda s: optimize.recover_step(s, labels, uids, key, teacher, recovery))
  state_a, _ = step({'images': images, 'opt_state': tx.init(images), 'step': jnp.int32(0)})
  state_b, _ = step({'images': changed, 'opt_state': tx.init(changed), 'step': jnp.int32(0)})
  assert int(state_a['step']) == 1
  np.testing.assert_allclose(state_b['images'][1], state_a['images'][1], rtol=1e-6,
                             atol=1e-6)
  assert np.abs(state_a['images'][1] - images[1]).max() > 1e-2  # it did move
  assert np.abs(state_b['images'][0] - state_a['images'][0]).max() > 1e-2


# ----------------------------------------------------------------------------- PyTorch


def torch_twin(variables, depth):
  """The PyTorch reference ConvNet-BN holding the Flax teacher's variables, in float64."""
  net = torch_reference.build_model('convnet', SPEC.num_classes, SPEC.image_shape[-1],
                                    SPEC.image_shape[0], width=WIDTH, depth=depth)
  return torch_reference.load_flax_variables(net, variables).double().eval()


def torch_losses(net, images_nhwc, labels, first_bn_multiplier, r_bn):
  """The reference's BN-statistics loss (forward pre-hooks on BN inputs) and CE, with grads."""
  x = torch.from_numpy(np.asarray(images_nhwc, np.float64)).permute(0, 3, 1, 2)
  x = x.contiguous().requires_grad_(True)
  hooks = torch_reference.BNStatistics(net)
  logits = net(x)
  hooks.remove()
  bn_loss, per_layer = hooks.loss(first_bn_multiplier)
  assert len(per_layer) == len(hooks.layers) and per_layer.dtype == torch.float64
  bn_grad, = torch.autograd.grad(bn_loss, x, retain_graph=True)
  ce = tnn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(labels, np.int64)))
  total = ce + r_bn * bn_loss
  total_grad, = torch.autograd.grad(total, x)
  to_nhwc = lambda g: g.permute(0, 2, 3, 1).numpy()
  return (logits.detach().numpy(), float(bn_loss.detach()), to_nhwc(bn_grad),
          float(total.detach()), to_nhwc(total_grad))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.equivalence
def test_loss_and_gradient_match_pytorch(data_dir):
  config = make_config(data_dir, r_bn=0.05, crop='none', flip=False, jitter=0)
  cfg = config.recover
  model, teacher = random_teacher(config, seed=2)
  net = torch_twin(teacher, config.teacher.depth)
  images = jax.random.normal(jax.random.PRNGKey(3), (10,) + SPEC.image_shape)
  labels = jnp.asarray(np.random.default_rng(0).permutation(10), jnp.int32)
  t_logits, t_bn, t_bn_grad, t_total, t_total_grad = torch_losses(
      net, images, labels, cfg.first_bn_multiplier, cfg.r_bn)

  logits = model.apply(teacher, images, train=False)
  assert rel_err(logits, t_logits) <= 1e-5  # the twin is the same network

  def bn_loss(x):
    _, state = model.apply(teacher, x, train=False, mutable=[models.BN_INPUTS])
    return sre2l.bn_statistics_loss(state[models.BN_INPUTS], teacher['batch_stats'],
                                      cfg.first_bn_multiplier)[0]

  j_bn, j_bn_grad = jax.jit(jax.value_and_grad(bn_loss))(images)
  assert float(j_bn) > 1.0  # non-trivial: noise is far from the running statistics
  assert rel_err(j_bn, t_bn) <= 1e-4
  assert rel_err(j_bn_grad, t_bn_grad) <= 1e-4

  # The full loss of one group without augmentation (crop 'none', no flip, no jitter).
  def total(x):
    return sre2l.group_loss(x, labels, jnp.arange(10), jax.random.PRNGKey(0),
                              jnp.float32(1.0), model=model, teacher=teacher, cfg=cfg)

  (j_total, metrics), j_total_grad = jax.jit(jax.value_and_grad(total, has_aux=True))(images)
  assert rel_err(metrics['bn_loss'], t_bn) <= 1e-4
  assert rel_err(j_total, t_total) <= 1e-4
  assert rel_err(j_total_grad, t_total_grad) <= 1e-4
  # Both terms matter in this check.
  assert 0.1 < float(metrics['ce']) / (cfg.r_bn * float(metrics['bn_loss'])) < 10


# ----------------------------------------------------------------------------- resume


def main_command(workdir, data_dir, **recover_overrides):
  overrides = {'dataset.data_dir': data_dir, 'teacher.width': WIDTH, 'mesh_shape': 1}
  overrides.update({f'recover.{k}': v for k, v in dict(RUN, **recover_overrides).items()})
  return testlib.main_command('fashion_mnist_ipc10', workdir, stages='recover',
                              overrides=overrides)


@pytest.fixture(scope='module')
def reference_run(teacher_workdir, data_dir, tmp_path_factory):
  """The uninterrupted run, in process, on 1 device like the subprocesses: (workdir, result)."""
  workdir = new_workdir(teacher_workdir, tmp_path_factory.mktemp('reference'))
  result = testlib.run_stage(recover, make_config(data_dir, **RUN), workdir)
  return workdir, result


@pytest.fixture(scope='module')
def killed_run(teacher_workdir, data_dir, tmp_path_factory):
  """A workdir whose run was SIGKILLed right after its first checkpoint (do not modify)."""
  workdir = new_workdir(teacher_workdir, tmp_path_factory.mktemp('killed'))
  checkpoints = os.path.join(workdir, 'recover', 'checkpoints')
  # Asserts that the run died of the SIGKILL.
  testlib.kill_when(main_command(workdir, data_dir),
                    lambda: testlib.checkpoint_steps(checkpoints),
                    os.path.join(workdir, 'log.txt'))
  steps = testlib.checkpoint_steps(checkpoints)
  assert steps and steps[-1] < RUN['iterations'], f'killed too late: {steps}'
  assert not os.path.exists(os.path.join(workdir, 'recover', 'result.json'))
  return workdir


@pytest.mark.equivalence
@pytest.mark.slow
def test_sigkill_and_rerun_equals_uninterrupted_run(killed_run, reference_run, data_dir,
                                                    tmp_path):
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(killed_run, workdir)
  killed_step = testlib.checkpoint_steps(os.path.join(workdir, 'recover', 'checkpoints'))[-1]
  testlib.run_command(main_command(workdir, data_dir))
  result = files.read_json(os.path.join(workdir, 'recover', 'result.json'))
  assert 0 < result['resumed_from_step'] == killed_step < RUN['iterations']

  ref_workdir, ref_result = reference_run
  assert ref_result['resumed_from_step'] == 0
  images, labels = export.read_tfds(tfds_dir(os.path.join(workdir, 'recover', 'tfds')))
  ref_images, ref_labels = export.read_tfds(tfds_dir(ref_result['outputs']['tfds']))
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(labels, ref_labels)
  step, state = restore_state(workdir)
  ref_step, ref_state = restore_state(ref_workdir)
  assert step == ref_step == RUN['iterations']
  np.testing.assert_array_equal(state['images'], ref_state['images'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state, ref_state)
  for key in ('bn_loss_initial', 'bn_loss_final', 'teacher_top1_on_synthetic'):
    assert result[key] == ref_result[key], key


# ----------------------------------------------------------------------------- bad input


def test_missing_or_unfit_teacher(teacher_workdir, data_dir, tmp_path):
  config = make_config(data_dir)
  empty = str(tmp_path / 'empty')
  with pytest.raises(teacher_store.TeacherError, match=r'(?s)No teacher.*--stages=squeeze'):
    testlib.run_stage(recover, config, empty)
  assert not os.path.exists(os.path.join(empty, 'recover', 'fingerprint.json'))

  # The signature in teacher.json: another width, another class count.
  workdir = new_workdir(teacher_workdir, tmp_path / 'wide')
  with pytest.raises(teacher_store.TeacherError, match=r'does not fit.*width: saved 8, now 16'):
    testlib.run_stage(recover, make_config(data_dir, width=16), workdir)
  meta_path = os.path.join(workdir, 'squeeze', 'teacher', teacher_store.META)
  meta = files.read_json(meta_path)
  meta['signature']['num_classes'] = 100
  files.write_json(meta_path, meta)
  with pytest.raises(teacher_store.TeacherError, match=r'num_classes: saved 100, now 10'):
    testlib.run_stage(recover, config, workdir)

  # A teacher.json that fits but weights of another shape.
  workdir = str(tmp_path / 'mis_shaped')
  _, wide = random_teacher(make_config(data_dir, width=16))
  teacher_store.save(os.path.join(workdir, 'squeeze', 'teacher'), wide,
                          teacher_lib.teacher_meta(config, SPEC))
  with pytest.raises(teacher_store.TeacherError, match=r'weights .* do not match'):
    testlib.run_stage(recover, config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'recover', 'checkpoints'))


def test_bad_sizes(teacher_workdir, data_dir, tmp_path):
  workdir = new_workdir(teacher_workdir, tmp_path / 'w')
  with pytest.raises(ValueError, match=r'batch_size=3 .*must divide the 10 classes'):
    testlib.run_stage(recover, make_config(data_dir, batch_size=3), workdir)
  for ipc in (0, -1):
    with pytest.raises(ValueError, match=f'recover.ipc={ipc} must be a positive'):
      testlib.run_stage(recover, make_config(data_dir, ipc=ipc), workdir)
  assert not os.path.exists(os.path.join(workdir, 'recover'))


def test_divergence_from_the_start_stops_without_a_checkpoint(teacher_workdir, data_dir,
                                                             tmp_path):
  # r_bn = 1e38 makes r_bn * bn_loss overflow float32: the loss is infinite at step 1.
  # (A huge lr alone does not diverge: Adam's step is at most ~lr per pixel and the images
  # are clipped to the valid range after each step.) No augmentation: a smaller program.
  workdir = new_workdir(teacher_workdir, tmp_path / 'w')
  before = listing(os.path.join(workdir, 'squeeze'))
  config = make_config(data_dir, r_bn=1e38, crop='none', flip=False, jitter=0,
                       checkpoint_every_steps=1, log_every_steps=1)
  with pytest.raises(train_lib.DivergedError,
                     match=r'(?s)by step 1\..*recover\.lr.*recover\.r_bn') as error:
    testlib.run_stage(recover, config, workdir)
  assert 'No checkpoint had been saved yet' in str(error.value)
  assert listing(os.path.join(workdir, 'squeeze')) == before
  assert testlib.checkpoint_steps(os.path.join(workdir, 'recover', 'checkpoints')) == []
  assert not os.path.exists(os.path.join(workdir, 'recover', 'tfds'))


@pytest.mark.slow
def test_divergence_midway_keeps_the_last_good_checkpoint(killed_run, data_dir, tmp_path):
  """A run resumed from a good checkpoint diverges: it stops, and that checkpoint stays."""
  workdir = str(tmp_path / 'diverged')
  shutil.copytree(killed_run, workdir)
  checkpoints = os.path.join(workdir, 'recover', 'checkpoints')
  good_step, good_state = restore_state(workdir)
  assert np.isfinite(good_state['images']).all()
  # The teacher's first running variances become ~1e30: ||var - running_var||_2 overflows
  # float32, so the loss turns infinite at the first resumed step.
  config = make_config(data_dir, **RUN)
  write_teacher(config, workdir, var_scale=1e30)
  # Recorded as the teacher the run started with (recover keys on its digest and refuses
  # another teacher), so that the resumed run meets it.
  path = os.path.join(workdir, 'recover', 'fingerprint.json')
  files.write_json(path, dict(files.read_json(path), teacher_sha256=files.read_json(
      os.path.join(workdir, 'squeeze', 'teacher', teacher_store.META))['digest']))
  before = listing(os.path.join(workdir, 'squeeze'))
  with pytest.raises(train_lib.DivergedError,
                     match=rf'(?s)recover\.lr.*recover\.r_bn.*step {good_step}'):
    testlib.run_stage(recover, config, workdir)
  assert listing(os.path.join(workdir, 'squeeze')) == before
  assert testlib.checkpoint_steps(checkpoints)[-1] == good_step
  step, state = restore_state(workdir)
  assert step == good_step
  jax.tree_util.tree_map(np.testing.assert_array_equal, state, good_state)
  assert not os.path.exists(os.path.join(workdir, 'recover', 'result.json'))


# ----------------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_bn_loss_falls_and_exports(reference_run):
  workdir, result = reference_run
  assert result['iterations'] == RUN['iterations']
  assert result['bn_loss_final'] < 0.8 * result['bn_loss_initial'], result
  # The CE term works too: the teacher recognises well over chance (0.1) of the images.
  assert 0.2 < result['teacher_top1_on_synthetic'] <= 1.0, result
  assert result == files.read_json(os.path.join(workdir, 'recover', 'result.json'))

  ipc = RUN['ipc']
  builder = tfds.builder_from_directory(tfds_dir(result['outputs']['tfds']))
  assert builder.info.splits['train'].num_examples == ipc * 10
  images, labels = export.read_tfds(builder.data_dir)
  assert images.shape == (ipc * 10,) + SPEC.image_shape and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), ipc))
  # The exports are the last iterate, denormalised.
  _, state = restore_state(workdir)
  expected = optimize.to_class_major(datasets.denormalise(state['images'], SPEC), 10, ipc)
  np.testing.assert_array_equal(images, expected.reshape(images.shape))

  png = result['outputs']['png']
  assert sorted(os.listdir(png)) == [f'new{c:03d}' for c in range(10)]
  for c in range(10):
    assert sorted(os.listdir(os.path.join(png, f'new{c:03d}'))) == [
        f'class{c:03d}_id{i:03d}.png' for i in range(ipc)]
    for i in range(ipc):
      with Image.open(os.path.join(png, f'new{c:03d}', f'class{c:03d}_id{i:03d}.png')) as im:
        np.testing.assert_array_equal(np.asarray(im), images[c * ipc + i, ..., 0])
  with Image.open(result['outputs']['grid']) as grid:
    assert grid.width > 0 and grid.height > 2 * grid.width  # 10 rows, 3 columns
