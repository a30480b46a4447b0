"""Benchmark harness: JSON contents on tiny settings, and JAX/torch computing the same thing.

The torch reference (`benchmarks.torch_reference`) is only worth timing beside the JAX
steps if it computes the same thing: for recover the BN-statistics loss, the whole
un-augmented loss and its gradient with respect to the images; for the student step the KD
loss and its gradient on shared teacher and student weights; for squeeze the cross-entropy;
and the per-image crops of both sides are the same resampling.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch

from sre2l_jax import config_lib
from sre2l_jax import export
from sre2l_jax import image_sets
from sre2l_jax import models
from sre2l_jax import student
from sre2l_jax import train_lib
from sre2l_jax.data import augment
from sre2l_jax.data import datasets
from sre2l_jax.data import streaming
from sre2l_jax.synthesis import sre2l

from benchmarks import bench
from benchmarks import label_sharpness
from benchmarks import perturbation_control
from benchmarks import torch_reference

import testlib

RTOL = 1e-4
TINY = ['--model=convnet', '--width=8', '--depth=2', '--image_size=8', '--channels=1',
        '--num_classes=10', '--group_size=5', '--groups=2', '--steps=2', '--repeats=1',
        '--warmup=1', '--batch_size=4']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('bench') / 'out.json')
  out = bench.main(TINY + ['--what=recover,squeeze,student,relabel', '--reference=torch',
                           '--torch_threads=1',
                           f'--json={path}', '--label=tiny'])
  return out, path


@pytest.mark.slow
def test_json_has_every_workload_with_positive_throughput(tiny_run):
  out, path = tiny_run
  with open(path) as f:
    assert json.load(f) == json.loads(json.dumps(out))
  for key in ('backend', 'device_kind', 'jax_version', 'settings', 'results', 'notes'):
    assert key in out
  assert out['settings']['groups'] == 2 and out['settings']['group_size'] == 5
  units = {'recover': 'image_iterations_per_second', 'squeeze': 'images_per_second',
           'student': 'images_per_second', 'relabel': 'images_per_second',
           'torch_recover': 'image_iterations_per_second',
           'torch_squeeze': 'images_per_second', 'torch_student': 'images_per_second'}
  for what, unit in units.items():
    r = out['results'][what]
    assert r[unit] > 0 and r['throughput'] == r[unit] and r['throughput_unit'] == unit
    assert len(r['timings_s']) == 1 and r['seconds_per_step'] > 0
    assert 'peak_bytes_in_use' in r
  recover_result = out['results']['recover']
  assert recover_result['images_per_step'] == 10 and recover_result['finite']
  assert recover_result['flops_per_item'] > 0 and recover_result['compile_s'] > 0
  assert recover_result['imagenet_ipc50_4k_hours'] > 0
  assert set(out['ratios']) == {'recover_jax_over_torch', 'squeeze_jax_over_torch',
                                'student_jax_over_torch'}
  for what in ('recover', 'squeeze', 'student'):
    assert out['ratios'][f'{what}_jax_over_torch'] == pytest.approx(
        out['results'][what]['throughput'] / out['results'][f'torch_{what}']['throughput'])
    for side in (what, f'torch_{what}'):
      assert len(out['results'][side]['loadavg_before']) == 3
      assert len(out['results'][side]['loadavg_after']) == 3
  assert out['torch_threads'] == 1 and out['results']['torch_student']['threads'] == 1
  assert out['device_count'] == jax.device_count() and len(out['loadavg_at_start']) == 3


@pytest.mark.slow
def test_summarize_reads_the_json(tiny_run, tmp_path, capsys):
  _, path = tiny_run
  summary = bench.main([f'--summarize={path},{tmp_path}/absent.json',
                        f'--summary_json={tmp_path}/summary.json'])
  printed = capsys.readouterr().out
  assert 'torch_recover' in printed and 'missing' in printed
  assert len(summary['runs']) == 1 and len(summary['ratios']) == 3
  assert all(v > 0 for v in summary['ratios'].values())
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f)['ratios'] == summary['ratios']


def test_torch_only_run():
  out = bench.main(TINY + ['--what=recover', '--reference=torch', '--skip_jax',
                           '--torch_weight_grads', '--torch_amp=bf16'])
  assert list(out['results']) == ['torch_recover']
  r = out['results']['torch_recover']
  assert r['weight_grads'] and r['amp'] == 'bf16' and r['image_iterations_per_second'] > 0


def _shared(model_name, image_size, channels, **kw):
  args = bench.parse_args([f'--model={model_name}', '--width=8', f'--image_size={image_size}',
                           f'--channels={channels}', '--num_classes=10'] +
                          [f'--{k}={v}' for k, v in kw.items()])
  jax_model = models.create_model(bench.model_config(args.model, args, args.width), 10,
                                  dtype=jnp.float32)
  teacher = bench.teacher_variables(jax_model, (image_size, image_size, channels), seed=3)
  torch_model = torch_reference.build_model(args.model, 10, channels, image_size, width=8,
                                            depth=args.depth, stem=args.stem)
  torch_reference.load_flax_variables(torch_model, jax.device_get(teacher))
  return jax_model, teacher, torch_model


@pytest.mark.equivalence
def test_resnet18_bn_statistics_loss_and_logits_match_jax():
  """ImageNet stem (7x7/2 conv, max-pool), basic blocks with and without downsampling."""
  jax_model, teacher, torch_model = _shared('resnet18', 32, 3, stem='imagenet')
  x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)

  @jax.jit
  def jax_side(images):
    logits, state = jax_model.apply(teacher, images, train=False, mutable=[models.BN_INPUTS])
    total, per_layer = sre2l.bn_statistics_loss(state[models.BN_INPUTS],
                                                  teacher['batch_stats'], 10.0)
    return total, per_layer, logits

  total, per_layer, logits = jax.device_get(jax_side(x))
  t_total, t_per_layer, t_logits = torch_reference.bn_statistics_loss(
      torch_model, x.transpose(0, 3, 1, 2), 10.0)
  assert len(t_per_layer) == len(per_layer) == 20
  np.testing.assert_allclose(t_total, total, rtol=RTOL)
  np.testing.assert_allclose(t_per_layer, per_layer, rtol=RTOL)
  np.testing.assert_allclose(t_logits, logits, rtol=1e-3, atol=1e-4)


@pytest.mark.equivalence
def test_recover_loss_bn_loss_and_image_gradient_match_jax():
  """One group, augmentation off: the BN-statistics loss (total and per layer), the whole
  loss CE + r_bn * BN and d loss / d images of `sre2l.group_loss` against the reference."""
  jax_model, teacher, torch_model = _shared('convnet', 16, 1)
  cfg = config_lib.base_config().recover
  cfg.update(batch_size=5, crop='none', flip=False, jitter=0, r_bn=0.5)
  labels = np.array([[1, 3, 5, 7, 9]], np.int32)
  images = np.random.default_rng(1).normal(size=(1, 5, 16, 16, 1)).astype(np.float32)

  loss_fn = functools.partial(sre2l.group_loss, model=jax_model, teacher=teacher, cfg=cfg)
  (loss, metrics), grads = jax.device_get(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      images[0], labels[0], labels[0], jax.random.PRNGKey(0), jnp.float32(1.0)))

  ref = torch_reference.RecoverReference(
      torch_model, labels, (16, 16, 1), (0.5,), (0.25,), r_bn=cfg.r_bn,
      first_bn_multiplier=cfg.first_bn_multiplier, jitter=0, crop=False, flip=False,
      init_images=images.transpose(0, 1, 4, 2, 3))
  t_loss = float(ref.step_group(0).detach())
  t_bn, t_per_layer = (v.detach().numpy() for v in ref.hooks.loss(cfg.first_bn_multiplier))
  t_grad = ref.inputs[0].grad.numpy().transpose(0, 2, 3, 1)
  ref.hooks.remove()
  np.testing.assert_allclose(t_bn, metrics['bn_loss'], rtol=RTOL)
  np.testing.assert_allclose(t_per_layer, metrics['bn_loss_per_layer'], rtol=RTOL)
  np.testing.assert_allclose(t_loss, loss, rtol=RTOL)
  assert np.linalg.norm(t_grad - grads) <= 1e-3 * np.linalg.norm(grads)


@pytest.mark.equivalence
@pytest.mark.parametrize('arch', ['resnet50', 'resnet101'])
def test_bottleneck_resnets_take_the_flax_weights(arch):
  """Names and shapes only (nothing compiled): the torch model loads every Flax variable."""
  args = bench.parse_args([f'--model={arch}', '--width=8', '--image_size=32', '--channels=3'])
  model = models.create_model(bench.model_config(arch, args, 8), 10, dtype=jnp.float32)
  variables = bench.teacher_variables(model, (32, 32, 3), seed=0)
  torch_model = torch_reference.build_model(arch, 10, 3, 32, width=8)
  torch_reference.load_flax_variables(torch_model, variables)
  np.testing.assert_array_equal(torch_model.layer2[0].downsample[1].running_var.numpy(),
                                variables['batch_stats']['layer2_0']['downsample_bn']['var'])


@pytest.mark.equivalence
def test_torch_crops_resample_like_jax():
  """The torch steps' batched crops (one affine grid_sample) equal the JAX views' crops
  (`augment.crop_and_resize`, scale_and_translate) for the same boxes, edges included."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 12, 10, 2)).astype(np.float32)
  boxes = [streaming.sample_crop_box(rng, 12, 10, (0.08, 1.0)) for _ in range(16)]
  boxes[0] = (0, 0, 12, 10)  # the whole image: a copy (up to the affine map's rounding)
  jax_side = np.stack([np.asarray(augment.crop_and_resize(
      jnp.asarray(im), tuple(jnp.float32(v) for v in box), (12, 10)))
      for im, box in zip(images, boxes)])
  torch_side = torch_reference.crop_batch(
      torch.as_tensor(images.transpose(0, 3, 1, 2)), boxes, (12, 10)).numpy()
  np.testing.assert_allclose(torch_side.transpose(0, 2, 3, 1), jax_side, atol=1e-5)
  np.testing.assert_allclose(torch_side[0], images[0].transpose(2, 0, 1), atol=1e-5)


