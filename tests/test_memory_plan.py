"""Recover in rounds and its memory plan: rounds give the images of one round, a run killed in
its second round resumes to them, the planned round is the largest that fits the stated memory
by XLA's own analysis, a round that cannot fit stops before training, and the dry run.

Fashion-MNIST shapes, a ConvNet-BN teacher of width 8 with random weights (`testlib`), on the
8 fake CPU devices of conftest.py.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from sre2l_jax import evaluate
from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import memory
from sre2l_jax import models
from sre2l_jax import recover
from sre2l_jax import rngs
from sre2l_jax import squeeze
from sre2l_jax import synthesis
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.synthesis import optimize
from sre2l_jax.synthesis import sre2l

import testlib

SPEC = datasets.get_spec('fashion_mnist')
WIDTH = 8
# 12 images per class in groups of 5 classes: 24 groups; on 8 devices one round holds them
# all (3 per device), rounds of 8 make 3 rounds (1 per device).
ROUNDS = dict(ipc=12, batch_size=5, iterations=6, checkpoint_every_steps=2, log_every_steps=2,
              r_bn=0.01)


def make_config(data_dir, **recover_overrides):
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.teacher.width = WIDTH
  config.dataset.data_dir = str(data_dir)
  config.mesh_shape = 8
  config.recover.update(**dict(ROUNDS, **recover_overrides))
  return config


@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('teacher_workdir'))
  testlib.write_teacher(make_config(data_dir), workdir, statistics='measured')
  return workdir


def new_workdir(teacher_workdir, path):
  shutil.copytree(os.path.join(teacher_workdir, 'squeeze'), os.path.join(path, 'squeeze'))
  return str(path)


def round_images(workdir):
  """Every finished round's float images, concatenated: (real groups, B, H, W, C)."""
  directory = os.path.join(workdir, 'recover', 'rounds')
  names = sorted(n for n in os.listdir(directory) if n.endswith('.npy'))
  return np.concatenate([np.load(os.path.join(directory, n)) for n in names])


def exported(workdir):
  root = os.path.join(workdir, 'recover', 'tfds')
  found = [r for r, _, names in os.walk(root) if 'dataset_info.json' in names]
  return export.read_tfds(found[0])


@pytest.fixture(scope='module')
def one_round(teacher_workdir, data_dir, tmp_path_factory):
  workdir = new_workdir(teacher_workdir, tmp_path_factory.mktemp('one_round'))
  return workdir, testlib.run_stage(recover, make_config(data_dir), workdir)


@pytest.fixture(scope='module')
def three_rounds(teacher_workdir, data_dir, tmp_path_factory):
  workdir = new_workdir(teacher_workdir, tmp_path_factory.mktemp('three_rounds'))
  return workdir, testlib.run_stage(recover, make_config(data_dir, groups_per_round=8), workdir)


@pytest.mark.equivalence
def test_rounds_give_the_same_images_as_one_round(one_round, three_rounds):
  (workdir1, result1), (workdir3, result3) = one_round, three_rounds
  assert (result1['rounds'], result1['groups_per_round']) == (1, 24)
  assert (result3['rounds'], result3['groups_per_round']) == (3, 8)
  assert result1['groups'] == result3['groups'] == 24
  images1, images3 = round_images(workdir1), round_images(workdir3)
  assert images1.shape == images3.shape == (24, 5) + SPEC.image_shape
  # Rounds change how many groups a device holds (3 vs 1), nothing a group computes.
  assert np.abs(images1 - images3).max() <= 1e-5
  assert np.abs(images1 - images1[:, :1]).max() > 0.1  # the images are not all alike...
  initial = optimize.initial_images(make_config('').recover, SPEC, *optimize.group_layout(
      10, 12, 5, 24)[:2], jax.random.split(rngs.stream_key(0, 'recover'))[0], 10)
  assert np.abs(images1 - np.asarray(initial)).max() > 0.1  # ...and they did move
  uint8_1, labels1 = exported(workdir1)
  uint8_3, labels3 = exported(workdir3)
  np.testing.assert_array_equal(labels1, labels3)
  np.testing.assert_array_equal(labels1, np.repeat(np.arange(10), 12))
  assert np.abs(uint8_1.astype(int) - uint8_3).max() <= 1  # rounding of equal floats
  for key in ('bn_loss_initial', 'bn_loss_final', 'bn_loss_unaugmented_final',
              'teacher_top1_on_synthetic'):
    assert result1[key] == pytest.approx(result3[key], rel=1e-4), key
  # The exports grew round by round: one file per round, and every PNG.
  rounds_dir = os.path.join(workdir3, 'recover', 'rounds')
  assert sorted(n for n in os.listdir(rounds_dir) if n.endswith('.npy')) == [
      f'round_{r:05d}.npy' for r in range(3)]
  pngs = os.path.join(workdir3, 'recover', 'images')
  assert sorted(os.listdir(pngs)) == [f'new{c:03d}' for c in range(10)]
  assert all(len(os.listdir(os.path.join(pngs, d))) == 12 for d in os.listdir(pngs))


