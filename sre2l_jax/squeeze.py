"""Squeeze: train the teacher network on the full dataset.

mesh -> input -> model -> shard -> step -> loop, then `workdir/squeeze/teacher` (frozen
weights for recover/relabel) and `workdir/squeeze/result.json`.
"""

import dataclasses
import os
import time

import jax
import ml_collections
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import context
from sre2l_jax import files
from sre2l_jax import memory
from sre2l_jax import models
from sre2l_jax import rngs
from sre2l_jax import teacher
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline


def fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What fixes the meaning and shapes of the squeeze state."""
  return {'dataset': datasets.identity(config.dataset), 'train_limit': config.dataset.train_limit,
          # Extra teachers are squeezed in folders of their own (teacher.extra_configs).
          'teacher': {k: v for k, v in config.teacher.to_dict().items()
                      if k != 'extra_teachers'}, 'squeeze': {
              k: v for k, v in config.squeeze.to_dict().items()
              if k not in ('log_every_steps', 'checkpoint_every_steps', 'eval_batch_size')},
          'seed': config.seed}


def validate(config: ml_collections.ConfigDict, ctx: context.Context) -> None:
  c = config.squeeze
  batching.check_batch_size(c.batch_size, ctx.mesh, 'squeeze.batch_size')
  batching.check_batch_size(c.eval_batch_size, ctx.mesh, 'squeeze.eval_batch_size')
  train_lib.validate_numbers(config, ('squeeze',))


def finished(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """The result of the squeeze run that trained this workdir's teacher under `config`, or
  None (not run, another config's, or its teacher since removed)."""
  stage_dir = os.path.join(workdir, 'squeeze')
  path = os.path.join(stage_dir, checkpoint.FINGERPRINT)
  if not files.exists(path) or checkpoint.diff(files.read_json(path),
                                               files.normalised(fingerprint(config))):
    return None
  return _trained(stage_dir)


def _trained(stage_dir: str) -> dict | None:
  """The result in `stage_dir` if its teacher is there too (checked fingerprint: the caller)."""
  result = checkpoint.finished_result(stage_dir)
  if result is None or not teacher.exists(os.path.join(stage_dir, 'teacher')):
    return None
  return result


def run(config: ml_collections.ConfigDict, workdir: str, ctx: context.Context) -> dict:
  """Trains the teacher; resumes from `workdir/squeeze/checkpoints` when present. Each of
  teacher.extra_teachers is trained first, by its own squeeze run (`teacher.extra_configs`)."""
  for extra, extra_workdir in teacher.extra_configs(config, workdir):
    run(extra, extra_workdir,
        dataclasses.replace(ctx, teacher_dir=teacher.teacher_dir(extra, extra_workdir)))
  stage_dir = os.path.join(workdir, 'squeeze')
  spec, mesh = ctx.spec, ctx.mesh
  model = models.create_model(config.teacher, spec.num_classes)
  validate(config, ctx)
  c = config.squeeze
  if c.augment:  # override the dataset's default training augmentation
    spec = dataclasses.replace(spec, train_augment=c.augment, pad=c.pad or spec.pad)

  # Input.
  train = pipeline.load_split(config.dataset, 'train')
  test = pipeline.load_split(config.dataset, 'test')
  steps_per_epoch = train.steps_per_epoch(c.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f'squeeze.batch_size={c.batch_size} exceeds the {train.num_examples} '
                     f'training images.')
  teacher_dir = os.path.join(stage_dir, 'teacher')
  fingerprint_path = os.path.join(stage_dir, checkpoint.FINGERPRINT)
  if (teacher.exists(teacher_dir) and not files.exists(fingerprint_path)
      and not config.overwrite):
    raise teacher.TeacherError(
        f'{teacher_dir} holds a teacher that no squeeze run of this workdir trained (e.g. one '
        f'imported from PyTorch); refusing to train over it. Use it with --stages=recover,... '
        f'(skip squeeze), replace it with --overwrite, or use another --workdir.')
  # Only now, once the config is known to be runnable, may the workdir be claimed: a
  # fingerprint written by a refused config would refuse its corrected version.
  checkpoint.check_fingerprint(stage_dir, fingerprint(config))
  done = _trained(stage_dir)  # `finished`, its fingerprint just checked
  if done is not None:
    logging.info('squeeze: finished already (%s); nothing to do.', done.get('measured_at'))
    return done
  old = checkpoint.finished_result(stage_dir)  # kept if only the teacher is missing (below)
  total_steps = int(c.epochs * steps_per_epoch)

  # Model, optimiser, state replicated on the mesh (restored or initialised).
  schedule = train_lib.warmup_cosine(c.lr, total_steps, int(c.warmup_epochs * steps_per_epoch))
  tx = train_lib.create_optimizer(c, schedule)
  init_rng, step_rng = jax.random.split(rngs.key(config.seed))
  manager = checkpoint.create_manager(os.path.join(stage_dir, 'checkpoints'),
                                      save_interval_steps=c.checkpoint_every_steps,
                                      final_step=total_steps)
  state, start_step = train_lib.restore_or_init(
      manager, train_lib.abstract_train_state(model, tx, spec.image_shape, mesh),
      lambda: train_lib.create_train_state(model, tx, spec.image_shape, init_rng, mesh))

  # Steps.
  train_step = train_lib.create_classification_step(spec, mesh, c.label_smoothing)
  sharded = batching.data_sharding(mesh)
  batch_shapes = {
      'image': jax.ShapeDtypeStruct((c.batch_size,) + spec.image_shape, jax.numpy.uint8,
                                    sharding=sharded),
      'label': jax.ShapeDtypeStruct((c.batch_size,), jax.numpy.int32, sharding=sharded)}
  memory.check_step_fits(
      train_step, lambda: (state, batch_shapes, step_rng), config.device_memory_gb,
      f'The squeeze step at squeeze.batch_size={c.batch_size} (lower it, or use more '
      f'devices)')
  eval_step = train_lib.create_eval_step(model, spec, mesh)

  def test_top1(state):
    return train_lib.top1(eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                          test, c.eval_batch_size, mesh)

  # Loop.
  writer = train_lib.create_writer(os.path.join(stage_dir, 'logs'))
  writer.write_hparams(config.to_dict(), metrics=('test_top1',))
  logging.info('squeeze: training the %s teacher on %s, %d steps (%g epochs of %d) on %d '
               'device(s)%s', config.teacher.name, spec.name, total_steps, c.epochs,
               steps_per_epoch, mesh.size, f', resumed at step {start_step}' if start_step
               else '')
  batches = train.train_batches(c.batch_size, config.seed, start_step,
                                batching.data_sharding(mesh))

  def step_fn(state, step):
    return train_step(state, next(batches), jax.random.fold_in(step_rng, step))

  def after_step(state, step):
    if step % steps_per_epoch == 0 and step != total_steps:
      writer.write_scalars(step, {'test_top1': test_top1(state)})

  loop = train_lib.Loop(
      name='squeeze', total_steps=total_steps, log_every=c.log_every_steps, manager=manager,
      writer=writer, examples_per_step=c.batch_size, throughput_name='images_per_second',
      knobs=f'squeeze.lr (now {c.lr})', schedule=schedule, prefix='train_')
  start_time = time.time()
  state, done = train_lib.run_loop(loop, state, start_step, step_fn, after_step)

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  top1 = test_top1(state)
  writer.write_scalars(total_steps, {'test_top1': top1})
  writer.flush()
  # Replacing is safe here: a teacher in this folder is this run's (checked above) or one
  # the user asked to replace.
  teacher.save(teacher_dir, variables, teacher.teacher_meta(config, spec, top1), overwrite=True)
  result = {
      'stage': 'squeeze', 'dataset': spec.name, 'model': config.teacher.to_dict(),
      'test_top1': top1, 'test_top1_unit': 'fraction', 'epochs': c.epochs,
      'steps': total_steps, 'resumed_from_step': start_step,
      'images_per_second': done.examples_per_second,
      'wall_seconds': time.time() - start_time, 'devices': mesh.size,
  }
  if start_step:
    result['wall_seconds_note'] = f'this invocation only (resumed from step {start_step})'
  if old is not None and start_step == total_steps:
    return old  # only the teacher was missing: the measurements stay those of the run
  result = checkpoint.write_result(stage_dir, result)
  logging.info('squeeze: teacher test top-1 %.2f%% after %g epochs (%.0f s, %.0f images/s)',
               100 * top1, c.epochs, result['wall_seconds'], done.examples_per_second)
  return result