@pytest.mark.equivalence
def test_student_and_squeeze_losses_and_gradients_match_jax():
  """On shared weights and views (augmentation aside): the student step's KD loss (teacher
  eval mode, student training mode, KL at T 'batchmean') and its gradient, and squeeze's
  cross-entropy, equal the JAX side's."""
  jax_model, teacher, torch_teacher = _shared('convnet', 16, 1)
  _, student_vars, torch_student = _shared('convnet', 16, 1)
  student_vars = jax.tree_util.tree_map(lambda x: x * 0.9, student_vars)  # not the teacher
  torch_reference.load_flax_variables(torch_student, student_vars)
  x = np.random.default_rng(2).normal(size=(6, 16, 16, 1)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 5], np.int32)
  temperature = 4.0

  def kd_loss(params):
    targets = student.soft_targets(teacher, x, teacher_model=jax_model,
                                   temperature=temperature)
    logits, _ = jax_model.apply({'params': params, 'batch_stats': student_vars['batch_stats']},
                                x, train=True, mutable=['batch_stats'])
    return student.kl_divergence(logits, targets, temperature)

  loss, grads = jax.device_get(jax.value_and_grad(kd_loss)(student_vars['params']))
  ref = torch_reference.StudentReference(torch_teacher, torch_student, (16, 16, 1), (0.5,),
                                         (0.25,), temperature=temperature)
  t_loss = ref.loss(torch.as_tensor(x.transpose(0, 3, 1, 2)))
  t_loss.backward()
  np.testing.assert_allclose(float(t_loss.detach()), loss, rtol=RTOL)
  np.testing.assert_allclose(torch_student.fc.weight.grad.numpy().T,
                             grads['fc']['kernel'], rtol=1e-3, atol=1e-6)

  def ce_loss(params):
    logits, _ = jax_model.apply({'params': params, 'batch_stats': teacher['batch_stats']},
                                x, train=True, mutable=['batch_stats'])
    return train_lib.cross_entropy(logits, labels, 10)

  squeeze = torch_reference.SqueezeReference(torch_teacher.train(), (16, 16, 1), (0.5,),
                                             (0.25,), augment='flip')
  t_ce = squeeze.loss(torch.as_tensor(x.transpose(0, 3, 1, 2)),
                      torch.as_tensor(labels, dtype=torch.long))
  np.testing.assert_allclose(float(t_ce.detach()), float(ce_loss(teacher['params'])),
                             rtol=RTOL)


