"""Continual: class-incremental evaluation of a distilled set (SRe2L's Tiny-ImageNet 5- and
10-step setting, after DM).

The classes arrive in `continual.steps` equal groups, in a seeded random order or in the
explicit `continual.class_order`. For every image set (the distilled set, and the
class-balanced random real subset as the same-protocol baseline) one student learns step
after step. At step k it continues from step k-1 (parameters and BatchNorm statistics; the
optimiser state and its cosine schedule start afresh) and trains `continual.epochs_per_step`
epochs on the set's images of every class seen so far (the views of `views.batch_views`),
with the teacher's soft labels restricted to those classes: teacher and student logits of the
unseen classes are -inf before the softmax at temperature T, so no label mass and no gradient
ever reaches them. It is then evaluated on the real test images of the seen classes,
predicting among the seen classes. Labels are computed online (stored labels were made for
another schedule).

The sets train side by side: at every class step the students of the sets (of equal size:
ipc images per seen class) are stacked and trained by one compiled step
(`student.create_continual_step`, `evaluate.stack_students` caps the stack; 1: one
by one), each on its own images, with the same views, mask and learning rate; per set the
result equals a student trained alone up to float rounding. A set's metrics (loss, lr,
images/s, and test top-1 after every class step, steps counting every iteration so far) go
to its own writer in `continual/<set>/` (TensorBoard and metrics.jsonl).

Each finished (set, step) is checkpointed (`continual/<set>/checkpoints`, checkpoint step =
class steps done) and recorded in `continual/<set>/steps.json`, and `continual/progress.json`
counts the steps every set has finished; a killed run resumes from the last finished step.
Outputs: `continual/result.json`, `continual/accuracy.png` and the report's section.
"""

import collections
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import config_lib
from sre2l_jax import context
from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import image_sets
from sre2l_jax import label_store
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

SETS = ('distilled', 'random')
PROGRESS = 'progress.json'


# ----------------------------------------------------------------------------- classes


def class_order(config, num_classes: int) -> list[int]:
  """The order in which the classes arrive: `continual.class_order` (a tuple of class ids,
  every class exactly once) or a permutation drawn from `continual.class_order_seed`."""
  cfg = config.continual
  if not cfg.class_order:
    rng = rngs.numpy_rng('class_order', cfg.class_order_seed)
    return [int(c) for c in rng.permutation(num_classes)]
  items = list(cfg.class_order)
  bad = [t for t in items if isinstance(t, bool) or not isinstance(t, (int, np.integer))
         or t < 0]
  if bad:
    raise ValueError(f'continual.class_order has entries that are not class ids: {bad}. '
                     f'List every class id 0..{num_classes - 1} once, as a tuple.')
  order = [int(t) for t in items]
  counts = collections.Counter(order)
  problems = []
  outside = sorted(c for c in counts if c >= num_classes)
  if outside:
    problems.append(f'out of range (0..{num_classes - 1}): {outside}')
  repeated = sorted(c for c, n in counts.items() if n > 1)
  if repeated:
    problems.append(f'repeated: {repeated}')
  missing = sorted(set(range(num_classes)) - set(counts))
  if missing:
    problems.append(f'missing: {missing}')
  if problems:
    raise ValueError(f'continual.class_order must list each of the {num_classes} classes '
                     f'exactly once; {"; ".join(problems)}.')
  return order


def step_classes(order: list[int], steps: int) -> list[list[int]]:
  """The classes that arrive at each step: `order` cut into `steps` equal groups."""
  n = len(order)
  if steps <= 0 or n % steps:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(f'continual.steps={steps} does not divide the {n} classes into equal '
                     f'groups; valid: {divisors}.')
  per = n // steps
  return [list(order[i * per:(i + 1) * per]) for i in range(steps)]


def seen_classes(groups: list[list[int]], step: int) -> list[int]:
  """Every class seen up to and including `step` (0-based), in arrival order."""
  return [c for group in groups[:step + 1] for c in group]


def class_mask(seen, num_classes: int) -> np.ndarray:
  """bool (num_classes,): True for the seen classes."""
  mask = np.zeros(num_classes, bool)
  mask[np.asarray(list(seen), int)] = True
  return mask


