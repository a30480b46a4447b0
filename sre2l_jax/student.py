"""Students: fresh networks trained on an image set with the teacher's soft labels.

Every student sees the views of `views.Schedule` and learns from the teacher's soft labels
by KL divergence at temperature T (computed online, or read from `label_store`), or from its
logits by EDC's MSE + cross-entropy (`evaluate.loss`, see `update`), or from hard (mixed
one-hot) labels. Evaluate trains one per seed and variant; continual trains one
class step after another with the labels restricted to the classes seen so far.

Students train stacked: a `TrainState` whose leaves carry a leading student axis, updated by
one compiled step (`create_student_step`, `create_continual_step`) in which the views of a
batch, and the teacher's labels on them, are computed once per image set and shared by its
students, whose updates follow one another in the program or are vmapped (`over_stack`,
`evaluate.stack_mode`: by default vmapped on GPU/TPU only). A single student is a stack of
one. Metrics come back with a leading student axis (`metric_writers.StudentWriters`).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sre2l_jax import label_store
from sre2l_jax import train_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

TARGETS = ('online', 'stored', 'hard')


def kl_divergence(student_logits, targets, temperature: float):
  """KL(targets || softmax(student / T)), summed over classes, mean over the batch
  (PyTorch's KLDivLoss(reduction='batchmean'), as the reference)."""
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p = jnp.log(jnp.clip(targets, 1e-12, 1.0))
  return jnp.mean(jnp.sum(jnp.where(targets > 0, targets * (log_p - log_q), 0.0), axis=-1))


def soft_targets(teacher, batch_views, *, teacher_model, temperature: float,
                 class_mask=None):
  """The teacher's soft labels (B, C) on `batch_views` at `temperature`, restricted to
  `class_mask` (None: all classes)."""
  logits = label_store.teacher_logits(teacher, batch_views, model=teacher_model)
  return jax.nn.softmax(train_lib.mask_logits(logits, class_mask) / temperature, axis=-1)


LOSSES = ('kl', 'mse_ce')


@dataclasses.dataclass(frozen=True)
class Lesson:
  """What a student learns from, fixed for a compiled step: the views (`views.batch_views`
  of `cfg`, config.relabel, on `spec`'s images), the labels (target: 'online', the teacher
  `teacher_model` run here; 'stored'; 'hard', mixed one-hot labels) at `temperature`, and
  the loss ('kl' or EDC's 'mse_ce' with `ce_weight`, see `update`)."""
  cfg: Any
  spec: Any
  teacher_model: Any
  temperature: float
  target: str
  loss: str = 'kl'
  ce_weight: float = 0.0


def create_lesson(config, spec, teacher_model, target: str) -> Lesson:
  """The `Lesson` of `config`'s students (relabel's views, evaluate's temperature and loss)."""
  return Lesson(config.relabel, spec, teacher_model, config.evaluate.temperature, target,
                **loss_settings(config))


def set_targets(key, images, labels, stored, teacher, lesson: Lesson, class_mask=None):
  """The views of one batch of one image set and their targets.

  images: (B, H, W, C) uint8; labels: (B,) int; stored: this batch's stored arrays (target
  'stored') or None. Returns (views (B, H, W, C) float32, targets): (B, C) float32 (soft
  labels at the lesson's temperature, or mixed one-hot labels for target 'hard'), or with
  loss 'mse_ce' and soft targets {'logits': the teacher's logits (B, C), 'labels': mixed
  one-hot labels (B, C)}.
  """
  spec, target = lesson.spec, lesson.target
  x, lam, partner = views.batch_views(key, images, cfg=lesson.cfg, spec=spec)
  onehot = jax.nn.one_hot(labels, spec.num_classes)
  mixed = lam * onehot + (1 - lam) * onehot[partner]  # the views' labels after CutMix/MixUp
  if target == 'hard':
    return x, mixed
  if lesson.loss == 'mse_ce':
    if target == 'online':
      logits = label_store.teacher_logits(teacher, x, model=lesson.teacher_model)
    else:
      logits = label_store.logits_from_stored(stored)
    return x, {'logits': logits, 'labels': mixed}
  if target == 'online':
    return x, soft_targets(teacher, x, teacher_model=lesson.teacher_model,
                          temperature=lesson.temperature, class_mask=class_mask)
  return x, label_store.targets_from_stored(stored, spec.num_classes, lesson.temperature)


def update(state, x, targets, lesson: Lesson, class_mask=None):
  """One optimiser step of one student on views `x` (B, H, W, C) and `targets`
  (`set_targets`): cross-entropy to the mixed one-hot labels for target 'hard'; else with
  loss 'kl' KL divergence to the soft labels at the temperature (SRe2L), with loss 'mse_ce'
  EDC's: mean squared error between the student's and the teacher's logits plus ce_weight
  x cross-entropy to the mixed one-hot labels. Returns (state, {'loss': ()})."""

  def loss_fn(params):
    logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                     x, train=True, mutable=['batch_stats'])
    logits = train_lib.mask_logits(logits, class_mask)
    if lesson.target == 'hard':
      value = optax.softmax_cross_entropy(logits, targets).mean()
    elif lesson.loss == 'mse_ce':
      value = (jnp.mean(jnp.square(logits - targets['logits'])) + lesson.ce_weight *
               optax.softmax_cross_entropy(logits, targets['labels']).mean())
    else:
      value = kl_divergence(logits, targets, lesson.temperature)
    return value, updates.get('batch_stats', {})  # {}: a model without BatchNorm

  (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), {'loss': value}