@pytest.mark.equivalence
def test_killed_in_the_second_round_resumes_to_the_same_images(three_rounds, teacher_workdir,
                                                               data_dir, tmp_path):
  workdir = new_workdir(teacher_workdir, tmp_path / 'killed')
  checkpoints = os.path.join(workdir, 'recover', 'checkpoints')
  overrides = {'dataset.data_dir': data_dir, 'teacher.width': WIDTH, 'mesh_shape': 8,
               **{f'recover.{k}': v for k, v in dict(ROUNDS, groups_per_round=8).items()}}
  command = testlib.main_command('fashion_mnist_ipc10', workdir, stages='recover',
                                 overrides=overrides)
  iterations = ROUNDS['iterations']
  # Orbax steps are round * iterations + step: (6, 12) is inside the second round.
  in_second_round = lambda: [s for s in testlib.checkpoint_steps(checkpoints)
                             if iterations < s < 2 * iterations]
  testlib.kill_when(command, in_second_round, str(tmp_path / 'log.txt'))
  killed_step = testlib.checkpoint_steps(checkpoints)[-1]
  assert iterations < killed_step < 2 * iterations
  rounds_dir = os.path.join(workdir, 'recover', 'rounds')
  assert os.path.exists(os.path.join(rounds_dir, 'round_00000.json'))
  assert not os.path.exists(os.path.join(rounds_dir, 'round_00001.json'))
  first_round = file_stats(rounds_dir)

  testlib.run_command(command)
  result = files.read_json(os.path.join(workdir, 'recover', 'result.json'))
  assert result['resumed_from_step'] == killed_step
  assert (result['rounds'], result['groups_per_round']) == (3, 8)
  # The finished round was not redone; the resumed rounds equal the uninterrupted run's.
  after = file_stats(rounds_dir)
  assert all(after[name] == stat for name, stat in first_round.items())
  ref_workdir, ref_result = three_rounds
  np.testing.assert_array_equal(round_images(workdir), round_images(ref_workdir))
  images, labels = exported(workdir)
  ref_images, ref_labels = exported(ref_workdir)
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(labels, ref_labels)
  for key in ('bn_loss_initial', 'bn_loss_final', 'teacher_top1_on_synthetic'):
    assert result[key] == ref_result[key], key


def file_stats(directory):
  """{file: (size, mtime)} of a folder: detects a rewrite."""
  return {n: (os.stat(os.path.join(directory, n)).st_size,
              os.stat(os.path.join(directory, n)).st_mtime_ns) for n in os.listdir(directory)}


# ----------------------------------------------------------------------------- the plan