def seen_subset(images: np.ndarray, labels: np.ndarray, seen) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of the classes in `seen`, in their original order."""
  keep = np.isin(labels, np.asarray(list(seen)))
  return images[keep], labels[keep]


def step_schedule(config, num_images: int, step: int, num_devices: int) -> views.Schedule:
  """Batches and views of class step `step`: batches of student.batch_size, or, while the
  seen set is smaller, of all its images rounded up to the device count (wrapping around)."""
  batch = min(config.student.batch_size, -(-num_images // num_devices) * num_devices)
  seed = int(rngs.numpy_rng('continual_schedule', config.seed, step).integers(2**31 - 1))
  return views.Schedule(num_images, batch, config.continual.epochs_per_step, seed)


# ----------------------------------------------------------------------------- steps


def create_optimizer(config):
  """The evaluate optimiser with its learning rate injected as state, so that the class
  steps (each with its own cosine schedule) share one compiled step."""
  return optax.inject_hyperparams(
      lambda learning_rate: train_lib.create_optimizer(config.evaluate, learning_rate))(
          learning_rate=0.0)


def train_class_step(config, step_fn, states, subsets, mask, schedule, teacher, mesh,
                     log_name: str, writers=None):
  """Trains the stacked `states` (S students, fresh optimisers), student i on `subsets[i]`
  ((images, labels), all of one size, sharing `schedule`), restricted to `mask`; returns
  (states, mean loss over the class step per student (S,)). writers: a
  `metric_writers.StudentWriters` of the S students, or None."""
  total = schedule.total_steps
  lr_schedule = train_lib.student_schedule(config.evaluate, total)
  lrs = np.asarray(lr_schedule(np.arange(total)))
  mask = jax.device_put(mask, batching.replicated(mesh))
  batch = student.batch_fn(schedule, subsets, mesh)

  def one_step(state, step):
    images_s, labels_s, _, key = batch(step)
    return step_fn(state, images_s, labels_s, key, teacher, mask, lrs[step - 1])

  loop = train_lib.Loop(name=f'continual {log_name}', total_steps=total,
                        log_every=config.evaluate.log_every_steps, writer=writers,
                        examples_per_step=schedule.batch_size,
                        throughput_name='images_per_second',
                        show=('loss',),
                        schedule=lambda step: lr_schedule(step - 1),
                        knobs=f'evaluate.lr (now {config.evaluate.lr})')
  states, done = train_lib.run_loop(loop, states, 0, one_step)
  return states, [float(loss) for loss in done.means['loss']]


def together(config, names: list[str], sizes: dict) -> list[list[str]]:
  """The sets to train in one stack: those of equal size (a class-balanced set of every
  class has ipc images per seen class), at most `evaluate.stack_students` (0: no cap)."""
  by_size = {}
  for name in names:
    by_size.setdefault(sizes[name], []).append(name)
  return student.split_stacks(by_size.values(), config.evaluate.stack_students)


# ----------------------------------------------------------------------------- outputs


def write_plot(path: str, classes_seen: list[int], accuracies: dict, title: str) -> None:
  """Top-1 (%) on the seen classes vs number of classes seen, one line per set (Agg)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.5, 3.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, accs in accuracies.items():
    ax.plot(classes_seen, 100 * np.asarray(accs), marker='o', label=name)
  ax.set_xlabel('classes seen')
  ax.set_ylabel('top-1 on the seen classes (%)')
  ax.set_xticks(classes_seen)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with files.open_file(path, 'wb') as f:  # local or gs://
    fig.savefig(f, format='png', dpi=120)


def set_names(config) -> list[str]:
  names = [s.strip() for s in config.continual.sets if s.strip()]
  unknown = sorted(set(names) - set(SETS))
  if unknown or not names:
    raise ValueError(f'continual.sets={config.continual.sets!r} has unknown or no sets '
                     f'{unknown}; valid: {", ".join(SETS)}.')
  return list(dict.fromkeys(names))


