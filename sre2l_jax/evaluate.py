"""Evaluate: fresh students trained on the distilled set, and the same-protocol baselines.

Every student sees the views of `views.Schedule` (same crops, flips and mixing for the
distilled set and for the random real subset) and learns from the teacher's soft labels
(online or stored) or from hard labels (the DD-Ranking hard-label variant); see `student.py`.
Students differ by their initialisation seed. Top-1 is measured on the real test split.

Students are trained together: every student of one architecture whose variant has the same
label kind and set size (all seeds, the distilled set and the random subset alike) is one
member of a stack, a `TrainState` with a leading student axis, trained by one compiled step
(`student.create_student_step`): the views of a batch depend on `config.seed`, not on the
student, so they and the teacher's soft labels on them are computed once per image set and
shared by all its students. `evaluate.stack_students` caps a stack's size (1: one by one).
A stack's resumable state lives in `evaluate/stacks/<digest of its members>/checkpoints`
(removed once every member's result is written); `evaluate.students` lists architectures,
trained one after another.

Students live in `evaluate/<variant>/<settings digest>/seed<k>/` (result.json, the finished
student in checkpoints/, metrics: one TensorBoard run and `metrics.jsonl` per student), the
digest taken over everything a student's result depends on (`student_settings`, also written
to `fingerprint.json` beside the seeds): another student model, temperature, label storage,
schedule or image set trains new students beside the old ones, and a finished student is
reused only under its own settings. Beside it, `teacher_key.json` records the digest of the
teacher whose soft labels the students learnt (`teacher_store.KEY_FILE`): another teacher is
refused. The distilled set is checked against recover's fingerprint and images digest
(`image_sets.check_recovered`). `evaluate/result.json` is the evaluation of the last run's
settings.
"""

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sre2l_jax import checkpoint
from sre2l_jax import config_lib
from sre2l_jax import context
from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import memory
from sre2l_jax import metric_writers
from sre2l_jax import models
from sre2l_jax import report
from sre2l_jax import rngs
from sre2l_jax import student
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import teacher_store
from sre2l_jax import train_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import pipeline

# Evaluate keys that change a student (seeds, eval batch, checkpoint and log intervals do not).


FULL_DATA = 'full_hard'  # the variant of evaluate.baselines' 'full_data'


def variants(config) -> list[tuple[str, str, bool]]:
  """(name, image set, hard labels) of every student family to train."""
  baselines = list(config.evaluate.baselines)
  unknown = set(baselines) - set(image_sets.BASELINES)
  if unknown:
    raise ValueError(f'evaluate.baselines has {sorted(unknown)}; valid: '
                     f'{", ".join(image_sets.BASELINES)}.')
  sets = ['distilled'] + [s for s in ('random', 'coreset') if s in baselines]
  out = [(s, s, False) for s in sets]
  if 'hard_label' in baselines:
    out += [(f'{s}_hard', s, True) for s in sets]
  if 'full_data' in baselines:
    out.append((FULL_DATA, 'full', True))
  return out


