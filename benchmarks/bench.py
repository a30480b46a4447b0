"""Throughput harness: the recover, squeeze, student and relabel steps, beside a PyTorch recover.

  python -m benchmarks.bench --what=recover,squeeze,student,relabel --model=convnet --width=64 \
      --image_size=28 --channels=1 --num_classes=10 --group_size=10 --groups=10 \
      --dtype=float32 --repeats=5 --steps=20 --reference=torch --json=out.json

Every JAX workload is built by the stage's own step factory, so it is the program the stage
runs (one-axis mesh of `--devices` devices, shardings, donated state): recover
`synthesis.optimize.create_recover_step`, squeeze `squeeze.create_classification_step`,
student `student.create_student_step` (online soft labels, as evaluate), relabel
`views.create_batch_views` + `label_store.create_teacher_logits` (as `label_store.write_labels`).
Each is compiled ahead of time; the compilation and `--warmup` steps are excluded, then
`repeats` runs of `steps` steps each are timed to `block_until_ready` and the median is
reported. Units: recover in image-iterations/s (groups * group_size * steps / s); squeeze,
student and relabel in images/s. Inputs stay on the device (no host input pipeline is
measured). Teachers have random weights and random, non-trivial BatchNorm running
statistics. `--reference=torch` adds `torch_reference`'s twin of every requested workload
it has (recover on the same teacher weights; squeeze's teacher training step; the student
step with the teacher's forward, same teacher weights) on the same models and batch, and
reports each JAX / torch ratio; `--skip_jax` runs the torch side alone (run it with
JAX_PLATFORMS=cpu on a GPU so that JAX leaves the card to torch). Every result records the
machine's load average (os.getloadavg()) before and after it; the JSON records torch's thread
count and JAX's device count.
`--summarize=a.json,b.json` prints one table over several such JSON files (the GPU script's
last step) with the projected ImageNet-1K IPC50 recover time.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sre2l_jax import config_lib
from sre2l_jax import label_store
from sre2l_jax import models
from sre2l_jax import squeeze
from sre2l_jax import student
from sre2l_jax import synthesis
from sre2l_jax import train_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.synthesis import optimize

WORKLOADS = ('recover', 'squeeze', 'student', 'relabel')
TORCH_WORKLOADS = ('recover', 'squeeze', 'student')  # those with a PyTorch twin
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# ImageNet-1K IPC50 at 4K iterations: the headline recover run (~29 h on one RTX 4090).
IMAGENET_IPC50_IMAGE_ITERATIONS = 50_000 * 4_000


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--what', default='recover,squeeze,student,relabel',
                 help=f'comma list of {",".join(WORKLOADS)}')
  p.add_argument('--model', default='convnet', help='convnet, resnet18, resnet50, resnet101')
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--depth', type=int, default=3, help='convnet only')
  p.add_argument('--pooling', default='avg', help='convnet only: avg or max')
  p.add_argument('--stem', default='imagenet', help='resnets only: imagenet or small')
  p.add_argument('--student_model', default='', help='default: --model')
  p.add_argument('--student_width', type=int, default=0, help='default: --width')
  p.add_argument('--image_size', type=int, default=28)
  p.add_argument('--channels', type=int, default=1)
  p.add_argument('--num_classes', type=int, default=10)
  p.add_argument('--group_size', type=int, default=10, help='recover: images per BN group')
  p.add_argument('--groups', type=int, default=10, help='recover: groups per step')
  p.add_argument('--batch_size', type=int, default=128, help='squeeze, student, relabel')
  p.add_argument('--students', type=int, default=1,
                 help="student: students trained together in one step, evaluate's stack")
  p.add_argument('--sets', type=int, default=1,
                 help='student: image sets they share out (e.g. distilled and random: 2); '
                      'the students of a set share its views and teacher forward')
  p.add_argument('--dtype', default='float32', choices=sorted(DTYPES),
                 help='model compute dtype of every JAX workload (recover loss stays fp32)')
  p.add_argument('--crop', default='per_image', choices=('per_image', 'per_group', 'none'),
                 help='JAX recover crop (the torch reference is always per batch)')
  p.add_argument('--jitter', type=int, default=-1, help='-1: 32 from 128 px up, else 4')
  p.add_argument('--min_scale', type=float, default=0.08)
  p.add_argument('--devices', type=int, default=1, help='devices on the mesh (-1: all)')
  p.add_argument('--steps', type=int, default=20, help='steps per timed repeat')
  p.add_argument('--repeats', type=int, default=5, help='timed repeats (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--reference', default='none', choices=('none', 'torch'))
  p.add_argument('--skip_jax', action='store_true', help='only the torch reference')
  p.add_argument('--torch_amp', default='none', choices=('none', 'bf16', 'fp16'))
  p.add_argument('--torch_weight_grads', action='store_true',
                 help='keep teacher weight gradients on, as the original reference does')
  p.add_argument('--torch_device', default='', help='default: cuda if available, else cpu')
  p.add_argument('--torch_threads', type=int, default=0,
                 help="torch CPU threads (0: torch's default)")
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help="the card's peak for --dtype (TFLOP/s); adds the compute floor")
  p.add_argument('--label', default='', help='name of this run in tables')
  p.add_argument('--json', default='', help='write the results here')
  p.add_argument('--summarize', default='',
                 help='comma list of result JSON files: print one table and exit')
  p.add_argument('--summary_json', default='', help='with --summarize: write it here')
  args = p.parse_args(argv)
  args.what = [w.strip() for w in args.what.split(',') if w.strip()]
  unknown = [w for w in args.what if w not in WORKLOADS]
  if unknown:
    p.error(f'unknown workloads {unknown}; valid: {list(WORKLOADS)}')
  if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
    p.error('--steps and --repeats must be at least 1, --warmup at least 0')
  if not 1 <= args.sets <= args.students:
    p.error(f'--sets={args.sets} must be between 1 and --students={args.students}')
  args.student_model = args.student_model or args.model
  args.student_width = args.student_width or args.width
  if args.jitter < 0:
    args.jitter = 32 if args.image_size >= 128 else 4
  return args


# ----------------------------------------------------------------------------- set-up


def model_config(name: str, args, width: int):
  c = config_lib.base_config().teacher
  c.update(name=name, width=width, depth=args.depth, pooling=args.pooling, stem=args.stem,
           dtype=args.dtype)
  return c


def bench_config(args) -> ml_collections.ConfigDict:
  """The stages' config (`config_lib.base_config()`) with the benchmark's settings."""
  c = config_lib.base_config()
  c.seed = args.seed
  c.teacher = model_config(args.model, args, args.width)
  c.student.update(name=args.student_model, width=args.student_width, depth=args.depth,
                   pooling=args.pooling, stem=args.stem, dtype=args.dtype,
                   batch_size=args.batch_size)
  c.recover.update(batch_size=args.group_size, dtype=args.dtype, crop=args.crop,
                   jitter=args.jitter, min_scale=args.min_scale)
  c.squeeze.batch_size = args.batch_size
  c.relabel.update(min_scale=args.min_scale)
  return c


def dataset_spec(args) -> datasets.DatasetSpec:
  """The registered dataset of this shape and class count, else a synthetic one like it."""
  shape = (args.image_size, args.image_size, args.channels)
  for spec in datasets.DATASETS.values():
    if spec.image_shape == shape and spec.num_classes == args.num_classes:
      return spec
  mean, std = ((datasets.IMAGENET_MEAN, datasets.IMAGENET_STD) if args.channels == 3
               else ((0.5,) * args.channels, (0.25,) * args.channels))
  return datasets.DatasetSpec(
      name='synthetic', num_classes=args.num_classes, image_shape=shape, mean=mean, std=std,
      train_augment='pad_crop_flip' if args.image_size <= 32 else 'random_resized_crop_flip',
      make_builder=lambda c: None)


def teacher_variables(model, image_shape, seed: int) -> dict:
  """Random float32 teacher variables, drawn on the host (nothing is compiled).

  Kernels ~ N(0, 1/fan_in); BN running mean ~ 0.1 N(0, 1), running var ~ U(0.5, 1.5),
  scale ~ 1 + 0.1 N(0, 1), biases ~ 0.1 N(0, 1): non-trivial statistics, so that a weight-
  mapping slip shows in comparisons. Shapes come from `jax.eval_shape` of `model.init`.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1,) + tuple(image_shape)),
                                             train=False))
  shapes = {'params': shapes['params'], 'batch_stats': shapes['batch_stats']}

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape, key = leaf.shape, getattr(path[-1], 'key', '')
    if key == 'kernel':
      x = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif key == 'mean':
      x = 0.1 * rng.normal(size=shape)
    elif key == 'var':
      x = rng.uniform(0.5, 1.5, size=shape)
    elif key == 'scale':
      x = 1.0 + 0.1 * rng.normal(size=shape)
    elif key == 'bias':
      x = 0.1 * rng.normal(size=shape)
    else:
      raise ValueError(f'No random draw for teacher variable {name}.')
    return np.asarray(x, np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def cost(compiled) -> dict:
  """XLA's flops and bytes accessed of one call of a compiled step (None where unknown)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return {'flops': None, 'bytes_accessed': None}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  flops, accessed = analysis.get('flops'), analysis.get('bytes accessed')
  return {'flops': float(flops) if flops and flops > 0 else None,
          'bytes_accessed': float(accessed) if accessed and accessed > 0 else None}


def peak_memory():
  """Peak bytes in use on the first device since the process started (None where unknown)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def time_steps(run_steps, steps: int, repeats: int, warmup: int) -> dict:
  """`run_steps(n)` runs n steps and blocks; returns the warm-up and the timed repeats (s)."""
  start = time.perf_counter()
  if warmup:
    run_steps(warmup)
  warmup_seconds = time.perf_counter() - start
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    run_steps(steps)
    timings.append(time.perf_counter() - start)
  return {'timings_s': timings, 'warmup_s': warmup_seconds,
          'seconds_per_step': statistics.median(timings) / steps}


def finish(result: dict, items_per_step: int, unit: str, args, devices: int) -> dict:
  """Adds the throughput, FLOPs per item and the compute floor (if --peak_tflops) to `result`.

  `result['flops']` is XLA's count for one device's program; `devices` run one each.
  """
  rate = items_per_step / result['seconds_per_step']
  flops_per_step = result['flops'] * devices if result['flops'] else None
  result[unit] = rate
  result['throughput'] = rate
  result['throughput_unit'] = unit
  per_item = flops_per_step / items_per_step if flops_per_step else None
  result['flops_per_item'] = per_item
  result['achieved_tflops'] = rate * per_item / 1e12 if per_item else None
  if per_item and args.peak_tflops > 0:
    result['peak_tflops'] = args.peak_tflops
    result['compute_floor_items_per_second'] = args.peak_tflops * 1e12 / per_item
    result['fraction_of_peak'] = rate * per_item / (args.peak_tflops * 1e12)
  result['peak_bytes_in_use'] = peak_memory()
  return result


# ----------------------------------------------------------------------------- workloads


def recover_labels(args):
  """labels, uids (groups, group_size) of the first `groups` groups of `group_layout`."""
  if args.group_size <= 0 or args.num_classes % args.group_size:
    raise ValueError(f'--group_size={args.group_size} must divide --num_classes='
                     f'{args.num_classes} (a group holds different classes).')
  chunks = args.num_classes // args.group_size
  labels, uids, _ = optimize.group_layout(args.num_classes, math.ceil(args.groups / chunks),
                                          args.group_size, 1)
  return labels[:args.groups], uids[:args.groups]


def random_keys(args, mesh, count: int):
  """`count` different replicated step keys (a step sees one each, round robin)."""
  return [jax.device_put(jax.random.PRNGKey(args.seed + i), batching.replicated(mesh))
          for i in range(count)]


def random_batch(args, spec, mesh, offset: int = 0) -> dict:
  """A fixed uint8 batch of `--batch_size` random images and labels, sharded on 'data'
  (`offset` added to the seed: another batch)."""
  if args.batch_size % mesh.size:
    raise ValueError(f'--batch_size={args.batch_size} must be a multiple of {mesh.size}.')
  rs = np.random.default_rng(args.seed + offset)
  batch = {'image': rs.integers(0, 256, (args.batch_size,) + spec.image_shape, np.uint8),
           'label': rs.integers(0, spec.num_classes, (args.batch_size,), np.int32)}
  return jax.device_put(batch, batching.data_sharding(mesh))


def compile_ahead(jitted, *args):
  """(compiled, seconds) of a jitted function for these arguments."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def bench_recover(args, config, spec, mesh, model, teacher) -> dict:
  """`optimize.create_recover_step` with recover's state and shardings; image-iterations/s."""
  cfg = config.recover
  labels, uids = recover_labels(args)
  if labels.shape[0] % mesh.size:
    raise ValueError(f'--groups={args.groups} must be a multiple of the {mesh.size} devices.')
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  labels_dev, uids_dev = jax.device_put(labels, sharded), jax.device_put(uids, sharded)
  teacher = jax.device_put(teacher, replicated)
  tx = optimize.create_optimizer(cfg)
  images_shape = labels.shape + spec.image_shape
  shardings = optimize.state_shardings(tx, images_shape, mesh)
  images = jax.random.normal(jax.random.PRNGKey(args.seed + 2), images_shape)
  state = jax.jit(lambda x: optimize.create_state(x, tx), out_shardings=shardings)(
      jax.device_put(images, sharded))
  rng = jax.device_put(jax.random.PRNGKey(args.seed + 3), replicated)

  step_fn = optimize.create_recover_step(
      optimize.Recovery(synthesis.get_method(cfg.method), model, cfg, tx,
                        optimize.pixel_bounds(spec), mesh), shardings)
  compiled, compile_seconds = compile_ahead(step_fn, state, labels_dev, uids_dev, rng,
                                            teacher)
  box = {'state': state}

  def run_steps(n):
    s = box['state']
    for _ in range(n):
      s, metrics = compiled(s, labels_dev, uids_dev, rng, teacher)
    jax.block_until_ready((s, metrics))
    box['state'] = s

  result = time_steps(run_steps, args.steps, args.repeats, args.warmup)
  metrics = jax.device_get(compiled(box['state'], labels_dev, uids_dev, rng, teacher)[1])
  images_per_step = int(labels.size)
  counted = cost(compiled)
  if cfg.parallel_groups == 1 and counted['flops']:
    # A device runs its groups one by one in a loop, whose body XLA counts once.
    counted['flops'] *= labels.shape[0] // mesh.size
  result.update(compile_s=compile_seconds, images_per_step=images_per_step,
                groups=int(labels.shape[0]), group_size=int(labels.shape[1]),
                crop=cfg.crop, jitter=cfg.jitter, loss_after=float(np.mean(metrics['loss'])),
                finite=bool(np.all(metrics['finite'])), **counted)
  result = finish(result, images_per_step, 'image_iterations_per_second', args, mesh.size)
  result['imagenet_ipc50_4k_hours'] = (IMAGENET_IPC50_IMAGE_ITERATIONS /
                                       result['image_iterations_per_second'] / 3600)
  return result


def squeeze_workload(args, config, spec, mesh, model):
  """(compiled, run_steps, seconds to compile) of `squeeze.create_classification_step` with
  squeeze's optimiser on `random_batch`; `run_steps(n)` runs n steps and blocks."""
  cfg = config.squeeze
  batch = random_batch(args, spec, mesh)
  tx = train_lib.create_optimizer(cfg, train_lib.warmup_cosine(cfg.lr, 100_000, 0))
  state = train_lib.create_train_state(model, tx, spec.image_shape,
                                       jax.random.PRNGKey(args.seed), mesh)
  keys = random_keys(args, mesh, max(args.steps, args.warmup, 1))
  step_fn = squeeze.create_classification_step(spec, mesh, cfg.label_smoothing)
  compiled, compile_seconds = compile_ahead(step_fn, state, batch, keys[0])
  box = {'state': state}

  def run_steps(n):
    s = box['state']
    for i in range(n):
      s, metrics = compiled(s, batch, keys[i % len(keys)])
    jax.block_until_ready((s, metrics))
    box['state'] = s

  return compiled, run_steps, compile_seconds


def bench_squeeze(args, config, spec, mesh, model) -> dict:
  """`squeeze_workload`'s step timed; images/s."""
  compiled, run_steps, compile_seconds = squeeze_workload(args, config, spec, mesh, model)
  result = time_steps(run_steps, args.steps, args.repeats, args.warmup)
  result.update(compile_s=compile_seconds, batch_size=args.batch_size,
                optimizer=config.squeeze.optimizer, train_augment=spec.train_augment,
                **cost(compiled))
  return finish(result, args.batch_size, 'images_per_second', args, mesh.size)


def student_inputs(args, config, spec, mesh):
  """(states, images, labels, set_index) of `--students` stacked students (seeds
  `--seed` + i) and `--sets` image sets of a `random_batch` each (S, B, ...); student i
  trains on set i * S // M, evaluate's order (a set's seeds side by side)."""
  model = models.create_model(config.student, spec.num_classes)
  cfg = config.evaluate
  tx = train_lib.create_optimizer(cfg, train_lib.warmup_cosine(cfg.lr, 100_000))
  states = student.stack([train_lib.create_train_state(model, tx, spec.image_shape,
                                                       jax.random.PRNGKey(args.seed + i),
                                                       mesh)
                          for i in range(args.students)])
  batches = [random_batch(args, spec, mesh, offset=s) for s in range(args.sets)]
  images, labels = (jax.device_put(np.stack([np.asarray(b[k]) for b in batches]),
                                   student.stacked_sharding(mesh))
                    for k in ('image', 'label'))
  set_index = tuple(i * args.sets // args.students for i in range(args.students))
  return states, images, labels, set_index


def student_workload(args, config, spec, mesh, teacher_model, teacher):
  """(compiled, run_steps, seconds to compile) of `student.create_student_step` (online
  soft labels: views, teacher forward, KL) with evaluate's optimiser, as evaluate trains its
  students: `student_inputs`' stack (students of a set share its views and the teacher's
  forward on them; one student and one set: a student alone)."""
  state, images, labels, set_index = student_inputs(args, config, spec, mesh)
  keys = random_keys(args, mesh, max(args.steps, args.warmup, 1))
  step_fn = student.create_student_step(config, spec, teacher_model, mesh, 'online',
                                        set_index)
  compiled, compile_seconds = compile_ahead(step_fn, state, images, labels, None, keys[0],
                                            teacher)
  box = {'state': state}

  def run_steps(n):
    s = box['state']
    for i in range(n):
      s, metrics = compiled(s, images, labels, None, keys[i % len(keys)], teacher)
    jax.block_until_ready((s, metrics))
    box['state'] = s

  return compiled, run_steps, compile_seconds


def bench_student(args, config, spec, mesh, teacher_model, teacher) -> dict:
  """`student_workload`'s step timed; images/s, an image counted once per student that
  trains on it."""
  compiled, run_steps, compile_seconds = student_workload(args, config, spec, mesh,
                                                          teacher_model, teacher)
  result = time_steps(run_steps, args.steps, args.repeats, args.warmup)
  result.update(compile_s=compile_seconds, batch_size=args.batch_size,
                optimizer=config.evaluate.optimizer, model=config.student.name,
                labels='online', students=args.students, sets=args.sets,
                stack_mode=student.stack_mode(config), **cost(compiled))
  return finish(result, args.batch_size * args.students, 'images_per_second', args,
                mesh.size)


def bench_relabel(args, config, spec, mesh, model, teacher) -> dict:
  """`views.create_batch_views` then `label_store.create_teacher_logits`, the two programs
  `label_store.write_labels` runs per batch; images/s."""
  images = random_batch(args, spec, mesh)['image']
  keys = random_keys(args, mesh, max(args.steps, args.warmup, 1))
  views_fn = views.create_batch_views(config.relabel, spec, mesh)
  logits_fn = label_store.create_teacher_logits(model, teacher, mesh)  # partial(jitted, teacher)
  compiled_views, views_seconds = compile_ahead(views_fn, keys[0], images)
  batch_views = compiled_views(keys[0], images)[0]
  compiled_logits, logits_seconds = compile_ahead(logits_fn.func, *logits_fn.args,
                                                  batch_views)

  def run_steps(n):
    out = [compiled_logits(teacher, compiled_views(keys[i % len(keys)], images)[0])
           for i in range(n)]
    jax.block_until_ready(out)

  result = time_steps(run_steps, args.steps, args.repeats, args.warmup)
  costs = [cost(compiled_views), cost(compiled_logits)]
  total = {k: (sum(c[k] for c in costs) if all(c[k] for c in costs) else None)
           for k in costs[0]}
  result.update(compile_s=views_seconds + logits_seconds, batch_size=args.batch_size,
                mix=config.relabel.mix, **total)
  return finish(result, args.batch_size, 'images_per_second', args, mesh.size)


def bench_torch_recover(args, spec, teacher, labels) -> dict:
  """`torch_reference`'s recover on the same teacher weights; image-iterations/s."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top  # optional torch
  model = torch_reference.build_model(args.model, args.num_classes, args.channels,
                                  args.image_size, width=args.width, depth=args.depth,
                                  pooling=args.pooling, stem=args.stem)
  torch_reference.load_flax_variables(model, jax.device_get(teacher))
  cfg = bench_config(args).recover
  result = torch_reference.benchmark_recover(
      model, labels, spec.image_shape, spec.mean, spec.std, steps=args.steps,
      repeats=args.repeats, warmup=args.warmup, threads=args.torch_threads, lr=cfg.lr,
      r_bn=cfg.r_bn, first_bn_multiplier=cfg.first_bn_multiplier, betas=(cfg.adam_b1, cfg.adam_b2),
      jitter=cfg.jitter, min_scale=cfg.min_scale, max_scale=cfg.max_scale,
      crop=cfg.crop != 'none', flip=cfg.flip, iterations=cfg.iterations,
      amp=args.torch_amp, weight_grads=args.torch_weight_grads,
      device=args.torch_device or torch_reference.default_device(), seed=args.seed)
  result['throughput'] = result['image_iterations_per_second']
  result['throughput_unit'] = 'image_iterations_per_second'
  result['imagenet_ipc50_4k_hours'] = (IMAGENET_IPC50_IMAGE_ITERATIONS /
                                       result['image_iterations_per_second'] / 3600)
  return result


def torch_model(args, name: str, width: int, variables=None):
  """`torch_reference`'s twin of a model of this benchmark (Flax weights copied when given)."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top  # optional torch
  model = torch_reference.build_model(name, args.num_classes, args.channels, args.image_size,
                                      width=width, depth=args.depth, pooling=args.pooling,
                                      stem=args.stem)
  if variables is not None:
    torch_reference.load_flax_variables(model, jax.device_get(variables))
  return model


def host_batch(args, spec):
  """The uint8 images and labels of `random_batch`, on the host."""
  rs = np.random.default_rng(args.seed)
  return (rs.integers(0, 256, (args.batch_size,) + spec.image_shape, np.uint8),
          rs.integers(0, spec.num_classes, (args.batch_size,), np.int32))


def torch_training_reference(args, config, spec, teacher, what: str):
  """`torch_reference`'s squeeze step (the teacher network, trained) or student step (a
  fresh student, the teacher's weights frozen), set up as this benchmark's JAX twin."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top  # optional torch
  device = args.torch_device or torch_reference.default_device()
  if what == 'squeeze':
    cfg = config.squeeze
    reference = torch_reference.SqueezeReference(
        torch_model(args, args.model, args.width, teacher), spec.image_shape, spec.mean,
        spec.std, augment=spec.train_augment, pad=spec.pad, lr=cfg.lr, momentum=cfg.momentum,
        nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing, device=device, seed=args.seed)
  else:
    cfg, rcfg = config.evaluate, config.relabel
    reference = torch_reference.StudentReference(
        torch_model(args, args.model, args.width, teacher),
        torch_model(args, args.student_model, args.student_width), spec.image_shape,
        spec.mean, spec.std, temperature=cfg.temperature, lr=cfg.lr,
        weight_decay=cfg.weight_decay, min_scale=rcfg.min_scale, max_scale=rcfg.max_scale,
        cutmix_alpha=rcfg.cutmix_alpha, device=device, seed=args.seed)
  return reference


def bench_torch_training(args, config, spec, teacher, what: str) -> dict:
  """`torch_training_reference`'s step timed on `random_batch`'s images; images/s."""
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top  # optional torch
  reference = torch_training_reference(args, config, spec, teacher, what)
  images, labels = host_batch(args, spec)
  result = torch_reference.benchmark_training(
      reference, images, labels, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
      threads=args.torch_threads)
  result['throughput'] = result['images_per_second']
  result['throughput_unit'] = 'images_per_second'
  result['amp'] = 'none'
  return result


def load_average() -> list[float] | None:
  """os.getloadavg() (1, 5, 15 min), None where the platform has none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


# ----------------------------------------------------------------------------- driver


def environment(devices: bool = True) -> dict:
  """Versions, and the JAX backend and device unless `devices` is False (torch-only runs)."""
  env = {'jax_version': jax.__version__, 'flax_version': flax.__version__,
         'optax_version': optax.__version__, 'python': platform.python_version(),
         'host': platform.node(),
         'default_matmul_precision': str(jax.config.jax_default_matmul_precision),
         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'cpu_count': os.cpu_count(),
         'loadavg_at_start': load_average()}
  if devices:
    env.update(backend=jax.default_backend(), device_kind=jax.local_devices()[0].device_kind,
               device_count=jax.device_count())
  else:
    env.update(backend=None, device_kind=None, device_count=None)
  return env


def run(args) -> dict:
  """Runs the requested workloads; returns the result dict (also written to --json).

  With --skip_jax nothing touches a JAX device (the teacher stays in host memory), so a
  torch-only run leaves the GPU to torch.
  """
  if args.skip_jax and args.reference != 'torch':
    raise ValueError('--skip_jax leaves nothing to run without --reference=torch.')
  spec = dataset_spec(args)
  config = bench_config(args)
  teacher_model = models.create_model(config.teacher, args.num_classes)
  # float32 variables whatever the compute dtype, as a loaded teacher's.
  teacher = teacher_variables(teacher_model, spec.image_shape, args.seed)
  mesh = None
  if not args.skip_jax:
    mesh = batching.create_mesh(args.devices)
    teacher = jax.device_put(teacher, batching.replicated(mesh))
  settings = {k: v for k, v in vars(args).items() if k not in ('summarize', 'summary_json')}
  out = {'label': args.label or f'{args.model}_{args.image_size}_{args.dtype}',
         **environment(devices=not args.skip_jax),
         'mesh_devices': mesh.size if mesh else None, 'dataset_spec': spec.name,
         'settings': settings, 'results': {},
         'notes': {
             'timing': f'median of {args.repeats} x {args.steps} steps after compilation '
                       f'and {args.warmup} warm-up steps, block_until_ready',
             'peak_bytes_in_use': 'device peak since the process started (cumulative '
                                  'over the workloads run before it); None on CPU',
             'flops_per_item': "XLA cost_analysis flops of one compiled step / items "
                               "per step (recover: per image-iteration)",
             'inputs': 'fixed on-device batches; no host input pipeline',
             'relabel': 'views.batch_views (RandomResizedCrop, flip, CutMix) + teacher '
                        'forward, as label_store.write_labels',
             'student': 'student.stacked_student_step (a stack of one) with online soft labels '
                        '(views, teacher forward, KL), evaluate\'s optimiser (AdamW)'}}
  if not args.skip_jax:
    for what in args.what:
      start, load_before = time.perf_counter(), load_average()
      if what == 'recover':
        r = bench_recover(args, config, spec, mesh, teacher_model, teacher)
      elif what == 'squeeze':
        r = bench_squeeze(args, config, spec, mesh, teacher_model)
      elif what == 'student':
        r = bench_student(args, config, spec, mesh, teacher_model, teacher)
      else:
        r = bench_relabel(args, config, spec, mesh, teacher_model, teacher)
      r['wall_s'] = time.perf_counter() - start
      r['loadavg_before'], r['loadavg_after'] = load_before, load_average()
      out['results'][what] = r
  if args.reference == 'torch':
    import torch  # pylint: disable=g-import-not-at-top  # optional (the bench extra)
    out['torch_version'] = torch.__version__
    out['torch_threads'] = (args.torch_threads if args.torch_threads > 0
                            else torch.get_num_threads())
    out['ratios'] = {}
    for what in [w for w in args.what if w in TORCH_WORKLOADS]:
      start, load_before = time.perf_counter(), load_average()
      if what == 'recover':
        labels, _ = recover_labels(args)
        r = bench_torch_recover(args, spec, teacher, labels)
      else:
        r = bench_torch_training(args, config, spec, teacher, what)
      r['wall_s'] = time.perf_counter() - start
      r['loadavg_before'], r['loadavg_after'] = load_before, load_average()
      out['results'][f'torch_{what}'] = r
      if what in out['results']:
        out['ratios'][f'{what}_jax_over_torch'] = (out['results'][what]['throughput'] /
                                                   r['throughput'])
  out['loadavg_at_end'] = load_average()
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  return out


def _fmt(x, spec='.4g'):
  return '-' if x is None else format(x, spec)


def table(results: list[dict]) -> str:
  """One row per (run, workload): throughput, ms/step, peak memory, FLOPs, projection."""
  header = (f'{"run":<32} {"workload":<14} {"device":<22} {"throughput":>11} '
            f'{"unit":<11} {"ms/step":>8} {"peak MiB":>9} {"GFLOP/item":>10} '
            f'{"%peak":>6} {"IPC50 4K h":>10}')
  lines = [header, '-' * len(header)]
  for out in results:
    for what, r in out['results'].items():
      torch_side = what.startswith('torch')
      device = (r.get('device_name', '') if torch_side else out.get('device_kind', ''))[:22]
      dtype = (f"amp={r['amp']}" + (' wgrad' if r.get('weight_grads') else '')
               if torch_side else out['settings']['dtype'])
      unit = 'img-it/s' if r['throughput_unit'].startswith('image_iter') else 'img/s'
      peak = r.get('peak_bytes_in_use')
      flops = r.get('flops_per_item')
      lines.append(
          f'{(out["label"] + " " + dtype)[:32]:<32} {what:<14} {device:<22} '
          f'{r["throughput"]:>11.1f} {unit:<11} {1e3 * r["seconds_per_step"]:>8.2f} '
          f'{_fmt(peak / 2**20 if peak else None, ".0f"):>9} '
          f'{_fmt(flops / 1e9 if flops else None, ".3g"):>10} '
          f'{_fmt(100 * r["fraction_of_peak"] if r.get("fraction_of_peak") else None, ".1f"):>6} '
          f'{_fmt(r.get("imagenet_ipc50_4k_hours"), ".1f"):>10}')
    for name, ratio in out.get('ratios', {}).items():
      lines.append(f'{out["label"][:32]:<32} {name}: {ratio:.3f}')
  return '\n'.join(lines)


def summarize(paths: list[str], summary_json: str = '') -> dict:
  """Reads result JSONs (missing ones are skipped), prints the table and every JAX / torch
  ratio of a workload measured on both sides (recover, squeeze, student)."""
  runs = []
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        runs.append(json.load(f))
    else:
      print(f'(missing: {path})')
  print(table(runs))
  ratios = {}
  for what in TORCH_WORKLOADS:
    jax_runs = [(o['label'], o['settings']['dtype'], o['results'][what])
                for o in runs if what in o['results']]
    torch_runs = [(o['label'], o['results'][f'torch_{what}']) for o in runs
                  if f'torch_{what}' in o['results']]
    for jl, dt, j in jax_runs:
      for tl, t in torch_runs:
        extra = ', wgrad' if t.get('weight_grads') else ''
        key = f'{what}: {jl} ({dt}) / {tl} (torch amp={t.get("amp", "none")}{extra})'
        ratios[key] = j['throughput'] / t['throughput']
  if ratios:
    print('\nthroughput ratios, JAX / torch:')
    for key, value in ratios.items():
      print(f'  {value:6.2f}x  {key}')
  summary = {'runs': runs, 'ratios': ratios,
             'imagenet_ipc50_4k_image_iterations': IMAGENET_IPC50_IMAGE_ITERATIONS}
  if summary_json:
    with open(summary_json, 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.summarize:
    return summarize([p for p in args.summarize.split(',') if p], args.summary_json)
  out = run(args)
  print(table([out]))
  if args.json:
    print(f'wrote {args.json}')
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
