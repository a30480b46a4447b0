"""Evaluate: fresh students trained on the distilled set, and the same-protocol baselines.

Every student sees the views of `views.Schedule` (same crops, flips and mixing for the
distilled set and for the random real subset) and learns from the teacher's soft labels
(online or stored) or from hard labels (the DD-Ranking hard-label variant); see `student.py`.
Students differ by their initialisation seed. Top-1 is measured on the real test split.
"""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import models
from sre2l_jax import report
from sre2l_jax import rngs
from sre2l_jax import student
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import train_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline


def variants(config) -> list[tuple[str, str, bool]]:
  """(name, image set, hard labels) of every student family to train."""
  baselines = list(config.evaluate.baselines)
  unknown = set(baselines) - set(image_sets.BASELINES)
  if unknown:
    raise ValueError(f'evaluate.baselines has {sorted(unknown)}; valid: '
                     f'{", ".join(image_sets.BASELINES)}.')
  sets = ['distilled'] + (['random'] if 'random' in baselines else [])
  out = [(s, s, False) for s in sets]
  if 'hard_label' in baselines:
    out += [(f'{s}_hard', s, True) for s in sets]
  return out


def train_student(config, workdir, name, images, labels, hard, seed, mesh, teacher_model,
                  teacher, test, eval_step) -> dict:
  """Trains one student (resumable) and returns its result; skips a finished one."""
  spec = datasets.get_spec(config.dataset.name)
  student_dir = os.path.join(workdir, 'evaluate', name, f'seed{seed}')
  result_path = os.path.join(student_dir, 'result.json')
  if os.path.exists(result_path):
    return files.read_json(result_path)
  schedule = views.create_schedule(config, len(images))
  batching.check_batch_size(schedule.batch_size, mesh, 'relabel.batch_size (student batch)')
  target = 'hard' if hard else config.relabel.mode
  stored = None
  if target == 'stored':
    stored = label_store.StoredLabels.open(
        label_store.label_dir(workdir, name), images, schedule, config.evaluate.temperature,
        views.view_settings(config.relabel))

  model = models.create_model(config.student, spec.num_classes)
  total = schedule.total_steps
  tx = train_lib.create_optimizer(config.evaluate,
                                  train_lib.warmup_cosine(config.evaluate.lr, total))
  every = max(1, config.evaluate.checkpoint_every_epochs) * schedule.steps_per_epoch
  manager = checkpoint.create_manager(os.path.join(student_dir, 'checkpoints'),
                                      save_interval_steps=every, final_step=total)
  state, start = train_lib.restore_or_init(
      manager, train_lib.abstract_train_state(model, tx, spec.image_shape, mesh),
      lambda: train_lib.create_train_state(model, tx, spec.image_shape, rngs.key(seed), mesh))

  step = student.create_student_step(config, spec, teacher_model, mesh, target)
  batch = student.batch_fn(schedule, images, labels, mesh, stored)
  teacher_arg = teacher if target == 'online' else None
  loop = train_lib.Loop(
      name=f'evaluate {name} seed {seed}', total_steps=total,
      log_every=config.evaluate.log_every_steps, manager=manager,
      examples_per_step=schedule.batch_size, throughput_name='images_per_second',
      knobs=f'evaluate.lr (now {config.evaluate.lr})')
  start_time = time.time()

  def step_fn(state, s):
    images_s, labels_s, stored_s, key = batch(s)
    return step(state, images_s, labels_s, stored_s, key, teacher_arg)

  state, _ = train_lib.run_loop(loop, state, start, step_fn)
  top1 = train_lib.top1(eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                        test, config.evaluate.eval_batch_size, mesh)
  result = {'variant': name, 'seed': seed, 'test_top1': top1, 'steps': total,
            'epochs': schedule.epochs, 'batch_size': schedule.batch_size,
            'labels': target, 'wall_seconds': time.time() - start_time,
            'resumed_from_step': start}
  files.write_json(result_path, result)
  logging.info('evaluate: %s seed %d test top-1 %.4f', name, seed, top1)
  return result


def validate(config, mesh) -> None:
  label_store.validate(config.relabel)
  if config.evaluate.seeds <= 0:
    raise ValueError(f'evaluate.seeds={config.evaluate.seeds} must be positive.')
  if config.evaluate.temperature <= 0:
    raise ValueError(f'evaluate.temperature={config.evaluate.temperature} must be positive.')
  batching.check_batch_size(config.evaluate.eval_batch_size, mesh, 'evaluate.eval_batch_size')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `evaluate.seeds` students per variant; writes evaluate/result.json and the
  workdir's report.json / report.md."""
  start_time = time.time()
  spec = datasets.get_spec(config.dataset.name)
  mesh = batching.create_mesh(config.mesh_shape)
  validate(config, mesh)
  sets = image_sets.image_sets(config, workdir)  # names the missing stage if there is none
  teacher_model, teacher = teacher_lib.load(config, workdir, mesh)
  test = pipeline.load_split(config.dataset, 'test')
  # Every student is the same architecture: one compiled evaluation step serves them all.
  eval_step = train_lib.create_eval_step(
      models.create_model(config.student, spec.num_classes), spec, mesh)

  per_variant = {}
  for name, set_name, hard in variants(config):
    images, labels = sets[set_name]
    runs = [train_student(config, workdir, name, images, labels, hard, seed, mesh,
                          teacher_model, teacher, test, eval_step)
            for seed in range(config.evaluate.seeds)]
    accs = np.asarray([r['test_top1'] for r in runs])
    per_variant[name] = {'test_top1_mean': float(accs.mean()),
                         'test_top1_std': float(accs.std()), 'test_top1': accs.tolist(),
                         'seeds': len(runs), 'labels': runs[0]['labels'],
                         'images': int(len(images)), 'steps': runs[0]['steps']}
  result = {'stage': 'evaluate', 'dataset': spec.name, 'ipc': config.recover.ipc,
            'student': config.student.to_dict(), 'temperature': config.evaluate.temperature,
            'test_top1_unit': 'fraction', 'variants': per_variant,
            'wall_seconds': time.time() - start_time}
  files.write_json(os.path.join(workdir, 'evaluate', 'result.json'), result)
  report.write(config, workdir)
  return result
