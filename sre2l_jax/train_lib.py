"""Pieces shared by the stages that train a network (squeeze and evaluate)."""

import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from sre2l_jax.data import augment
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline


class TrainState(train_state.TrainState):
  batch_stats: Any


def warmup_cosine(lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to 0 at `total_steps`."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1), 0.0)


def decay_mask(params):
  """True for weights that get weight decay: kernels, not biases or BatchNorm parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule):
  """SGD with momentum (teacher, like the reference) or AdamW (students)."""
  if cfg.optimizer == 'sgd':
    # Coupled (PyTorch-style) weight decay; on kernels only unless decay_all is set (the
    # reference's SGD decays every parameter, BatchNorm scales included).
    mask = None if cfg.get('decay_all', False) else decay_mask
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                       optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
  if cfg.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)
  raise ValueError(f'Unknown optimizer {cfg.optimizer!r}; valid: sgd, adamw.')


def create_train_state(model, tx, image_shape, rng, mesh) -> TrainState:
  """Initialises parameters directly replicated on the mesh."""
  def init(rng):
    variables = model.init(rng, jnp.zeros((1,) + tuple(image_shape)), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables['batch_stats'])
  return jax.jit(init, out_shardings=pipeline.replicated(mesh))(rng)


def augment_batch(rng, images, spec: datasets.DatasetSpec):
  """uint8 batch -> normalised, augmented float batch; one key per image."""
  x = datasets.normalise(images, spec)
  keys = jax.random.split(rng, x.shape[0])
  return jax.vmap(lambda k, im: augment.train_augment(k, im, spec.train_augment, spec.pad))(
      keys, x)


def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def classification_step(state: TrainState, batch, rng, *, spec, label_smoothing: float):
  """One SGD step on real labelled data: (state, batch, rng) -> (state, metrics)."""
  images = augment_batch(rng, batch['image'], spec)

  def loss_fn(params):
    logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                     images, train=True, mutable=['batch_stats'])
    loss = cross_entropy(logits, batch['label'], spec.num_classes, label_smoothing)
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return state, {'loss': loss, 'accuracy': accuracy}


def make_eval_step(model, spec, mesh):
  """Jitted (variables, batch) -> (correct, count) on normalised, un-augmented images."""
  def eval_step(variables, batch):
    logits = model.apply(variables, datasets.normalise(batch['image'], spec), train=False)
    correct = (jnp.argmax(logits, -1) == batch['label']) * batch['mask']
    return correct.sum(), batch['mask'].sum()
  return jax.jit(eval_step, in_shardings=(pipeline.replicated(mesh),
                                          pipeline.data_sharding(mesh)))


def top1(eval_step, variables, split, batch_size: int, mesh) -> float:
  """Top-1 accuracy (fraction in [0, 1]) of `variables` on a whole split."""
  correct, count = 0.0, 0.0
  for batch in split.eval_batches(batch_size, pipeline.data_sharding(mesh)):
    c, n = eval_step(variables, batch)
    correct, count = correct + c, count + n
  return float(correct) / max(float(count), 1.0)


def create_writer(logdir: str):
  """clu TensorBoard + logging writer on process 0, logging only elsewhere."""
  # Imported here: clu's writers import TensorFlow, which only the stages need.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0,
                                              asynchronous=True)


def create_progress(total_steps: int, writer, every_steps: int):
  """clu progress reporter: steps/s and ETA in the log and in TensorBoard."""
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                         every_steps=every_steps)


class Throughput:
  """Counts examples per second of wall time, excluding the first (compiling) call."""

  def __init__(self):
    self.start, self.examples = None, 0

  def tick(self, examples: int):
    if self.start is None:
      self.start = time.perf_counter()
    else:
      self.examples += examples

  def rate(self) -> float:
    if self.start is None or self.examples == 0:
      return 0.0
    return self.examples / (time.perf_counter() - self.start)


def mean_metrics(history: list[dict]) -> dict:
  """Averages a list of per-step device metric dicts on the host (one transfer)."""
  if not history:
    return {}
  stacked = jax.device_get(jax.tree_util.tree_map(lambda *x: jnp.stack(x), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}