def validate(config, ctx: context.Context) -> None:
  """Clear errors for settings the stage cannot run, before any work is done."""
  cfg, spec, mesh = config.continual, ctx.spec, ctx.mesh
  set_names(config)
  step_classes(class_order(config, spec.num_classes), cfg.steps)
  if cfg.epochs_per_step <= 0:
    raise ValueError(f'continual.epochs_per_step={cfg.epochs_per_step} must be positive.')
  if config.evaluate.temperature <= 0:
    raise ValueError(f'evaluate.temperature={config.evaluate.temperature} must be positive.')
  if config.evaluate.loss != 'kl':
    raise ValueError(f'evaluate.loss={config.evaluate.loss!r}: continual restricts the '
                     "teacher's soft labels to the classes seen so far (loss 'kl' only); set "
                     "evaluate.loss=kl for the continual stage.")
  if config.evaluate.ema_decay:
    raise ValueError(f'evaluate.ema_decay={config.evaluate.ema_decay}: continual trains and '
                     'carries over the parameters themselves, not a moving average; set '
                     'evaluate.ema_decay=0 for the continual stage.')
  if not spec.in_memory:
    raise ValueError(f'continual needs a dataset held in memory; {spec.name} is streamed.')
  models.check_buildable(config_lib.student_model(config), spec.num_classes, spec.image_shape,
                         'The student')
  views.validate(config.relabel)
  batching.check_batch_size(config.student.batch_size, mesh,
                            'student.batch_size (continual student batch)')
  batching.check_batch_size(config.evaluate.eval_batch_size, mesh, 'evaluate.eval_batch_size')
  config_lib.validate_numbers(config, ('continual', 'evaluate', 'relabel', 'student'))


def _empty_record() -> dict:
  return {'test_top1': [], 'train_images': [], 'test_images': [], 'iterations': [],
          'loss': [], 'seconds': []}


def load_sets(config, workdir: str, names: list[str], spec) -> dict:
  """{set: (images, labels)} of `names` (names the missing stage if there is none); every
  class of the dataset must be in each."""
  sets = {}
  for name in names:
    sets[name] = (image_sets.checked_distilled_set(config, workdir) if name == 'distilled'
                  else image_sets.random_subset(config, config.recover.ipc))
  for name, (_, labels) in sets.items():
    absent = sorted(set(range(spec.num_classes)) - set(np.unique(labels).tolist()))
    if absent:
      raise ValueError(f'The {name} set has no images of classes {absent[:20]}; continual '
                       f'needs every class of {spec.name}.')
  return sets


def check_folders(config, stage_dir: str, sets: dict, order: list[int],
                  teacher_key: dict) -> None:
  """Every set's folder checked against its fingerprint and teacher before any is claimed."""
  for write in (False, True):
    for name, (images, _) in sets.items():
      checkpoint.check_fingerprint(os.path.join(stage_dir, name),
                                   fingerprints.record(
                                       'continual', config, set=name, class_order=order,
                                       images_sha256=label_store.images_digest(images)),
                                   write=write)
      # The teacher whose soft labels the students learnt (kept apart from the fingerprint,
      # which continual folders written before teacher digests hold without it).
      checkpoint.check_fingerprint(os.path.join(stage_dir, name), teacher_key, write=write,
                                   name=teacher_store.KEY_FILE)


@dataclasses.dataclass(eq=False)
class Students:
  """What the sets' students share across class steps (model, optimiser and compiled steps,
  one each) and each set's own: checkpoints, finished-step record, variables, writer."""
  step_fn: Callable
  eval_fn: Callable
  fresh_state: Callable  # variables -> a TrainState with a fresh optimiser
  stack_states: Callable
  managers: dict
  records: dict
  variables: dict
  writers: dict


def create_students(config, stage_dir: str, names: list[str], spec, mesh,
                    teacher_model) -> Students:
  """The students of `names`, each resumed after its last finished class step."""
  model = models.create_model(config_lib.student_model(config), spec.num_classes)
  tx = create_optimizer(config)  # one, re-initialised at every class step
  replicated = batching.replicated(mesh)
  initial = train_lib.create_train_state(model, tx, spec.image_shape,
                                         rngs.key(config.seed), mesh)
  template = {'params': initial.params, 'batch_stats': initial.batch_stats}
  # The copy keeps the step's buffer donation from consuming `variables` (jit forwards
  # unchanged inputs to its outputs).
  fresh_state = jax.jit(
      lambda v: train_lib.TrainState.create(
          apply_fn=model.apply, tx=tx, params=jax.tree_util.tree_map(jnp.copy, v['params']),
          batch_stats=jax.tree_util.tree_map(jnp.copy, v['batch_stats'])),
      out_shardings=replicated)
  students = Students(
      student.create_continual_step(config, spec, teacher_model, mesh),
      student.create_eval_step(model, spec, mesh, student.stack_mode(config)), fresh_state,
      jax.jit(student.stack, out_shardings=replicated), {}, {}, {}, {})
  for name in names:
    resume(students, stage_dir, name, train_lib.with_sharding(template, replicated), template)
    # One writer (TensorBoard run, metrics.jsonl) per set; steps count every iteration of
    # every class step so far.
    students.writers[name] = train_lib.create_writer(os.path.join(stage_dir, name))
    students.writers[name].write_hparams(
        metric_writers.hparams(config, **{'continual.set': name}), metrics=('test_top1',))
  return students


