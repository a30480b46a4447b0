"""Evaluate: fresh students trained on the distilled set, and the same-protocol baselines.

Every student sees the views of `views.Schedule` (same crops, flips and mixing for the
distilled set and for the random real subset) and learns from the teacher's soft labels
(online or stored) or from hard labels (the DD-Ranking hard-label variant); see `student.py`.
Students differ by their initialisation seed. Top-1 is measured on the real test split.

Students live in `evaluate/<variant>/<settings digest>/seed<k>/`, the digest taken over
everything a student's result depends on (`student_settings`, also written to
`fingerprint.json` beside the seeds): another student model, temperature, label storage,
schedule or image set trains new students beside the old ones, and a finished student is
reused only under its own settings. `evaluate/result.json` is the evaluation of the last
run's settings.
"""

import os
import time

import ml_collections
import numpy as np
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import memory
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

# Evaluate keys that change a student (seeds, eval batch, checkpoint and log intervals do not).
OPTIMIZER_KEYS = ('optimizer', 'lr', 'momentum', 'nesterov', 'weight_decay', 'decay_all')


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


def labels_of(config, hard: bool) -> str:
  """'hard', 'online' or 'stored <storage>' (the report's label column)."""
  if hard:
    return 'hard'
  if config.relabel.mode == 'stored':
    return f'stored {label_store.storage_name(config.relabel)}'
  return config.relabel.mode


def student_settings(config, hard: bool, images: np.ndarray) -> dict:
  """Everything the result of a student of one variant depends on (besides its seed)."""
  settings = {
      'dataset': config.dataset.name, 'test_limit': config.dataset.test_limit,
      'student': config.student.to_dict(), 'seed': config.seed,
      'optimizer': {k: config.evaluate[k] for k in OPTIMIZER_KEYS},
      'schedule': {'batch_size': config.relabel.batch_size, 'epochs': config.relabel.epochs},
      'view': views.view_settings(config.relabel),
      'images_sha256': label_store.images_digest(images), 'labels': labels_of(config, hard)}
  if not hard:
    settings.update(temperature=config.evaluate.temperature,
                    teacher=config.teacher.to_dict(), teacher_dir=config.squeeze.teacher_dir)
  return settings


def variant_dir(workdir: str, name: str, settings: dict) -> str:
  """`workdir/evaluate/<name>/<digest of settings>`: the students of one variant."""
  return os.path.join(workdir, 'evaluate', name, label_store.digest(settings, 10))


def train_student(config, student_dir, images, labels, target, stored, seed, mesh,
                  teacher_model, teacher, test, eval_step, log_name) -> dict:
  """Trains one student (resumable) and returns its result; reuses a finished one."""
  spec = datasets.get_spec(config.dataset.name)
  finished = checkpoint.finished_result(student_dir)
  if finished is not None:
    return finished
  schedule = views.create_schedule(config, len(images))
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
  memory.check_step_fits(
      step, lambda: (state, *batch(1)[:3], schedule.view_key(0, 0), teacher_arg),
      config.device_memory_gb, f'The student step at relabel.batch_size='
      f'{schedule.batch_size} (lower it, or use more devices)')
  loop = train_lib.Loop(
      name=f'evaluate {log_name} seed {seed}', total_steps=total,
      log_every=config.evaluate.log_every_steps, manager=manager,
      examples_per_step=schedule.batch_size, throughput_name='images_per_second',
      knobs=f'evaluate.lr (now {config.evaluate.lr})',
      rerun='re-run (students of other settings get their own folder)')
  start_time = time.time()

  def step_fn(state, s):
    images_s, labels_s, stored_s, key = batch(s)
    return step(state, images_s, labels_s, stored_s, key, teacher_arg)

  state, _ = train_lib.run_loop(loop, state, start, step_fn)
  top1 = train_lib.top1(eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                        test, config.evaluate.eval_batch_size, mesh)
  result = {'variant': log_name, 'seed': seed, 'test_top1': top1, 'steps': total,
            'epochs': schedule.epochs, 'batch_size': schedule.batch_size,
            'labels': target, 'wall_seconds': time.time() - start_time,
            'resumed_from_step': start}
  if stored is not None:
    result['label_storage'] = stored.manifest['storage'] + (
        f' (k={stored.manifest["topk"]})' if stored.manifest.get('topk') else '')
  result = checkpoint.write_result(student_dir, result)
  logging.info('evaluate: %s seed %d test top-1 %.4f', log_name, seed, top1)
  return result