def test_crop_box_is_inside_the_image():
  # The reference's crops come from the host-side sampler the streaming input uses.
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = streaming.sample_crop_box(rng, 24, 32, (0.08, 1.0))
    assert 0 < h <= 24 and 0 < w <= 32 and 0 <= top <= 24 - h and 0 <= left <= 32 - w


@pytest.mark.slow
def test_profile_steps_puts_every_op_of_both_steps_in_a_kind(tmp_path):
  """benchmarks.profile_steps: the squeeze step of a 2-block ConvNet has 2 forward
  convolutions, their gradients to the kernels (2) and to the input of the second (1); the
  student step adds the frozen teacher's forward; every traced instruction is classified,
  and the kinds add up to the profiled step (between ops included)."""
  from benchmarks import profile_steps  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'profile.json')
  out = profile_steps.main(TINY + ['--what=squeeze,student', '--reference=torch',
                                   '--torch_threads=1', f'--json={path}'])
  with open(path) as f:
    assert json.load(f) == json.loads(json.dumps(out))
  for what in ('squeeze', 'student'):
    for side in ('jax', 'torch'):
      r = out['results'][what][side]
      assert set(r['ms_per_step']) == set(profile_steps.KINDS)
      assert sum(r['ms_per_step'].values()) == pytest.approx(r['profiled_step_ms'], rel=0.02)
    jax_ms = out['results'][what]['jax']['ms_per_step']
    for kind in ('conv forward', 'conv backward to kernel', 'conv backward to input',
                 'batchnorm', 'optimizer and metrics'):
      assert jax_ms[kind] > 0, (what, kind)
    torch_ms = out['results'][what]['torch']['ms_per_step']
    for kind in ('conv forward', 'conv backward (input and kernel)', 'batchnorm',
                 'optimizer and metrics', 'augmentation and random numbers'):
      assert torch_ms[kind] > 0, (what, kind)
  assert out['results']['student']['jax']['ms_per_step']['teacher forward'] > 0
  assert out['results']['student']['torch']['ms_per_step']['teacher forward'] > 0
  assert out['results']['squeeze']['jax']['ms_per_step']['teacher forward'] == 0