def resume(students: Students, stage_dir: str, name: str, abstract, template) -> None:
  """Set `name` continues after its last finished class step (`template`: none yet)."""
  manager = students.managers[name] = checkpoint.create_manager(
      os.path.join(stage_dir, name, 'checkpoints'))
  path = os.path.join(stage_dir, name, 'steps.json')
  record = students.records[name] = files.read_json(path) if files.exists(path) else (
      _empty_record())
  done = len(record['test_top1'])
  for extra in [s for s in manager.all_steps() if s > done]:
    manager.delete(extra)  # saved, but killed before steps.json recorded it
  if not done:
    students.variables[name] = template
    return
  if done not in manager.all_steps():
    raise checkpoint.ConfigMismatchError(
        f'{path} records {done} finished steps but their checkpoint is missing; remove '
        f'{os.path.join(stage_dir, name)} to start this set again.')
  students.variables[name] = manager.restore(done, args=ocp.args.StandardRestore(abstract))
  logging.info('continual: %s resumed after step %d', name, done)


@dataclasses.dataclass(frozen=True)
class ClassStep:
  """Class step `index` (0-based) of `total`: the classes seen so far, their mask (bool
  (C,)), the real test images of those classes."""
  index: int
  total: int
  seen: list[int]
  mask: np.ndarray
  test: pipeline.InMemorySplit


def train_stack(config, students: Students, stack: list[str], subsets: dict, k: ClassStep,
                teacher, mesh, stage_dir: str) -> None:
  """Class step `k` of the sets `stack` (`subsets`: their images of the seen classes, of
  one size) trained together from their last variables, evaluated, saved and recorded."""
  step_start = time.time()
  count = len(subsets[stack[0]][0])
  schedule = step_schedule(config, count, k.index, mesh.size)
  states = students.stack_states([students.fresh_state(students.variables[name])
                                  for name in stack])
  offset = sum(students.records[stack[0]]['iterations'])
  writers = metric_writers.StudentWriters([students.writers[n] for n in stack],
                                          step_offset=offset)
  states, losses = train_class_step(
      config, students.step_fn, states, [subsets[n] for n in stack], k.mask, schedule,
      teacher, mesh, f'{", ".join(stack)} step {k.index + 1}/{k.total}', writers)
  tops = student.top1(
      students.eval_fn, {'params': states.params, 'batch_stats': states.batch_stats}, k.test,
      config.evaluate.eval_batch_size, mesh, class_mask=k.mask)
  for i, name in enumerate(stack):
    state = student.unstack(states, i)
    variables = students.variables[name] = {'params': state.params,
                                            'batch_stats': state.batch_stats}
    if not train_lib.all_finite(variables):  # never saved: the last good step stays
      raise train_lib.DivergedError(
          f'continual {name} step {k.index + 1} diverged (a parameter stopped being finite). '
          f'Lower evaluate.lr (now {config.evaluate.lr}) and re-run with a new --workdir.')
    students.managers[name].save(k.index + 1, args=ocp.args.StandardSave(variables))
  for i, name in enumerate(stack):
    students.managers[name].wait_until_finished()
    top1 = float(tops[i])
    record = students.records[name]
    for key, value in (('test_top1', top1), ('train_images', count),
                       ('test_images', k.test.num_examples),
                       ('iterations', schedule.total_steps), ('loss', losses[i]),
                       ('seconds', time.time() - step_start)):
      record[key].append(value)
    files.write_json(os.path.join(stage_dir, name, 'steps.json'), record)
    students.writers[name].write_scalars(offset + schedule.total_steps,
                                         {'test_top1': top1, 'classes_seen': len(k.seen)})
    logging.info('continual: %s step %d/%d, %d classes, %d images: top-1 %.4f', name,
                 k.index + 1, k.total, len(k.seen), count, top1)


