"""Relabel: FKD-style soft labels for every augmented view of every synthetic image.

Views are a pure function of (seed, epoch, batch) (`views.py`), so nothing about crops is
stored and replay is exact. Two modes give the same labels:
  online  the teacher runs inside the student's step (nothing is stored; this stage only
          records that choice);
  stored  the teacher's logits on each view are written once, compressed, in checksummed
          shards (`label_store.py`) under `workdir/relabel/<set>/<storage>-<settings digest>/`
          (labels of other settings sit beside them); evaluate reads them back.
"""

import os
import time

import jax
import ml_collections
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import config_lib
from sre2l_jax import context
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import train_lib
from sre2l_jax import views
from sre2l_jax.data import batching


def validate(config: ml_collections.ConfigDict, ctx: context.Context) -> None:
  """Clear errors for relabel settings that cannot run, before any work."""
  label_store.validate(config.relabel)
  config_lib.validate_numbers(config, ('relabel', 'student'))
  if config.relabel.storage == 'topk':  # top-k probabilities are taken at T
    config_lib.validate_numbers(config, ('evaluate',))
  if config.relabel.mode == 'stored':  # the batches of views the teacher labels
    images = image_sets.recovered_classes(config.recover, ctx.spec) * config.recover.ipc
    batching.check_batch_size(views.create_schedule(config, images).batch_size, ctx.mesh,
                              'student.batch_size')


def finished(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """relabel/result.json if it records `config`'s mode and, in stored mode, the labels of
  every set `config` labels in the folders its settings name; else None. (`run` checks
  more: it reads every shard back, and repairs damaged ones.)"""
  old = checkpoint.finished_result(os.path.join(workdir, 'relabel'))
  if old is None or old.get('mode') != config.relabel.mode:
    return None
  names = ['distilled'] + [b for b in ('random', 'coreset') if b in config.evaluate.baselines]
  for name in names if config.relabel.mode == 'stored' else ():
    directory = os.path.relpath(label_store.label_dir(config, workdir, name), workdir)
    if old.get('sets', {}).get(name, {}).get('dir') != directory:
      return None
  return old


def counted(logits_fn, progress):
  """`logits_fn` that ticks `progress` once per call (a batch of views; the calls already
  made show as `progress.calls`): the stored labels' progress line."""
  progress.calls = 0

  def call(batch_views):
    out = logits_fn(batch_views)
    progress.calls += 1
    if progress.calls == 1:
      jax.block_until_ready(out)  # compiled on the first call: not counted in the rate
      progress.start(1)
    progress.update(progress.calls, {})
    return out
  return call


def run(config: ml_collections.ConfigDict, workdir: str, ctx: context.Context) -> dict:
  """Stored mode: writes `label_store.label_dir(config, workdir, set)` for the distilled set
  and each baseline. Online mode: records that labels come from the teacher at training
  time. Finished labels are kept; `result.json` changes only when the labels do, and keeps
  the entries of sets this run did not label (merged, never fewer)."""
  spec, mesh = ctx.spec, ctx.mesh
  validate(config, ctx)
  start = time.time()
  sets = image_sets.image_sets(config, workdir)
  result = {'stage': 'relabel', 'mode': config.relabel.mode, 'sets': {}}
  stage_dir = os.path.join(workdir, 'relabel')
  scalars = []  # (step, dict): written only if this run changes the result (below)
  if config.relabel.mode == 'online':
    logging.info('relabel: online mode: the teacher labels each view inside the student\'s '
                 'step (nothing to store; relabel.mode=stored writes them once)')
  if config.relabel.mode == 'stored':
    model, teacher = teacher_lib.load(config, workdir, mesh)
    teacher_digest = teacher_lib.digest(config, workdir, mesh)
    logits_fn = label_store.create_teacher_logits(model, teacher, mesh)
    for name, (images, _) in sets.items():
      schedule = views.create_schedule(config, len(images))
      batching.check_batch_size(schedule.batch_size, mesh, 'student.batch_size')
      directory = label_store.label_dir(config, workdir, name)
      progress = train_lib.create_progress(f'relabel {name}', schedule.total_steps)
      set_start = time.time()
      manifest = label_store.write_labels(
          directory, images, schedule, config.relabel, spec,
          counted(logits_fn, progress), mesh, config.evaluate.temperature,
          overwrite=config.overwrite, teacher_digest=teacher_digest)
      set_scalars = {f'{name}/shards': len(manifest['shards']),
                     f'{name}/label_bytes': manifest['bytes']}
      if progress.calls:  # labels were made now (not found finished)
        set_scalars[f'{name}/views_per_second'] = (progress.calls * schedule.batch_size /
                                                   max(time.time() - set_start, 1e-9))
      scalars.append((schedule.total_steps, set_scalars))
      result['sets'][name] = {'label_bytes': manifest['bytes'],
                              'image_bytes': int(images.nbytes),
                              'storage': manifest['storage'], 'topk': manifest['topk'],
                              'dir': os.path.relpath(directory, workdir)}
      logging.info('relabel: %s labels %d bytes (%s) in %s', name, manifest['bytes'],
                   manifest['storage'], directory)
  old = checkpoint.finished_result(stage_dir)
  if old is not None:  # merged: the labels of other sets or settings are still there
    result['sets'] = {**old.get('sets', {}), **result['sets']}
  if old is not None and {k: old.get(k) for k in result} == files.normalised(result):
    return old  # the same labels: the measurements (and logs) stay those of the run that made them
  writer = train_lib.create_writer(os.path.join(stage_dir, 'logs'))
  writer.write_hparams(config.to_dict())
  for step, values in scalars:
    writer.write_scalars(step, values)
  writer.close()
  result['wall_seconds'] = time.time() - start
  return checkpoint.write_result(stage_dir, result)