def test_planned_round_is_the_largest_that_fits_by_xla(data_dir):
  # 40 images per class: 80 groups, 10 per device in one round. The stated memory holds
  # a few groups per device by XLA's analysis of this very step, not all of them.
  config = make_config(data_dir, ipc=40)
  cfg = config.recover
  mesh = batching.create_mesh(8)
  model = recover.create_teacher_model(config, SPEC)
  teacher = models.abstract_variables(model, SPEC.image_shape)
  rng = jax.random.key(0)
  tx = optimize.create_optimizer(cfg)
  step = optimize.create_recover_step(
      optimize.Recovery(synthesis.get_method(cfg.method), model, cfg, tx,
                        optimize.pixel_bounds(SPEC), mesh),
      optimize.state_shardings(tx, (8, 5) + SPEC.image_shape, mesh))
  step_peak = lambda groups: memory.analyse(optimize.compile_recover_step(
      step, tx, groups, 5, SPEC.image_shape, mesh, teacher, rng)).peak_bytes
  # A round runs its step and, at its start and end, the measure pass: it must fit both.
  factory = recover._step_factory  # pylint: disable=protected-access
  _, measure_at, _ = factory(config, SPEC, mesh, teacher, rng)
  peak = lambda groups: max(step_peak(groups), measure_at(groups).peak_bytes)
  one, two = peak(8), peak(16)
  per_group = two - one
  assert per_group > 0
  budget_gib = (one + 2.5 * per_group) / memory.GIB  # room for ~3 groups per device
  config.recover.update(device_memory_gb=budget_gib, memory_margin=1.0)

  # A dry run: reads and writes nothing.
  out = recover.plan(config, '/nonexistent', testlib.context_of(config))
  plan = out['plans']['this device']
  budget = int(budget_gib * memory.GIB)
  assert plan['budget_bytes'] == budget
  groups = plan['groups_per_round']
  assert groups % 8 == 0 and 8 <= groups < 80
  assert plan['rounds'] == -(-80 // groups)
  # XLA's own analysis of the step at the largest size fits and one more group per device
  # does not; the rounds take that size or, balanced, fewer groups.
  largest = plan['largest_groups_per_round']
  assert groups <= largest < 80 and largest % 8 == 0
  assert peak(largest) <= budget < peak(largest + 8)
  assert peak(groups) == plan['peak_bytes'] <= budget
  assert step_peak(groups) == plan['step']['peak_bytes']


def test_round_that_cannot_fit_stops_before_training(teacher_workdir, data_dir, tmp_path):
  workdir = new_workdir(teacher_workdir, tmp_path / 'w')
  config = make_config(data_dir, groups_per_round=24, device_memory_gb=1e-4)
  with pytest.raises(MemoryError, match=r'A round of 24 groups .* does not fit: XLA plans '
                                        r'peak .* over the [0-9.]+ KiB available per device\. '
                                        r'.*set recover\.device_memory_gb=[0-9.]+ '):
    testlib.run_stage(recover, config, workdir)
  stage = os.path.join(workdir, 'recover')
  assert not os.path.exists(os.path.join(stage, 'checkpoints')) or not os.listdir(
      os.path.join(stage, 'checkpoints'))
  assert not os.path.exists(os.path.join(stage, 'rounds'))


def test_memory_arithmetic():
  assert memory.balanced_rounds(500, 18, 1) == (28, 18)
  assert memory.balanced_rounds(500, 33, 1) == (16, 32)
  assert memory.balanced_rounds(24, 8, 8) == (3, 8)
  assert memory.balanced_rounds(6, 24, 8) == (1, 8)
  with pytest.raises(ValueError, match='fewer than the 8 devices'):
    memory.balanced_rounds(24, 7, 8)
  assert memory.fit_line([1, 2, 4], [5.0, 7.0, 11.0]) == pytest.approx((3.0, 2.0))
  line = lambda n: memory.MemoryReport(0, 0, 3 + 2 * n + (n > 6), 0, 0)  # one bump past 6
  plan = memory.plan_units(line, budget_bytes=17, max_units=100)
  assert plan.units == 6 and plan.fits  # the line says 7; XLA's peak at 7 says no
  assert memory.plan_units(line, 100, max_units=4).units == 4
  with pytest.raises(MemoryError, match='One unit needs'):
    memory.plan_units(line, 4, max_units=10)
  assert memory.preset_for('NVIDIA H100 80GB HBM3') == 'h100'
  assert memory.preset_for('TPU v5 lite') == 'tpu_v5e'
  assert memory.preset_for('cpu') is None


def test_host_plan_counts_the_process_the_devices_on_cpu_and_the_passes():
  cpu = memory.host_plan(100, {'checkpoint save': 40, 'round end': 70}, 'cpu', 8)
  assert cpu.process_bytes > 0 and cpu.device_bytes == 800  # CPU devices are host memory
  assert cpu.peak_bytes == cpu.process_bytes + 800 + 110  # freed passes stay resident
  accelerator = memory.host_plan(100, {'export': 5}, 'gpu', 8)
  assert accelerator.device_bytes == 0 and 'export' in accelerator.describe()
  assert memory.check_host_fits(cpu, 'recover') == ''
  huge = memory.HostPlan(0, 0, {'export': 2**62})
  assert 'groups_per_round' in memory.check_host_fits(huge, 'recover')


def test_recover_writes_its_host_plan(one_round):
  """24 groups of 5 Fashion-MNIST images in one round on 8 CPU devices: the state (images and
  Adam's two moments, float32) saved through a host copy, the round's images copied off the
  devices as float32, uint8 and PNG, the whole set exported by process 0."""
  workdir, _ = one_round
  plan = files.read_json(os.path.join(workdir, 'recover', 'plan.json'))
  pixels = 24 * 5 * 28 * 28
  host = plan['host']
  assert host['passes'] == {'checkpoint save': memory.CHECKPOINT_HOST_FACTOR * 3 * 4 * pixels,
                            'round end': 6 * pixels, 'export': 3 * 10 * 12 * 784 + 4 * pixels}
  assert host['device_bytes'] == 8 * plan['peak_bytes']
  assert host['peak_bytes'] == (host['process_bytes'] + host['device_bytes']
                                + sum(host['passes'].values()))


def test_dry_run_of_the_imagenet_config_needs_no_data_or_teacher(tmp_path):
  workdir = str(tmp_path / 'w')
  command = [sys.executable, '-m', 'sre2l_jax.main',
             f'--config={testlib.config_file("in1k_ipc50")}:smoke', f'--workdir={workdir}',
             '--stages=recover', '--dry_run', '--config.mesh_shape=1',
             '--config.recover.device_memory_gb=0.1']
  done = subprocess.run(command, cwd=testlib.REPO, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'recover plan (dry run' in done.stdout
  assert 'imagenet2012, resnet18, 224x224' in done.stdout
  assert 'groups of 5 images in' in done.stdout and 'projected' in done.stdout
  assert 'host: peak' in done.stdout
  assert not os.path.exists(workdir)  # nothing written


# ----------------------------------------------------------------------------- remat


@pytest.mark.equivalence
def test_rematerialised_loss_and_gradient_are_the_same(data_dir):
  # A ResNet-18 teacher (small stem, width 8) on Fashion-MNIST shapes; random statistics.
  config = make_config(data_dir)
  config.teacher.update(name='resnet18', stem='small', width=WIDTH)
  model, teacher = testlib.random_teacher(config)
  cfg = config.recover
  images = jax.random.normal(jax.random.key(3), (5,) + SPEC.image_shape)
  labels, uids = np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32)

  def loss_and_grad(remat):
    with cfg.unlocked():
      cfg.remat = remat
    fn = lambda x: sre2l.group_loss(x, labels, uids, jax.random.key(4), jax.numpy.float32(0.5),
                                    model=model, teacher=teacher, cfg=cfg)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(images)
    return float(loss), np.asarray(metrics['bn_loss_per_layer']), np.asarray(grad)

  loss, per_layer, grad = loss_and_grad('none')
  assert per_layer.shape == (1 + 2 * 8 + 3,)  # stem, two per block, three downsamples
  assert np.abs(grad).max() > 0
  for remat in ('teacher', 'blocks'):
    r_loss, r_per_layer, r_grad = loss_and_grad(remat)
    assert r_loss == pytest.approx(loss, rel=1e-5), remat
    np.testing.assert_allclose(r_per_layer, per_layer, rtol=1e-5, err_msg=remat)  # call order
    assert np.linalg.norm(r_grad - grad) <= 1e-5 * np.linalg.norm(grad), remat
  with pytest.raises(ValueError, match="remat='blocks' needs a ResNet teacher"):
    sre2l.teacher_forward(images, model=models.create_model(make_config('').teacher, 10),
                          teacher=None, remat='blocks')


# ----------------------------------------------------------------------------- squeeze, students


def test_squeeze_and_student_steps_that_cannot_fit_stop_before_training(data_dir, tmp_path):
  """A stated device memory no step can fit (1 KiB) stops squeeze and evaluate with a
  MemoryError naming the batch, before any training step or checkpoint."""
  config = make_config(data_dir)
  config.device_memory_gb = 2**-20  # 1 KiB
  workdir = str(tmp_path / 'w')
  with pytest.raises(MemoryError, match=r'squeeze.batch_size=64 .*does not fit'):
    testlib.run_stage(squeeze, config, workdir)
  assert not testlib.checkpoint_steps(os.path.join(workdir, 'squeeze', 'checkpoints'))

  testlib.write_teacher(config, workdir)
  spec = datasets.get_spec('fashion_mnist')
  images = np.random.default_rng(0).integers(0, 256, (20,) + spec.image_shape, np.uint8)
  export.write_tfds(image_sets.distilled_dir(workdir), images,
                    np.repeat(np.arange(10), 2).astype(np.int32), 10)
  config.evaluate.baselines = ()
  with pytest.raises(MemoryError, match=r'student.batch_size=16 .*does not fit'):
    testlib.run_stage(evaluate, config, workdir)
  # Nothing trained: no student checkpoint anywhere under evaluate/.
  assert not any('checkpoints' in root and dirs for root, dirs, _ in
                 os.walk(os.path.join(workdir, 'evaluate')))