def test_profile_kinds_of_hlo_names():
  from benchmarks import profile_steps  # pylint: disable=g-import-not-at-top
  kind = profile_steps.jax_kind
  step = 'jit(classification_step)'
  # Convolutions as XLA writes them (a 2-block ConvNet, batch 4, 8 x 8 images): a forward
  # one, the gradient to the second block's input, the gradients to its kernels (XLA's
  # rewrites keep no op_name: the window over the activations tells them).
  conv = '%c = f32[4,8,8,8]{3,2,1,0} convolution(%a, %k), window={size=3x3 pad=1_1x1_1}, ' \
         'dim_labels=b01f_01io->b01f'
  to_input = conv.replace('[4,8,8,8]', '[4,4,4,8]')
  to_kernel = '%convolution.2 = f32[8,3,3,8]{3,2,1,0} convolution(%t, %u), ' \
              'window={size=4x4 pad=1_1x1_1}, dim_labels=b01f_01io->b01f'
  assert kind(f'{step}/jvp(ConvNet)/conv0/conv_general_dilated', conv) == 'conv forward'
  assert kind(f'{step}/transpose(jvp(ConvNet))/conv1/conv_general_dilated', to_input) == (
      'conv backward to input')
  assert kind('', to_kernel) == 'conv backward to kernel'
  assert kind('jit(stacked_student_step)/vmap(ConvNet)/conv0/conv_general_dilated', conv) == (
      'teacher forward')
  assert kind(f'{step}/jvp(ConvNet)/bn0/reduce_sum', None) == 'batchnorm'
  assert kind(f'{step}/vmap()/vmap(jit(_threefry_split))/train_augment/add', None) == (
      'augmentation and random numbers')
  assert kind(f'{step}/add', None) == 'optimizer and metrics'
  assert kind('', None) == 'XLA-made copies (no op_name)'
  assert profile_steps.union_ns([(0, 10), (5, 12), (20, 25)]) == 17
  assert profile_steps.shared_ns({'a': [(0, 10)], 'b': [(5, 15), (12, 20)]}) == {
      'a': 7.5, 'b': 12.5}  # 5 to 10 shared; b's own intervals merged


