"""Evaluate: fresh students trained on the distilled set, and the same-protocol baselines.

Every student sees the views of `relabel.Schedule` (same crops, flips and mixing for the
distilled set and for the random real subset) and learns from the teacher's soft labels by
KL divergence at temperature T (online or stored), or from hard labels (the DD-Ranking
hard-label variant). Students differ by their initialisation seed. Top-1 is measured on the
real test split.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import models
from sre2l_jax import relabel
from sre2l_jax import report
from sre2l_jax import squeeze
from sre2l_jax import train_lib
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline


def kl_divergence(student_logits, targets, temperature: float):
  """KL(targets || softmax(student / T)), summed over classes, mean over the batch
  (PyTorch's KLDivLoss(reduction='batchmean'), as the reference)."""
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p = jnp.log(jnp.clip(targets, 1e-12, 1.0))
  return jnp.mean(jnp.sum(jnp.where(targets > 0, targets * (log_p - log_q), 0.0), axis=-1))


def mask_logits(logits, class_mask):
  """Logits (..., C) with the classes outside `class_mask` (bool (C,)) set to -inf, so a
  softmax gives them exactly zero probability; `class_mask=None` keeps every class."""
  return logits if class_mask is None else jnp.where(class_mask, logits, -jnp.inf)


def soft_targets(teacher, views, *, teacher_model, temperature: float, class_mask=None):
  """The teacher's soft labels (B, C) on `views` at `temperature`, restricted to
  `class_mask` (None: all classes)."""
  logits = relabel.teacher_logits(teacher, views, model=teacher_model)
  return jax.nn.softmax(mask_logits(logits, class_mask) / temperature, axis=-1)


def student_step(state, images, labels, stored, key, teacher, *, cfg, spec, teacher_model,
                 temperature: float, target: str, class_mask=None):
  """One student step on one batch of views.

  target: 'online' (teacher logits computed here), 'stored' (`stored` holds this batch's
  stored arrays) or 'hard' (mixed one-hot labels). class_mask: None, or bool (C,) of the
  classes the student may learn (continual, target 'online' only): teacher and student
  logits of the others are -inf, so neither the targets nor the gradients involve them.
  Returns (state, metrics).
  """
  if class_mask is not None and target != 'online':
    raise ValueError(f"class_mask needs target='online', not {target!r}.")
  views, lam, partner = relabel.make_views(key, images, cfg=cfg, spec=spec)
  if target == 'online':
    targets = soft_targets(teacher, views, teacher_model=teacher_model,
                           temperature=temperature, class_mask=class_mask)
  elif target == 'stored':
    targets = relabel.targets_from_stored(stored, spec.num_classes, temperature)
  else:
    onehot = jax.nn.one_hot(labels, spec.num_classes)
    targets = lam * onehot + (1 - lam) * onehot[partner]

  def loss_fn(params):
    logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                     views, train=True, mutable=['batch_stats'])
    logits = mask_logits(logits, class_mask)
    if target == 'hard':
      loss = optax.softmax_cross_entropy(logits, targets).mean()
    else:
      loss = kl_divergence(logits, targets, temperature)
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), {'loss': loss}


