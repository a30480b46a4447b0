"""Students: fresh networks trained on an image set with the teacher's soft labels.

Every student sees the views of `views.Schedule` and learns from the teacher's soft labels
by KL divergence at temperature T (computed online, or read from `label_store`), or from
hard (mixed one-hot) labels. Evaluate trains one per seed and variant; continual trains one
class step after another with the labels restricted to the classes seen so far.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from sre2l_jax import label_store
from sre2l_jax import train_lib
from sre2l_jax import views
from sre2l_jax.data import batching

TARGETS = ('online', 'stored', 'hard')


def kl_divergence(student_logits, targets, temperature: float):
  """KL(targets || softmax(student / T)), summed over classes, mean over the batch
  (PyTorch's KLDivLoss(reduction='batchmean'), as the reference)."""
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p = jnp.log(jnp.clip(targets, 1e-12, 1.0))
  return jnp.mean(jnp.sum(jnp.where(targets > 0, targets * (log_p - log_q), 0.0), axis=-1))


def teacher_logits(teacher, images, *, model):
  """The frozen teacher's logits (B, C) on normalised images (B, H, W, C)."""
  return model.apply(teacher, images, train=False)


def create_teacher_logits(model, teacher, mesh):
  """Jitted views (B, H, W, C) sharded on 'data' -> the teacher's logits (B, C) replicated
  (what `label_store.write_labels` stores); the teacher is an argument, not a constant."""
  fn = jax.jit(functools.partial(teacher_logits, model=model),
               in_shardings=(batching.replicated(mesh), batching.data_sharding(mesh)),
               out_shardings=batching.replicated(mesh))
  return functools.partial(fn, teacher)


def soft_targets(teacher, batch_views, *, teacher_model, temperature: float,
                 class_mask=None):
  """The teacher's soft labels (B, C) on `batch_views` at `temperature`, restricted to
  `class_mask` (None: all classes)."""
  logits = teacher_logits(teacher, batch_views, model=teacher_model)
  return jax.nn.softmax(train_lib.mask_logits(logits, class_mask) / temperature, axis=-1)


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
  x, lam, partner = views.batch_views(key, images, cfg=cfg, spec=spec)
  if target == 'online':
    targets = soft_targets(teacher, x, teacher_model=teacher_model,
                           temperature=temperature, class_mask=class_mask)
  elif target == 'stored':
    targets = label_store.targets_from_stored(stored, spec.num_classes, temperature)
  else:
    onehot = jax.nn.one_hot(labels, spec.num_classes)
    targets = lam * onehot + (1 - lam) * onehot[partner]

  def loss_fn(params):
    logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                     x, train=True, mutable=['batch_stats'])
    logits = train_lib.mask_logits(logits, class_mask)
    if target == 'hard':
      loss = optax.softmax_cross_entropy(logits, targets).mean()
    else:
      loss = kl_divergence(logits, targets, temperature)
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), {'loss': loss}


def create_student_step(config, spec, teacher_model, mesh, target: str):
  """Jitted `student_step`: (state, images, labels, stored, key, teacher) -> (state,
  metrics), the state donated, the batch sharded on 'data'."""
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(
      functools.partial(student_step, cfg=config.relabel, spec=spec,
                        teacher_model=teacher_model, temperature=config.evaluate.temperature,
                        target=target),
      in_shardings=(replicated, sharded, sharded, sharded, replicated, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)


def continual_step(state, images, labels, key, teacher, mask, learning_rate, *, cfg, spec,
                   teacher_model, temperature: float):
  """`student_step` (online soft labels) restricted to the classes in `mask` (bool (C,)) at
  `learning_rate` () (an `optax.inject_hyperparams` optimiser). Returns (state, metrics)."""
  hyperparams = dict(state.opt_state.hyperparams, learning_rate=learning_rate)
  state = state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))
  return student_step(state, images, labels, None, key, teacher, cfg=cfg, spec=spec,
                      teacher_model=teacher_model, temperature=temperature, target='online',
                      class_mask=mask)


def create_continual_step(config, spec, teacher_model, mesh):
  """Jitted `continual_step`: (state, images, labels, key, teacher, mask, lr)."""
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(
      functools.partial(continual_step, cfg=config.relabel, spec=spec,
                        teacher_model=teacher_model, temperature=config.evaluate.temperature),
      in_shardings=(replicated, sharded, sharded, replicated, replicated, replicated,
                    replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)


def batch_fn(schedule: views.Schedule, images, labels, mesh, stored=None):
  """step (1-based) -> (images, labels, stored arrays or None, view key) of that step's
  batch, on the mesh."""
  sharded = batching.data_sharding(mesh)

  def get(step):
    epoch, b = schedule.position(step - 1)
    index = schedule.batch_indices(epoch, b)
    batch_stored = None
    if stored is not None:
      batch_stored = {k: jax.device_put(v[b], sharded) for k, v in stored.epoch(epoch).items()}
    return (jax.device_put(images[index], sharded), jax.device_put(labels[index], sharded),
            batch_stored, schedule.view_key(epoch, b))
  return get