def student_step(state, images, labels, stored, key, teacher, lesson: Lesson,
                 class_mask=None):
  """One student step on one batch of views.

  stored: this batch's stored arrays (target 'stored') or None. class_mask: None, or bool
  (C,) of the classes the student may learn (continual, target 'online' only): teacher and
  student logits of the others are -inf, so neither the targets nor the gradients involve
  them. Returns (state, metrics).
  """
  if class_mask is not None and lesson.target != 'online':
    raise ValueError(f"class_mask needs target='online', not {lesson.target!r}.")
  x, targets = set_targets(key, images, labels, stored, teacher, lesson, class_mask)
  return update(state, x, targets, lesson, class_mask)


STACK_MODES = ('auto', 'unrolled', 'vmap')


def stack_mode(config) -> str:
  """'unrolled' or 'vmap': how a stacked step runs its students (`evaluate.stack_mode`;
  'auto': vmap on GPU/TPU, where a batched convolution is one kernel, and unrolled on CPU,
  where XLA runs the grouped convolutions vmap makes of them slowly, see
  `stacked_student_step`)."""
  mode = config.evaluate.stack_mode
  if mode not in STACK_MODES:
    raise ValueError(f'evaluate.stack_mode={mode!r}; valid: {", ".join(STACK_MODES)}.')
  if mode == 'auto':
    return 'unrolled' if jax.default_backend() == 'cpu' else 'vmap'
  return mode


def over_stack(fn, mode: str, states, inputs=(), index=None):
  """`fn(state, *inputs)` of every student of a stack, outputs stacked on a leading axis.

  states: a pytree whose leaves have a leading axis M (one student each). inputs: pytrees
  whose leaves have a leading axis; student i reads entry `index[i]` of each (index: a
  static tuple of M ints, e.g. the image set of each student; None: entry i). What the
  students share, `fn` holds. mode 'unrolled' writes `fn` out once per student in the
  program (M copies, compiled once), 'vmap' vmaps it over the students (every convolution
  becomes one grouped convolution of the M students), see `stacked_student_step`. A single
  student is a stack of one.
  """
  if mode == 'vmap':
    if index is not None:
      gather = jnp.asarray(index)
      inputs = jax.tree_util.tree_map(lambda t: t[gather], inputs)
    return jax.vmap(fn)(states, *inputs)
  count = jax.tree_util.tree_leaves(states)[0].shape[0]
  index = range(count) if index is None else index
  return stack([fn(unstack(states, i), *(unstack(t, s) for t in inputs))
                for i, s in enumerate(index)])


def stacked_student_step(states, images, labels, stored, key, teacher, *, lesson: Lesson,
                         set_index, mode: str = 'unrolled'):
  """One step of M students stacked on a leading axis, trained on S image sets at once.

  states: a `TrainState` whose leaves have a leading axis M (one student each). images:
  (S, B, H, W, C) uint8, labels (S, B), stored: dict of (S, B, ...) or None: batch b of every
  set (the sets share a schedule, so the same positions). set_index: static tuple of M ints,
  the set each student trains on. The views of a set (they depend on `key`, not on the
  student) and the teacher's targets on them are computed once, for all S sets in one batch,
  and shared by every student of that set; each student's forward, backward and update is
  `update`, unrolled or vmapped over the students (`over_stack`). Measured on a 2-core CPU,
  6 ConvNet-BN students (width 64, batch 50 at 28x28) in one step take 505 ms unrolled
  against 6 x 100 ms one by one; vmapped, 1,913 ms, and `jax.lax.map` (a loop in the
  program) 12.7 s. Per student the result equals `student_step` up to float rounding.
  Returns (states, {'loss': (M,)}).
  """
  x, targets = jax.vmap(
      lambda im, lb, st: set_targets(key, im, lb, st, teacher, lesson))(images, labels, stored)
  return over_stack(functools.partial(update, lesson=lesson), mode, states, (x, targets),
                    index=set_index)


def loss_settings(config) -> dict:
  """The students' loss from `config.evaluate` (`update`'s loss and ce_weight)."""
  loss = config.evaluate.loss
  if loss not in LOSSES:
    raise ValueError(f'evaluate.loss={loss!r}; valid: {", ".join(LOSSES)}.')
  return {'loss': loss, 'ce_weight': float(config.evaluate.ce_weight)}