def write_outputs(config, workdir: str, records: dict, order, groups, spec,
                  resumed_from: dict, start_time: float) -> dict:
  """The accuracy plot, result.json and the workdir's report; returns the result."""
  stage_dir = os.path.join(workdir, 'continual')
  classes_seen = [len(seen_classes(groups, k)) for k in range(len(groups))]
  plot = files.absolute(os.path.join(stage_dir, 'accuracy.png'))
  if jax.process_index() == 0:
    write_plot(plot, classes_seen, {n: r['test_top1'] for n, r in records.items()},
               f'{spec.name}, IPC {config.recover.ipc}: {len(groups)} class-incremental steps')
  result = {'stage': 'continual', 'dataset': spec.name, 'ipc': config.recover.ipc,
            'student': config_lib.student_model(config).to_dict(), 'temperature': config.evaluate.temperature,
            'steps': config.continual.steps, 'epochs_per_step': config.continual.epochs_per_step,
            'class_order': order, 'step_classes': groups, 'classes_seen': classes_seen,
            'protocol': 'student carried over between steps (params, batch_stats); fresh '
                        'optimiser and cosine schedule per step; soft labels and predictions '
                        'restricted to the seen classes',
            'test_top1_unit': 'fraction', 'sets': records, 'resumed_from_step': min(
                resumed_from.values()), 'resumed_from_step_per_set': resumed_from,
            'plot': plot, 'wall_seconds': time.time() - start_time}
  result = checkpoint.write_result(stage_dir, result)
  report.write(config, workdir)
  return result


# ----------------------------------------------------------------------------- run


def finished(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """continual/result.json if it covers every set of `continual.sets`, else None. (`run`
  first checks each set's folder against `config`, its images and the teacher.)"""
  old = checkpoint.finished_result(os.path.join(workdir, 'continual'))
  if old is None or sorted(old['sets']) != sorted(set_names(config)):
    return None
  return old


def run(config: ml_collections.ConfigDict, workdir: str, ctx: context.Context) -> dict:
  """Class-incremental students for every set in `continual.sets`; writes
  `workdir/continual/` (result.json, accuracy.png) and the workdir's report."""
  start_time = time.time()
  spec, mesh = ctx.spec, ctx.mesh
  validate(config, ctx)
  order = class_order(config, spec.num_classes)
  groups = step_classes(order, config.continual.steps)
  names = set_names(config)
  stage_dir = os.path.join(workdir, 'continual')

  sets = load_sets(config, workdir, names, spec)
  teacher_model, teacher = teacher_lib.load(config, workdir, mesh)
  teacher_key = {'teacher_sha256': teacher_lib.digest(config, workdir, mesh)}
  test = pipeline.load_split(config.dataset, 'test')
  check_folders(config, stage_dir, sets, order, teacher_key)
  done = finished(workdir, config)
  if done is not None:
    logging.info('continual: finished already (%s); nothing to do.', done.get('measured_at'))
    return done

  students = create_students(config, stage_dir, names, spec, mesh, teacher_model)
  records = students.records
  resumed_from = {name: len(records[name]['test_top1']) for name in names}
  # Class steps; the sets that still need a step train together (one stacked step).
  for k in range(config.continual.steps):
    seen = seen_classes(groups, k)
    class_step = ClassStep(k, config.continual.steps, seen, class_mask(seen, spec.num_classes),
                           pipeline.InMemorySplit(*seen_subset(*test.arrays(), seen)))
    todo = [name for name in names if len(records[name]['test_top1']) <= k]
    subsets = {name: seen_subset(*sets[name], seen) for name in todo}
    for stack in together(config, todo, {n: len(subsets[n][0]) for n in todo}):
      train_stack(config, students, stack, subsets, class_step, teacher, mesh, stage_dir)
    files.write_json(os.path.join(stage_dir, PROGRESS), {'finished_steps': k + 1})
  for writer in students.writers.values():
    writer.close()
  for manager in students.managers.values():
    manager.close()
  return write_outputs(config, workdir, records, order, groups, spec, resumed_from,
                       start_time)