def test_conv_micro_variants_compute_the_same_convolution_and_gradients():
  from benchmarks import conv_micro  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.float32)
  want = jax.vjp(conv_micro.conv_nhwc, x, w)
  for variant in (conv_micro.conv_im2col, conv_micro.conv_shifted_dots):
    got = jax.vjp(variant, x, w)
    # float32 sums of 27 products (the kernel's gradient: 50), reordered: ~1e-6 relative;
    # 1e-5 leaves margin. A tap read from the wrong pixel is off by O(1).
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1](g), want[1](g)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  out = conv_micro.main(['--batch=2', '--size=5', '--in_channels=3', '--channels=4',
                         '--repeats=1', '--torch_threads=1'])
  assert set(out['rows']) == {'xla_nhwc', 'xla_nchw', 'im2col_dot', 'shifted_dots',
                              'dot_same_macs', 'torch'}
  assert all(row[k] > 0 for row in out['rows'].values()
             for k in ('forward', 'to_input', 'to_kernel'))


def test_student_workload_stacks_students_over_sets_as_evaluate_does(tmp_path):
  """bench --students=3 --sets=2 times evaluate's stacked step: student i (seed + i) trains
  on set i * 2 // 3, and after one step each equals that student stepped alone on its set
  (float rounding apart); the throughput counts an image once per student."""
  args = bench.parse_args(TINY + ['--what=student', '--students=3', '--sets=2'])
  spec, config = bench.dataset_spec(args), bench.bench_config(args)
  mesh = bench.batching.create_mesh(1)
  teacher_model = models.create_model(config.teacher, args.num_classes)
  teacher = bench.teacher_variables(teacher_model, spec.image_shape, args.seed)
  states, images, labels, set_index = bench.student_inputs(args, config, spec, mesh)
  assert set_index == (0, 0, 1) and images.shape[:2] == (2, args.batch_size)
  assert not np.array_equal(images[0], images[1])
  kernels = [k for k in jax.tree_util.tree_leaves(states.params) if k.ndim == 5][0]
  assert not np.allclose(kernels[0], kernels[1])  # a conv kernel (stacked): seeds differ
  key = jax.random.PRNGKey(7)
  before = jax.device_get(states)  # the step donates its states
  together, _ = student.create_student_step(config, spec, teacher_model, mesh, 'online',
                                            set_index)(states, images, labels, None, key,
                                                       teacher)
  model = models.create_model(config.student, args.num_classes)
  probe = jax.random.normal(jax.random.PRNGKey(1), (8,) + spec.image_shape)
  for i, s in enumerate(set_index):
    alone, _ = student.create_student_step(config, spec, teacher_model, mesh, 'online')(
        student.stack([student.unstack(before, i)]), images[s:s + 1], labels[s:s + 1],
        None, key, teacher)
    a, b = ({'params': t.params, 'batch_stats': t.batch_stats}
            for t in (student.unstack(together, i), student.unstack(alone, 0)))
    diff = testlib.network_differences(model, a, b, probe)
    # Rounding apart (the teacher's forward batched over 2 sets vs 1), and the conv biases
    # before a BatchNorm, whose gradient is noise (testlib.is_redundant). Another set or
    # another seed's student moves every parameter by about lr (2e-3) or more: > 1e-3.
    assert diff['params'] < 1e-4 and diff['logits'] < 1e-4, (i, diff)
  out = bench.main(TINY + ['--what=student', '--students=3', '--sets=2',
                           f'--json={tmp_path / "s.json"}'])
  r = out['results']['student']
  assert (r['students'], r['sets']) == (3, 2)
  assert r['images_per_second'] == pytest.approx(3 * args.batch_size / r['seconds_per_step'])
  with pytest.raises(SystemExit):
    bench.parse_args(TINY + ['--students=2', '--sets=3'])