def variants(config) -> list[tuple[str, str, bool]]:
  """(name, image set, hard labels) of every student family to train."""
  baselines = [b for b in config.evaluate.baselines.split(',') if b]
  unknown = set(baselines) - {'random', 'hard_label'}
  if unknown:
    raise ValueError(f'evaluate.baselines has {sorted(unknown)}; valid: random, hard_label.')
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
    return checkpoint.read_json(result_path)
  schedule = relabel.make_schedule(config, len(images))
  pipeline.check_batch_size(schedule.batch_size, mesh, 'relabel.batch_size (student batch)')
  mode = 'hard' if hard else config.relabel.mode
  stored = None
  if mode == 'stored':
    stored = relabel.StoredLabels.open(relabel.label_dir(workdir, name), images, schedule,
                                       config.evaluate.temperature,
                                       relabel.view_settings(config.relabel))

  model = models.create_model(config.student, spec.num_classes)
  total = schedule.total_steps
  tx = train_lib.create_optimizer(config.evaluate,
                                  train_lib.warmup_cosine(config.evaluate.lr, total))
  state = train_lib.create_train_state(model, tx, spec.image_shape,
                                       jax.random.PRNGKey(seed), mesh)
  every = max(1, config.evaluate.checkpoint_every_epochs) * schedule.steps_per_epoch
  manager = checkpoint.create_manager(os.path.join(student_dir, 'checkpoints'))
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
    logging.info('evaluate: %s seed %d resumed from step %d', name, seed, start)

  sharded, replicated = pipeline.data_sharding(mesh), pipeline.replicated(mesh)
  step_fn = jax.jit(
      functools.partial(student_step, cfg=config.relabel, spec=spec,
                        teacher_model=teacher_model, temperature=config.evaluate.temperature,
                        target=mode),
      in_shardings=(replicated, sharded, sharded, sharded, replicated, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  teacher_arg = teacher if mode == 'online' else None
  start_time = time.time()
  history = []
  for step in range(start, total):
    epoch, b = divmod(step, schedule.steps_per_epoch)
    index = schedule.batch_indices(epoch, b)
    batch_stored = None
    if stored is not None:
      batch_stored = {k: jax.device_put(v[b], sharded) for k, v in stored.epoch(epoch).items()}
    state, metrics = step_fn(state, jax.device_put(images[index], sharded),
                             jax.device_put(labels[index], sharded), batch_stored,
                             schedule.view_key(epoch, b), teacher_arg)
    history.append(metrics)
    if (step + 1) % config.evaluate.log_every_steps == 0:
      logging.info('evaluate: %s seed %d step %d/%d loss %.4f', name, seed, step + 1, total,
                   train_lib.mean_metrics(history)['loss'])
      history = []
    if (step + 1) % every == 0 and step + 1 < total:
      manager.save(step + 1, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  top1 = train_lib.top1(eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                        test, config.evaluate.eval_batch_size, mesh)
  result = {'variant': name, 'seed': seed, 'test_top1': top1, 'steps': total,
            'epochs': schedule.epochs, 'batch_size': schedule.batch_size,
            'labels': mode, 'wall_seconds': time.time() - start_time,
            'resumed_from_step': start}
  checkpoint.write_json(result_path, result)
  logging.info('evaluate: %s seed %d test top-1 %.4f', name, seed, top1)
  return result


def validate(config, mesh) -> None:
  relabel.validate(config)
  if config.evaluate.seeds <= 0:
    raise ValueError(f'evaluate.seeds={config.evaluate.seeds} must be positive.')
  if config.evaluate.temperature <= 0:
    raise ValueError(f'evaluate.temperature={config.evaluate.temperature} must be positive.')
  pipeline.check_batch_size(config.evaluate.eval_batch_size, mesh, 'evaluate.eval_batch_size')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `evaluate.seeds` students per variant; writes evaluate/result.json and the
  workdir's report.json / report.md."""
  start_time = time.time()
  spec = datasets.get_spec(config.dataset.name)
  mesh = pipeline.create_mesh(config.mesh_shape)
  validate(config, mesh)
  sets = relabel.image_sets(config, workdir)  # names the missing stage if there is none
  teacher_model, teacher = squeeze.load_teacher(config, workdir, mesh)
  test = pipeline.load_split(config.dataset, 'test')
  # Every student is the same architecture: one compiled evaluation step serves them all.
  eval_step = train_lib.make_eval_step(models.create_model(config.student, spec.num_classes),
                                       spec, mesh)

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
  checkpoint.write_json(os.path.join(workdir, 'evaluate', 'result.json'), result)
  report.write(config, workdir)
  return result