def validate(config, mesh) -> None:
  """Clear errors for settings the stage cannot run, before any work."""
  label_store.validate(config.relabel)
  variants(config)
  if config.evaluate.seeds <= 0:
    raise ValueError(f'evaluate.seeds={config.evaluate.seeds} must be positive.')
  if config.evaluate.temperature <= 0:
    raise ValueError(f'evaluate.temperature={config.evaluate.temperature} must be positive.')
  train_lib.validate_numbers(config, ('evaluate', 'relabel'))
  batching.check_batch_size(config.evaluate.eval_batch_size, mesh, 'evaluate.eval_batch_size')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `evaluate.seeds` students per variant; writes evaluate/result.json and the
  workdir's report.json / report.md. Finished students are reused, and a re-run that trains
  nothing leaves evaluate/result.json as the run that measured it wrote it."""
  start_time = time.time()
  spec = datasets.get_spec(config.dataset.name)
  mesh = batching.create_mesh(config.mesh_shape)
  validate(config, mesh)
  sets = image_sets.image_sets(config, workdir)  # names the missing stage if there is none
  teacher_model, teacher = teacher_lib.load(config, workdir, mesh)
  test = pipeline.load_split(config.dataset, 'test')

  # Every input is checked before any student trains: sizes, and every stored label shard.
  plan = []
  for name, set_name, hard in variants(config):
    images, labels = sets[set_name]
    schedule = views.create_schedule(config, len(images))
    batching.check_batch_size(schedule.batch_size, mesh, 'relabel.batch_size (student batch)')
    target = 'hard' if hard else config.relabel.mode
    stored = None
    if target == 'stored':
      stored = label_store.StoredLabels.open(
          label_store.label_dir(config, workdir, set_name), images, schedule,
          config.evaluate.temperature, views.view_settings(config.relabel)).verify()
    settings = student_settings(config, hard, images)
    plan.append((name, images, labels, target, stored, settings,
                 variant_dir(workdir, name, settings)))
  for *_, settings, directory in plan:
    checkpoint.check_fingerprint(directory, settings)

  # Every student is the same architecture: one compiled evaluation step serves them all.
  eval_step = train_lib.create_eval_step(
      models.create_model(config.student, spec.num_classes), spec, mesh)
  per_variant, trained = {}, 0
  for name, images, labels, target, stored, settings, directory in plan:
    runs = []
    for seed in range(config.evaluate.seeds):
      student_dir = os.path.join(directory, f'seed{seed}')
      trained += checkpoint.finished_result(student_dir) is None
      runs.append(train_student(config, student_dir, images, labels, target, stored, seed,
                                mesh, teacher_model, teacher, test, eval_step, name))
    accs = np.asarray([r['test_top1'] for r in runs])
    per_variant[name] = {'test_top1_mean': float(accs.mean()),
                         'test_top1_std': float(accs.std()), 'test_top1': accs.tolist(),
                         'seeds': len(runs), 'labels': runs[0]['labels'],
                         'label_storage': runs[0].get('label_storage'),
                         'images': int(len(images)), 'steps': runs[0]['steps'],
                         'dir': os.path.relpath(directory, workdir)}
  result = {'stage': 'evaluate', 'dataset': spec.name, 'ipc': config.recover.ipc,
            'student': config.student.to_dict(), 'temperature': config.evaluate.temperature,
            'test_top1_unit': 'fraction', 'variants': per_variant}
  stage_dir = os.path.join(workdir, 'evaluate')
  old = checkpoint.finished_result(stage_dir)
  if trained or old is None or {k: old.get(k) for k in result} != files.normalised(result):
    result['wall_seconds'] = time.time() - start_time
    students = sum(v['seeds'] for v in per_variant.values())
    if trained < students:
      result['wall_seconds_note'] = (f'this invocation only: {students - trained} of '
                                     f'{students} students were trained by an earlier run')
    result = checkpoint.write_result(stage_dir, result)
  else:
    result = old  # nothing trained, the same evaluation: its measurements stay
  report.write(config, workdir)
  return result