def test_label_sharpness_measures_how_soft_a_teachers_labels_are(data_dir, tmp_path):
  """Uniform logits: entropy log C, top probability 1/C; the same logits scaled up: sharper
  at the same argmax. main reads a saved teacher and the test split, and gives the top-1 and
  the entropy of that teacher's own logits."""
  uniform = label_sharpness.sharpness(np.zeros((4, 10)), np.arange(4), 4.0)
  assert np.isclose(uniform['entropy'], np.log(10), rtol=1e-6)
  assert np.isclose(uniform['top_prob'], 0.1, rtol=1e-6)
  logits = np.random.default_rng(0).normal(size=(64, 10))
  labels = logits.argmax(-1)
  soft, sharp = (label_sharpness.sharpness(logits * s, labels, 4.0) for s in (1.0, 8.0))
  assert soft['top1'] == sharp['top1'] == 1.0
  assert sharp['entropy'] < soft['entropy'] and sharp['top_prob'] > soft['top_prob']
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.dataset.data_dir = data_dir
  testlib.write_teacher(config, str(tmp_path))
  teacher_dir = str(tmp_path / 'squeeze' / 'teacher')
  out = label_sharpness.main([f'--teacher_dirs={teacher_dir}', '--limit=64',
                              f'--config={testlib.config_file("fashion_mnist_ipc10")}:smoke',
                              f'--data_dir={data_dir}'])
  images, test_labels = label_sharpness.datasets.load_arrays(config.dataset, 'test', 64)
  expected = label_sharpness.sharpness(
      label_sharpness.teacher_forward(config, teacher_dir)(images), test_labels, 4.0)
  assert out['images'] == 64 and out['temperature'] == 4.0
  assert out['teachers'][teacher_dir] == expected
  assert 0 < expected['entropy'] < np.log(10)
  # --workdir: the teacher's labels on the image sets of a run (here a noise 'distilled' set).
  config.recover.ipc = 2
  noise, noise_labels = testlib.write_noise_set(str(tmp_path), ipc=2)
  out = label_sharpness.main([f'--teacher_dirs={teacher_dir}', f'--workdir={tmp_path}',
                              f'--config={testlib.config_file("fashion_mnist_ipc10")}:smoke',
                              '--set=recover.ipc=2', f'--data_dir={data_dir}'])
  assert sorted(out['sets']) == ['coreset', 'distilled', 'random']
  assert out['sets']['distilled'] == dict(label_sharpness.sharpness(
      label_sharpness.teacher_forward(config, teacher_dir)(noise), noise_labels, 4.0), images=20)
  assert out['sets']['random']['images'] == out['sets']['coreset']['images'] == 20  # --set
  assert all(0 < row['entropy'] < np.log(10) for row in out['sets'].values())
  with pytest.raises(ValueError, match='expected KEY=VALUE'):
    label_sharpness.set_value(config, 'recover.no_such_key=1')
  with pytest.raises(ValueError, match='expected KEY=VALUE'):
    label_sharpness.set_value(config, 'no_such_section.ipc=1')
  with pytest.raises(ValueError, match='one teacher'):
    label_sharpness.main([f'--teacher_dirs={teacher_dir},{teacher_dir}', f'--workdir={tmp_path}'])


def test_perturbation_control_moves_each_pixel_as_far_as_the_refinement_did(tmp_path):
  """benchmarks.perturbation_control: every pixel of the start moves by exactly the
  refinement's |change| at that pixel (away from the clip range), up or down at random; the
  Gaussian kind has the change's RMS; the folder it writes reads back as the control set."""
  start, labels = testlib.write_noise_set(str(tmp_path / 'start'), ipc=3)
  rng = np.random.default_rng(1)
  refined = np.clip(start.astype(int) + rng.integers(-6, 7, start.shape), 0, 255).astype(np.uint8)
  export.write_tfds(image_sets.distilled_dir(str(tmp_path / 'refined')), refined, labels, 10)
  change = np.abs(refined.astype(int) - start.astype(int))
  control = perturbation_control.perturb(start, refined, np.random.default_rng(0))
  moved = control.astype(int) - start.astype(int)
  inside = (start >= 6) & (start <= 249)  # no clipping possible
  np.testing.assert_array_equal(np.abs(moved)[inside], change[inside])
  assert (moved[inside] > 0).mean() == pytest.approx((moved[inside] < 0).mean(), abs=0.05)
  assert not np.array_equal(control, refined)  # random directions, not the refinement's
  noisy = perturbation_control.perturb(start, refined, np.random.default_rng(0), 'gaussian')
  rms = perturbation_control.rms
  assert rms(noisy[inside], start[inside]) == pytest.approx(rms(refined, start), rel=0.05)
  with pytest.raises(ValueError, match='differ in shape'):
    perturbation_control.perturb(start, refined[:-1], rng)

  out = perturbation_control.main([f'--start={tmp_path / "start"}',
                                   f'--refined={tmp_path / "refined"}',
                                   f'--out={tmp_path / "folder"}'])
  assert out['refined_rms'] == pytest.approx(rms(refined, start))
  spec = datasets.get_spec('fashion_mnist')
  read, read_labels = image_sets.external_set(str(tmp_path / 'folder'), spec, 10, 3)
  np.testing.assert_array_equal(read, control)
  np.testing.assert_array_equal(read_labels, labels)
