"""Recover: synthesise images whose BatchNorm-input statistics match the frozen teacher's.

The objective is a synthesis method (`recover.method`, see `synthesis/`; SRe2L's by default);
`synthesis.optimize` lays the images out in groups, vmaps and shards them over the mesh and
runs Adam on them. This stage orchestrates: teacher, layout, state (restored or initialised),
the loop, measurements at start and end, and the exports (TFDS dataset, PNG tree, grid).
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import models
from sre2l_jax import multihost
from sre2l_jax import rngs
from sre2l_jax import synthesis
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.synthesis import optimize

CROPS = ('per_image', 'per_group', 'none')


def fingerprint(config) -> dict:
  keep = {k: v for k, v in config.recover.to_dict().items()
          if k not in ('log_every_steps', 'checkpoint_every_steps', 'min_bn_reduction',
                       'min_teacher_top1')}  # the last two judge the result, not make it
  return {'dataset': config.dataset.name, 'teacher': config.teacher.to_dict(),
          'teacher_dir': config.squeeze.teacher_dir, 'recover': keep, 'seed': config.seed}


def validate(config, spec) -> None:
  cfg = config.recover
  synthesis.get_method(cfg.method)
  if cfg.ipc <= 0:
    raise ValueError(f'recover.ipc={cfg.ipc} must be a positive number of images per class.')
  num_classes = image_sets.recovered_classes(cfg, spec)
  if not 0 < num_classes <= spec.num_classes:
    raise ValueError(f'recover.num_classes={num_classes}; {spec.name} has '
                     f'{spec.num_classes} classes (0: all).')
  if cfg.batch_size <= 0 or num_classes % cfg.batch_size:
    raise ValueError(
        f'recover.batch_size={cfg.batch_size} is the group size (images of different classes '
        f'sharing an ipc index); it must divide the {num_classes} classes of '
        f'{spec.name}' + (' recovered' if num_classes < spec.num_classes else '') + '.')
  if cfg.iterations <= 0 or cfg.lr <= 0 or cfg.r_bn < 0:
    raise ValueError(f'recover needs iterations > 0, lr > 0, r_bn >= 0; got '
                     f'{cfg.iterations}, {cfg.lr}, {cfg.r_bn}.')
  if cfg.crop not in CROPS:
    raise ValueError(f'recover.crop={cfg.crop!r}; valid: {", ".join(map(repr, CROPS))}.')
  if not 0 < cfg.min_scale <= cfg.max_scale <= 1:
    raise ValueError(f'recover needs 0 < min_scale <= max_scale <= 1; got {cfg.min_scale}, '
                     f'{cfg.max_scale}.')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Recovers `ipc` images per class; resumes from `workdir/recover/checkpoints`."""
  cfg = config.recover
  stage_dir = os.path.join(workdir, 'recover')
  spec = datasets.get_spec(config.dataset.name)
  mesh = batching.create_mesh(config.mesh_shape)
  validate(config, spec)
  method = synthesis.get_method(cfg.method)
  _, teacher = teacher_lib.load(config, workdir, mesh)  # fails early if missing/unfit
  model = models.create_model(config.teacher, spec.num_classes, dtype=None if
                              cfg.dtype == 'float32' else jnp.bfloat16)
  checkpoint.check_fingerprint(stage_dir, fingerprint(config))

  # Layout: groups sharded on 'data'.
  num_classes = image_sets.recovered_classes(cfg, spec)
  labels, uids, real_groups = optimize.group_layout(num_classes, cfg.ipc, cfg.batch_size,
                                                    mesh.size)
  sharded = batching.data_sharding(mesh)
  labels_dev = jax.device_put(labels, sharded)
  uids_dev = jax.device_put(uids, sharded)
  init_rng, step_rng = jax.random.split(rngs.stream_key(config.seed, 'recover'))

  # State: restored, or initialised from noise or real images.
  tx = optimize.create_optimizer(cfg)
  images_shape = labels.shape + spec.image_shape
  shardings = optimize.state_shardings(tx, images_shape, mesh)
  manager = checkpoint.create_manager(os.path.join(stage_dir, 'checkpoints'),
                                      save_interval_steps=cfg.checkpoint_every_steps,
                                      final_step=cfg.iterations)

  def init_state():
    train = pipeline.load_split(config.dataset, 'train') if cfg.init == 'real' else None
    images = optimize.initial_images(cfg, spec, labels, uids_dev, init_rng, num_classes,
                                     train)
    return jax.jit(lambda x: optimize.create_state(x, tx), out_shardings=shardings)(
        jax.device_put(images, sharded))

  state, start_step = train_lib.restore_or_init(
      manager, optimize.abstract_state(tx, images_shape, mesh), init_state)

  # Replicated outputs: every process reads them (small: one value per group / image).
  measure_key = rngs.stream_key(config.seed, 'recover_measure')
  # Global arrays are passed as arguments: closing over them fails on several processes.
  measure_fn = jax.jit(lambda images, labels, uids, teacher: optimize.measure(
      images, labels, uids, measure_key, method=method, model=model, teacher=teacher,
      cfg=cfg), out_shardings=batching.replicated(mesh))

  def mean_losses(images):
    bn, plain, correct = jax.device_get(measure_fn(images, labels_dev, uids_dev, teacher))
    return (float(bn[:real_groups].mean()), float(plain[:real_groups].mean()),
            float(correct[:real_groups].mean()))

  initial_path = os.path.join(stage_dir, 'initial.json')
  if not start_step or not os.path.exists(initial_path):
    # Not read back from the file: only process 0 writes it.
    initial = dict(zip(('bn_loss', 'bn_loss_unaugmented'), mean_losses(state['images'])))
    files.write_json(initial_path, initial)
  else:
    initial = files.read_json(initial_path)

  # Loop.
  step = optimize.create_recover_step(method, model, cfg, tx, optimize.pixel_bounds(spec),
                                      shardings, mesh)
  writer = train_lib.create_writer(os.path.join(stage_dir, 'logs'))
  num_images = real_groups * cfg.batch_size
  loop = train_lib.Loop(
      name='recover', total_steps=cfg.iterations, log_every=cfg.log_every_steps,
      manager=manager, writer=writer, examples_per_step=num_images,
      throughput_name='image_iterations_per_second',
      knobs=f'recover.lr (now {cfg.lr}) or recover.r_bn (now {cfg.r_bn})')
  start_time = time.time()
  state, done = train_lib.run_loop(
      loop, state, start_step,
      lambda state, _: step(state, labels_dev, uids_dev, step_rng, teacher))
  wall = time.time() - start_time

  # Outputs.
  bn_final, bn_final_unaugmented, teacher_top1 = mean_losses(state['images'])
  train_lib.check_recovery(initial['bn_loss'], bn_final, teacher_top1, cfg)
  images = multihost.to_host(state['images'])[:real_groups]  # sharded over processes
  images = optimize.to_class_major(datasets.denormalise(images, spec), num_classes, cfg.ipc)
  if jax.process_index() == 0:
    flat_labels = np.repeat(np.arange(num_classes), cfg.ipc)
    export.write_tfds(image_sets.distilled_dir(workdir),
                      images.reshape((-1,) + spec.image_shape), flat_labels, spec.num_classes)
    export.write_image_folder(os.path.join(stage_dir, 'images'), images)
    export.write_grid(os.path.join(stage_dir, 'grid.png'), images)
  writer.write_scalars(cfg.iterations, {'bn_loss_final': bn_final,
                                        'teacher_top1_on_synthetic': teacher_top1})
  writer.flush()
  result = {
      'stage': 'recover', 'method': cfg.method, 'dataset': spec.name, 'ipc': cfg.ipc,
      'iterations': cfg.iterations, 'group_size': cfg.batch_size, 'groups': real_groups,
      'images': num_images, 'classes': num_classes,
      'bn_loss_initial': initial['bn_loss'], 'bn_loss_final': bn_final,
      'bn_loss_unaugmented_initial': initial['bn_loss_unaugmented'],
      'bn_loss_unaugmented_final': bn_final_unaugmented,
      'bn_loss_note': ('sum over BN layers of w_l (|mean - running mean| + |var - running var|)'
                       ', mean over groups; bn_loss_*: the objective\'s BN term on one fixed '
                       'draw of the training augmentation, the same views at start and end; '
                       'bn_loss_unaugmented_*: on the images as they are'),
      'teacher_top1_on_synthetic': teacher_top1, 'teacher_top1_unit': 'fraction',
      'image_iterations_per_second': done.examples_per_second, 'wall_seconds': wall,
      'resumed_from_step': start_step, 'devices': mesh.size,
      'outputs': {'tfds': image_sets.distilled_dir(workdir),
                  'png': os.path.join(stage_dir, 'images'),
                  'grid': os.path.join(stage_dir, 'grid.png')},
  }
  files.write_json(os.path.join(stage_dir, 'result.json'), result)
  logging.info('recover: BN loss %.4g -> %.4g (un-augmented %.4g -> %.4g), teacher top-1 '
               'on synthetic %.4f', initial['bn_loss'], bn_final,
               initial['bn_loss_unaugmented'], bn_final_unaugmented, teacher_top1)
  return result
