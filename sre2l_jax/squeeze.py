"""Squeeze: train the teacher network on the full dataset.

mesh -> input -> model -> shard -> step -> checkpoint -> loop, then `workdir/squeeze/teacher`
(frozen weights for recover/relabel) and `workdir/squeeze/result.json`.
"""

import dataclasses
import functools
import os
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import models
from sre2l_jax import train_lib
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline


def fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What fixes the meaning and shapes of the squeeze state."""
  return {'dataset': config.dataset.name, 'train_limit': config.dataset.train_limit,
          'teacher': config.teacher.to_dict(), 'squeeze': {
              k: v for k, v in config.squeeze.to_dict().items()
              if k not in ('log_every_steps', 'checkpoint_every_steps', 'eval_batch_size')},
          'seed': config.seed}


def teacher_meta(config, spec, test_top1=None) -> dict:
  return {'signature': models.model_signature(config.teacher, spec.num_classes,
                                              spec.image_shape),
          'dataset': spec.name, 'test_top1': test_top1}


def teacher_dir(config, workdir: str) -> str:
  """Where recover/relabel read the teacher: config.squeeze.teacher_dir or the squeeze output."""
  return config.squeeze.get('teacher_dir') or os.path.join(workdir, 'squeeze', 'teacher')


def load_teacher(config, workdir: str, mesh):
  """(model, variables) of the frozen teacher, replicated on `mesh`, checked against config."""
  spec = datasets.get_spec(config.dataset.name)
  model = models.create_model(config.teacher, spec.num_classes)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1,) + spec.image_shape)))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=pipeline.replicated(mesh)),
      {k: abstract[k] for k in ('params', 'batch_stats')})
  hint = (f'python -m sre2l_jax.main --config=<config> --workdir={workdir} --stages=squeeze '
          f'(or import a PyTorch teacher with python -m sre2l_jax.models.torch_import)')
  variables, _ = checkpoint.load_teacher(
      teacher_dir(config, workdir), teacher_meta(config, spec)['signature'], abstract, hint)
  return model, variables


def validate(config: ml_collections.ConfigDict, mesh) -> None:
  c = config.squeeze
  pipeline.check_batch_size(c.batch_size, mesh, 'squeeze.batch_size')
  pipeline.check_batch_size(c.eval_batch_size, mesh, 'squeeze.eval_batch_size')
  if c.epochs <= 0:
    raise ValueError(f'squeeze.epochs={c.epochs} must be positive.')
  if c.lr <= 0:
    raise ValueError(f'squeeze.lr={c.lr} must be positive.')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the teacher; resumes from `workdir/squeeze/checkpoints` when present."""
  stage_dir = os.path.join(workdir, 'squeeze')
  spec = datasets.get_spec(config.dataset.name)
  model = models.create_model(config.teacher, spec.num_classes)
  mesh = pipeline.create_mesh(config.mesh_shape)
  validate(config, mesh)
  if config.squeeze.get('augment'):  # override the dataset's default training augmentation
    spec = dataclasses.replace(spec, train_augment=config.squeeze.augment,
                               pad=config.squeeze.get('pad') or spec.pad)

  # Input.
  train = pipeline.load_split(config.dataset, 'train')
  test = pipeline.load_split(config.dataset, 'test')
  c = config.squeeze
  steps_per_epoch = train.steps_per_epoch(c.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f'squeeze.batch_size={c.batch_size} exceeds the {train.num_examples} '
                     f'training images.')
  # Only now, once the config is known to be runnable, may the workdir be claimed: a
  # fingerprint written by a refused config would refuse its corrected version.
  checkpoint.check_fingerprint(stage_dir, fingerprint(config))
  total_steps = int(c.epochs * steps_per_epoch)

  # Model, optimiser, state replicated on the mesh.
  schedule = train_lib.warmup_cosine(c.lr, total_steps, int(c.warmup_epochs * steps_per_epoch))
  tx = train_lib.create_optimizer(c, schedule)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = train_lib.create_train_state(model, tx, spec.image_shape, init_rng, mesh)

  # Resume.
  manager = checkpoint.create_manager(os.path.join(stage_dir, 'checkpoints'))
  start_step = manager.latest_step() or 0
  if start_step:
    state = manager.restore(start_step, args=ocp.args.StandardRestore(state))
    logging.info('squeeze: resumed from step %d', start_step)

  # Step.
  replicated, sharded = pipeline.replicated(mesh), pipeline.data_sharding(mesh)
  train_step = jax.jit(
      functools.partial(train_lib.classification_step, spec=spec,
                        label_smoothing=c.label_smoothing),
      in_shardings=(replicated, sharded, replicated), out_shardings=(replicated, replicated),
      donate_argnums=0)
  eval_step = train_lib.make_eval_step(model, spec, mesh)

  # Loop.
  writer = train_lib.create_writer(os.path.join(stage_dir, 'logs'))
  progress = train_lib.create_progress(total_steps, writer, c.log_every_steps)
  throughput = train_lib.Throughput()
  start_time, history = time.time(), []
  batches = train.train_batches(c.batch_size, config.seed, start_step, sharded)
  for step in range(start_step + 1, total_steps + 1):
    batch = next(batches)
    state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, step))
    history.append(metrics)
    if step == start_step + 1:
      jax.block_until_ready(state)
    throughput.tick(c.batch_size)
    progress(step)
    if step % c.log_every_steps == 0 or step == total_steps:
      summary = train_lib.mean_metrics(history)
      writer.write_scalars(step, {f'train_{k}': v for k, v in summary.items()} |
                           {'lr': float(schedule(step)),
                            'images_per_second': throughput.rate()})
      history = []
    if step % steps_per_epoch == 0 and step != total_steps:
      writer.write_scalars(step, {'test_top1': train_lib.top1(
          eval_step, {'params': state.params, 'batch_stats': state.batch_stats}, test,
          c.eval_batch_size, mesh)})
    if step % c.checkpoint_every_steps == 0 or step == total_steps:
      manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  test_top1 = train_lib.top1(eval_step, variables, test, c.eval_batch_size, mesh)
  writer.write_scalars(total_steps, {'test_top1': test_top1})
  writer.flush()
  checkpoint.save_teacher(os.path.join(stage_dir, 'teacher'), variables,
                          teacher_meta(config, spec, test_top1))
  result = {
      'stage': 'squeeze', 'dataset': spec.name, 'model': config.teacher.to_dict(),
      'test_top1': test_top1, 'test_top1_unit': 'fraction', 'epochs': c.epochs,
      'steps': total_steps, 'resumed_from_step': start_step,
      'images_per_second': throughput.rate(), 'wall_seconds': time.time() - start_time,
      'devices': mesh.size,
  }
  if start_step:
    result['wall_seconds_note'] = 'this invocation only (the run was resumed)'
  checkpoint.write_json(os.path.join(stage_dir, 'result.json'), result)
  logging.info('squeeze: test top-1 %.4f after %d epochs', test_top1, c.epochs)
  return result