def student_configs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(architecture, model config) of each student architecture to evaluate: each of
  `evaluate.students` (in order, once each; a model name, or a spec 'name:key=value,...'
  over the student's model keys, e.g. 'resnet18_small:width=16', named by that spec), or
  (config.student.name, the student's model) when none is listed."""
  specs = models.split_specs(config.evaluate.students)
  base = config_lib.student_model(config)
  if not specs:
    return [(base.name, base)]
  out = []
  for spec in specs:
    try:
      cfg = models.from_spec(spec, base)
    except ValueError as e:
      raise ValueError(f'evaluate.students: {e}') from None
    out.append((spec, cfg))
  return out


def labels_of(config, hard: bool) -> str:
  """'hard', 'online' or 'stored <storage>' (the report's label column)."""
  if hard:
    return 'hard'
  if config.relabel.mode == 'stored':
    return f'stored {label_store.storage_name(config.relabel)}'
  return config.relabel.mode


def student_settings(config, hard: bool, images: np.ndarray, student_cfg=None) -> dict:
  """Everything the result of a student of one variant depends on (besides its seed):
  `fingerprints.TABLE['student']` ('student_hard'). student_cfg: the student model (default
  `config_lib.student_model(config)`)."""
  student_cfg = config_lib.student_model(config) if student_cfg is None else student_cfg
  return fingerprints.record('student_hard' if hard else 'student', config,
                             student=student_cfg.to_dict(),
                             images_sha256=label_store.images_digest(images),
                             labels=labels_of(config, hard))


def variant_dir(workdir: str, name: str, settings: dict, full_data_dir: str = '') -> str:
  """`workdir/evaluate/<name>/<digest of settings>`: the students of one variant; the
  full-data students under `full_data_dir/<name>/...` when given (evaluate.full_data_dir:
  trained once per dataset, student and protocol, which the settings' digest names, and
  reused by every run that points there)."""
  if name == FULL_DATA and full_data_dir:
    return os.path.join(full_data_dir, name, fingerprints.digest(settings, 10))
  return os.path.join(workdir, 'evaluate', name, fingerprints.digest(settings, 10))


@dataclasses.dataclass(eq=False)
class Variant:
  """One student family of one architecture: its image set, labels and folder."""
  name: str
  arch: str
  student_cfg: ml_collections.ConfigDict
  images: np.ndarray
  labels: np.ndarray
  target: str  # 'online' | 'stored' | 'hard'
  stored: label_store.StoredLabels | None
  settings: dict
  directory: str

  def seed_dir(self, seed: int) -> str:
    return os.path.join(self.directory, f'seed{seed}')


def stack_dir(workdir: str, members) -> str:
  """`workdir/evaluate/stacks/<digest>`: the resumable state of the stack of `members`
  ((Variant, seed) pairs), named after its members' folders and seeds."""
  names = [[os.path.relpath(v.directory, workdir), seed] for v, seed in members]
  return os.path.join(workdir, 'evaluate', 'stacks', fingerprints.digest({'students': names}, 10))


@dataclasses.dataclass(eq=False)
class Stack:
  """Students trained together ((Variant, seed) pairs of one architecture, label kind and
  set size) and what they share: schedule, model, optimiser, the folder of their state."""
  members: list
  directory: str
  schedule: views.Schedule
  model: Any
  lr_schedule: optax.Schedule
  tx: optax.GradientTransformation

  @property
  def sets(self) -> list[Variant]:
    """The image sets, in order (a set's seeds share it)."""
    return list(dict.fromkeys(v for v, _ in self.members))

  @property
  def set_index(self) -> tuple[int, ...]:
    sets = self.sets
    return tuple(sets.index(v) for v, _ in self.members)

  @property
  def first(self) -> Variant:
    return self.members[0][0]


def create_stack(config, workdir: str, members, spec) -> Stack:
  schedule = views.create_schedule(config, len(members[0][0].images))
  lr_schedule = train_lib.student_schedule(config.evaluate, schedule.total_steps)
  return Stack(members, stack_dir(workdir, members), schedule,
               models.create_model(members[0][0].student_cfg, spec.num_classes),
               lr_schedule, train_lib.create_optimizer(config.evaluate, lr_schedule))


def restore_or_init(config, workdir: str, stack: Stack, spec, mesh):
  """(manager, stacked state, start step): the stack's latest checkpoint, or every member
  initialised exactly as a student trained alone, then stacked."""
  members, total = stack.members, stack.schedule.total_steps
  checkpoint.check_fingerprint(stack.directory, {
      'students': [[os.path.relpath(v.directory, workdir), seed] for v, seed in members],
      'settings': [v.settings for v in stack.sets]})
  every = max(1, config.evaluate.checkpoint_every_epochs) * stack.schedule.steps_per_epoch
  manager = checkpoint.create_manager(os.path.join(stack.directory, 'checkpoints'),
                                      save_interval_steps=every, final_step=total)
  replicated = batching.replicated(mesh)
  one = train_lib.abstract_train_state(stack.model, stack.tx, spec.image_shape, mesh)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((len(members),) + x.shape, x.dtype, sharding=replicated),
      one)

  def init():
    states = [train_lib.create_train_state(stack.model, stack.tx, spec.image_shape,
                                           rngs.key(seed), mesh) for _, seed in members]
    return jax.jit(student.stack, out_shardings=replicated)(states)
  return (manager, *train_lib.restore_or_init(manager, abstract, init))


def create_step(config, stack: Stack, spec, mesh, teacher_model, teacher, state):
  """(state, step) -> (state, metrics): the stack's compiled step on its batch of `step`,
  checked to fit the devices' memory (at `state`'s shapes)."""
  target, schedule = stack.first.target, stack.schedule
  step = student.create_student_step(config, spec, teacher_model, mesh, target,
                                     stack.set_index)
  stored = [v.stored for v in stack.sets] if target == 'stored' else None
  batch = student.batch_fn(schedule, [(v.images, v.labels) for v in stack.sets], mesh, stored)
  teacher_arg = teacher if target == 'online' else None
  memory.check_step_fits(
      step, lambda: (state, *batch(1)[:3], schedule.view_key(0, 0), teacher_arg),
      config.device_memory_gb, f'The student step of {len(stack.members)} student(s) trained '
      f'together at student.batch_size={schedule.batch_size} (lower evaluate.stack_students, '
      f'now {config.evaluate.stack_students}, or student.batch_size, or use more devices)')

  def step_fn(state, s):
    images_s, labels_s, stored_s, key = batch(s)
    return step(state, images_s, labels_s, stored_s, key, teacher_arg)
  return step_fn


def create_writers(config, stack: Stack) -> metric_writers.StudentWriters:
  """One writer per member, in its seed folder, its hparams written."""
  writers = metric_writers.StudentWriters(
      train_lib.create_writer(v.seed_dir(seed)) for v, seed in stack.members)
  for (v, seed), writer in zip(stack.members, writers.writers):
    writer.write_hparams(metric_writers.hparams(
        config, **{'evaluate.variant': v.name, 'student.seed': seed,
                   'student.name': v.arch}), metrics=('test_top1',))
  return writers


def train_stack(config, workdir, members, ctx, teacher_model, teacher, test) -> list[dict]:
  """Trains the students `members` ((Variant, seed) pairs of one architecture, label kind
  and set size) together, resumable; writes and returns each one's result."""
  spec, mesh = ctx.spec, ctx.mesh
  stack = create_stack(config, workdir, members, spec)
  schedule, total = stack.schedule, stack.schedule.total_steps
  manager, state, start = restore_or_init(config, workdir, stack, spec, mesh)
  step_fn = create_step(config, stack, spec, mesh, teacher_model, teacher, state)
  writers = create_writers(config, stack)
  eval_step = student.create_eval_step(stack.model, spec, mesh, student.stack_mode(config))
  eval_every = config.evaluate.eval_every_epochs * schedule.steps_per_epoch

  def test_top1(state):
    return student.top1(eval_step, {'params': train_lib.eval_params(state),
                                    'batch_stats': state.batch_stats},
                        test, config.evaluate.eval_batch_size, mesh)

  def after_step(state, s):
    if eval_every and s % eval_every == 0 and s < total:
      for writer, acc in zip(writers.writers, test_top1(state)):
        writer.write_scalars(s, {'test_top1': float(acc)})

  names = ', '.join(f'{v.name} seed {seed}' for v, seed in members)
  loop = train_lib.Loop(
      name=f'evaluate {stack.first.arch} ({names})', total_steps=total,
      log_every=config.evaluate.log_every_steps, manager=manager, writer=writers,
      examples_per_step=schedule.batch_size, throughput_name='images_per_second',
      show=('loss',), schedule=lambda s: stack.lr_schedule(s - 1),  # step s applies lr(s - 1)
      knobs=f'evaluate.lr (now {config.evaluate.lr})',
      rerun='re-run (students of other settings get their own folder)')
  start_time = time.time()
  state, _ = train_lib.run_loop(loop, state, start, step_fn, after_step)
  manager.close()
  accs = test_top1(state)
  wall = time.time() - start_time
  # Every finished student first (its state in its own folder), then the results that mark
  # them finished: a kill in between re-trains the stack's members still without a result.
  save_students(stack, state)
  results = write_results(stack, accs, writers, {'wall_seconds': wall,
                                                 'resumed_from_step': start})
  writers.close()
  if jax.process_index() == 0:
    epath.Path(stack.directory).rmtree()  # every member's result is written: the stack is done
  return results


def save_students(stack: Stack, state) -> None:
  """Each member's final state in its own seed folder."""
  total = stack.schedule.total_steps
  for i, (v, seed) in enumerate(stack.members):
    seed_manager = checkpoint.create_manager(os.path.join(v.seed_dir(seed), 'checkpoints'))
    if total in seed_manager.all_steps():  # saved by a run killed before the results
      seed_manager.delete(total)
    seed_manager.save(total, args=ocp.args.StandardSave(student.unstack(state, i)))
    seed_manager.wait_until_finished()
    seed_manager.close()


def write_results(stack: Stack, accs, writers, measured: dict) -> list[dict]:
  """Each member's result.json (its test top-1 `accs[i]`, with `measured`: wall seconds,
  resumed step), which marks it finished; returns them."""
  schedule, total = stack.schedule, stack.schedule.total_steps
  results = []
  for i, (v, seed) in enumerate(stack.members):
    writers.writers[i].write_scalars(total, {'test_top1': float(accs[i])})
    result = {'variant': v.name, 'seed': seed, 'test_top1': float(accs[i]), 'steps': total,
              'epochs': schedule.epochs, 'batch_size': schedule.batch_size,
              'labels': v.target, **measured,
              'student': v.student_cfg.to_dict(), 'trained_with': len(stack.members)}
    if v.stored is not None:
      result['label_storage'] = v.stored.manifest['storage'] + (
          f' (k={v.stored.manifest["topk"]})' if v.stored.manifest.get('topk') else '')
    results.append(checkpoint.write_result(v.seed_dir(seed), result))
    logging.info('evaluate: %s %s seed %d test top-1 %.4f', v.arch, v.name, seed, accs[i])
  return results


def validate(config, ctx: context.Context) -> None:
  """Clear errors for settings the stage cannot run, before any work."""
  label_store.validate(config.relabel)
  variants(config)
  if config.evaluate.images_dir:
    image_sets.check_external(config.evaluate.images_dir)
  spec, mesh = ctx.spec, ctx.mesh
  for arch, student_cfg in student_configs(config):
    models.check_buildable(student_cfg, spec.num_classes, spec.image_shape,
                           f'The student {arch}:')
  student.stack_mode(config)
  student.loss_settings(config)
  if (config.evaluate.loss == 'mse_ce' and config.relabel.mode == 'stored' and
      config.relabel.storage == 'topk'):
    raise ValueError("evaluate.loss='mse_ce' needs the teacher's logits; relabel.storage="
                     "'topk' keeps top-k probabilities only: use relabel.storage float32 or "
                     "float16, or relabel.mode=online.")
  if config.evaluate.seeds <= 0:
    raise ValueError(f'evaluate.seeds={config.evaluate.seeds} must be positive.')
  if config.evaluate.temperature <= 0:
    raise ValueError(f'evaluate.temperature={config.evaluate.temperature} must be positive.')
  for key in ('eval_every_epochs', 'stack_students'):
    value = config.evaluate[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'evaluate.{key}={value!r} must be an integer >= 0.')
  config_lib.validate_numbers(config, ('evaluate', 'relabel', 'student'))
  batching.check_batch_size(config.evaluate.eval_batch_size, mesh, 'evaluate.eval_batch_size')
  # The student batch of the distilled set (and the baselines: as many images).
  images = image_sets.recovered_classes(config.recover, spec) * config.recover.ipc
  batching.check_batch_size(views.create_schedule(config, images).batch_size, mesh,
                            'student.batch_size (student batch)')


def stacks(config, plan: list[Variant]) -> list[list[tuple[Variant, int]]]:
  """The students still to train ((Variant, seed) pairs), in stacks trained together: one
  per architecture, label kind and set size (what one compiled step needs to agree on), cut
  into `evaluate.stack_students` members at most (0: no cap)."""
  groups = {}
  for v in plan:
    for seed in range(config.evaluate.seeds):
      if checkpoint.finished_result(v.seed_dir(seed)) is None:
        groups.setdefault((v.arch, v.target, len(v.images)), []).append((v, seed))
  return student.split_stacks(groups.values(), config.evaluate.stack_students)


def plan_students(config, workdir: str, sets: dict, mesh, teacher_digest: str) -> list[Variant]:
  """Every student family (variant x architecture) of `sets` ({set: (images, labels)}),
  every input checked before any student trains: sizes, every stored label shard, every
  folder's fingerprint (all checked before any is claimed)."""
  plan, student_cfgs = [], student_configs(config)
  for name, set_name, hard in variants(config):
    images, labels = sets[set_name]
    schedule = views.create_schedule(config, len(images))
    batching.check_batch_size(schedule.batch_size, mesh, 'student.batch_size (student batch)')
    target = 'hard' if hard else config.relabel.mode
    stored = None
    if target == 'stored':
      stored = label_store.StoredLabels.open(
          label_store.label_dir(config, workdir, set_name), images, schedule,
          config.evaluate.temperature, views.view_settings(config.relabel),
          teacher_digest).verify()
    for arch, student_cfg in student_cfgs:
      settings = student_settings(config, hard, images, student_cfg)
      plan.append(Variant(name, arch, student_cfg, images, labels, target, stored,
                          settings, variant_dir(workdir, name, settings,
                                                config.evaluate.full_data_dir)))
  for write in (False, True):  # every folder checked before any is claimed
    for v in plan:
      checkpoint.check_fingerprint(v.directory, v.settings, write=write)
      # The teacher whose labels the students learnt (apart: the folder names predate it).
      if v.target != 'hard':
        checkpoint.check_fingerprint(v.directory, {'teacher_sha256': teacher_digest},
                                     write=write, name=teacher_store.KEY_FILE)
  return plan


def summarise(config, workdir: str, plan: list[Variant], spec) -> dict:
  """evaluate/result.json's content (without its measurements): every variant's mean, std
  and per-seed top-1 over its finished students, per architecture."""
  architectures = {}
  for v in plan:
    runs = [checkpoint.finished_result(v.seed_dir(seed)) for seed in range(config.evaluate.seeds)]
    accs = np.asarray([r['test_top1'] for r in runs])
    architectures.setdefault(v.arch, {})[v.name] = {
        'test_top1_mean': float(accs.mean()), 'test_top1_std': float(accs.std()),
        'test_top1': accs.tolist(), 'seeds': len(runs), 'labels': runs[0]['labels'],
        'label_storage': runs[0].get('label_storage'), 'images': int(len(v.images)),
        'steps': runs[0]['steps'], 'dir': os.path.relpath(v.directory, workdir)}
  first_arch, first = student_configs(config)[0]
  result = {'stage': 'evaluate', 'dataset': spec.name, 'ipc': config.recover.ipc,
            'student': first.to_dict(), 'temperature': config.evaluate.temperature,
            'test_top1_unit': 'fraction', 'variants': architectures[first_arch],
            # Every student architecture (`evaluate.students`): {arch: {variant: row}}, rows
            # as in 'variants' (which is the first architecture's).
            'architectures': architectures}
  if config.evaluate.images_dir:  # the distilled set evaluated: a folder made elsewhere
    result['images_dir'] = config.evaluate.images_dir
  return result


def finished(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """evaluate/result.json if it has a row for every variant and student architecture of
  `config`, each with all `evaluate.seeds` students finished in its folder; else None.
  (`run` checks more: each folder's settings, images included, and the stored labels.)"""
  old = checkpoint.finished_result(os.path.join(workdir, 'evaluate'))
  if old is None:
    return None
  seeds = config.evaluate.seeds
  for arch, _ in student_configs(config):
    for name, _, _ in variants(config):
      row = old.get('architectures', {}).get(arch, {}).get(name)
      if row is None or row.get('seeds') != seeds or not all(
          files.exists(os.path.join(workdir, row['dir'], f'seed{seed}', checkpoint.RESULT))
          for seed in range(seeds)):
        return None
  return old


def run(config: ml_collections.ConfigDict, workdir: str, ctx: context.Context) -> dict:
  """Trains `evaluate.seeds` students per variant and student architecture; writes
  evaluate/result.json and the workdir's report.json / report.md. Finished students are
  reused, and a re-run that trains nothing leaves evaluate/result.json as the run that
  measured it wrote it."""
  start_time = time.time()
  spec, mesh = ctx.spec, ctx.mesh
  validate(config, ctx)
  teacher_model, teacher = teacher_lib.load(config, workdir, mesh)
  teacher_digest = teacher_lib.digest(config, workdir, mesh)
  # Names the missing stage if there is none; refuses a set made by other settings/teacher.
  sets = image_sets.image_sets(config, workdir)
  if 'full_data' in config.evaluate.baselines:  # hard labels only: relabel never sees it
    sets['full'] = image_sets.full_data(config)
  test = pipeline.load_split(config.dataset, 'test')
  plan = plan_students(config, workdir, sets, mesh, teacher_digest)

  todo = stacks(config, plan)
  trained = sum(len(members) for members in todo)
  for members in todo:
    train_stack(config, workdir, members, ctx, teacher_model, teacher, test)

  result = summarise(config, workdir, plan, spec)
  stage_dir = os.path.join(workdir, 'evaluate')
  old = checkpoint.finished_result(stage_dir)
  if trained or old is None or {k: old.get(k) for k in result} != files.normalised(result):
    result['wall_seconds'] = time.time() - start_time
    students = len(plan) * config.evaluate.seeds
    if trained < students:
      result['wall_seconds_note'] = (f'this invocation only: {students - trained} of '
                                     f'{students} students were trained by an earlier run')
    result = checkpoint.write_result(stage_dir, result)
  else:
    result = old  # nothing trained, the same evaluation: its measurements stay
  report.write(config, workdir)
  return result