def stacked_sharding(mesh):
  """Stacked batches (S, B, ...): the set axis whole on every device, rows on 'data'."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))


def create_student_step(config, spec, teacher_model, mesh, target: str,
                        set_index: tuple[int, ...] = (0,)):
  """Jitted `stacked_student_step`: (states, images, labels, stored, key, teacher) ->
  (states, metrics). The stacked states are replicated (every device holds every student:
  the data axis splits each batch as for one student) and donated; the stacked batches are
  sharded on their rows (`stacked_sharding`)."""
  stacked, replicated = stacked_sharding(mesh), batching.replicated(mesh)
  return jax.jit(
      functools.partial(stacked_student_step,
                        lesson=create_lesson(config, spec, teacher_model, target),
                        set_index=tuple(int(i) for i in set_index), mode=stack_mode(config)),
      in_shardings=(replicated, stacked, stacked, stacked, replicated, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)


def split_stacks(groups, cap: int) -> list[list]:
  """Every group (a list of students that can share a stacked step) cut into stacks of at
  most `cap` members (0: no cap), groups in order."""
  out = []
  for members in groups:
    size = cap if cap > 0 else len(members)
    out += [members[i:i + size] for i in range(0, len(members), size)]
  return out


def stack(trees):
  """A list of M pytrees of equal structure -> one pytree with a leading axis M."""
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)


def unstack(tree, index: int):
  """Member `index` of a stacked pytree."""
  return jax.tree_util.tree_map(lambda x: x[index], tree)


def create_eval_step(model, spec, mesh, mode: str = 'unrolled'):
  """Jitted (stacked variables, batch, class_mask=None) -> (correct (M,), count ()): M
  students at once on one batch of normalised, un-augmented images, predicting among the
  classes of `class_mask` (None: all), unrolled or vmapped (`over_stack`)."""
  def eval_step(variables, batch, class_mask=None):
    x = datasets.normalise(batch['image'], spec)
    logits = over_stack(lambda v: model.apply(v, x, train=False), mode, variables)  # (M, B, C)
    correct = jnp.argmax(train_lib.mask_logits(logits, class_mask), -1) == batch['label']
    return (correct * batch['mask']).sum(-1), batch['mask'].sum()
  replicated = batching.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, batching.data_sharding(mesh),
                                          replicated))


def top1(eval_step, variables, split, batch_size: int, mesh, class_mask=None) -> np.ndarray:
  """Top-1 (fractions, (M,) float64) of M stacked students on a whole split."""
  correct, count = 0.0, 0.0
  for batch in split.eval_batches(batch_size, batching.data_sharding(mesh)):
    c, n = eval_step(variables, batch, class_mask)
    correct, count = correct + c, count + n
  return np.asarray(jax.device_get(correct), np.float64) / max(float(count), 1.0)


def continual_step(state, images, labels, key, teacher, mask, learning_rate, *,
                   lesson: Lesson):
  """`student_step` (a lesson of online soft labels) restricted to the classes in `mask`
  (bool (C,)) at `learning_rate` () (an `optax.inject_hyperparams` optimiser). Returns
  (state, metrics)."""
  hyperparams = dict(state.opt_state.hyperparams, learning_rate=learning_rate)
  state = state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))
  return student_step(state, images, labels, None, key, teacher, lesson, class_mask=mask)


def continual_lesson(config, spec, teacher_model) -> Lesson:
  """Continual's `Lesson`: online soft labels at evaluate's temperature, loss 'kl'."""
  return Lesson(config.relabel, spec, teacher_model, config.evaluate.temperature, 'online')


def create_continual_step(config, spec, teacher_model, mesh):
  """Jitted `continual_step` of S students stacked on a leading axis, each on its own set:
  (states, images (S, B, H, W, C), labels (S, B), key, teacher, mask, lr) -> (states,
  {'loss': (S,)}). The views' key, mask and lr are shared (the sets share the schedule);
  each student's step, teacher forward included, is its own (`over_stack`)."""
  stacked, replicated = stacked_sharding(mesh), batching.replicated(mesh)
  one = functools.partial(continual_step, lesson=continual_lesson(config, spec, teacher_model))
  mode = stack_mode(config)

  def fn(states, images, labels, key, teacher, mask, learning_rate):
    return over_stack(
        lambda state, im, lb: one(state, im, lb, key, teacher, mask, learning_rate), mode,
        states, (images, labels))
  return jax.jit(fn, in_shardings=(replicated, stacked, stacked, replicated, replicated,
                                   replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def batch_fn(schedule: views.Schedule, sets, mesh, stored=None):
  """step (1-based) -> (images (S, B, ...), labels (S, B), stored arrays (S, B, ...) or
  None, view key) of that step's batch of S image sets of equal size sharing `schedule`,
  on the mesh (`stacked_sharding`).

  sets: [(images, labels)] per set; stored: None, or a `label_store.StoredLabels` per set."""
  sharding = stacked_sharding(mesh)

  def get(step):
    epoch, b = schedule.position(step - 1)
    index = schedule.batch_indices(epoch, b)
    batch_stored = None
    if stored is not None:
      per_set = [s.epoch(epoch) for s in stored]
      batch_stored = {k: jax.device_put(np.stack([p[k][b] for p in per_set]), sharding)
                      for k in per_set[0]}
    return (jax.device_put(np.stack([images[index] for images, _ in sets]), sharding),
            jax.device_put(np.stack([labels[index] for _, labels in sets]), sharding),
            batch_stored, schedule.view_key(epoch, b))
  return get
