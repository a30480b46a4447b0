"""Optimising synthetic images with a synthesis method: layout, state, step, measurement.

Images are laid out in groups (`group_layout`): a group holds images of different classes at
one ipc index (or every class at several), or images of one class, the unit whose BatchNorm
statistics a method matches. The groups are sharded over the mesh's 'data' axis and each
device works through its own (`group_gradients`), so more devices mean more groups at once
without changing the objective. Only the images get gradients (Adam, cosine decay, clipped
to the valid pixel range): nothing is differentiated with respect to the teacher's weights.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.synthesis import diversity


# ----------------------------------------------------------------------------- layout


def group_layout(num_classes: int, ipc: int, group_size: int, num_devices: int,
                 by_class: bool = False):
  """Assigns every synthetic image to a group.

  Group g holds classes [j*B, (j+1)*B) at ipc index i, for g = i * (C/B) + j (B divides C),
  or, B a multiple of C, every class at the B/C ipc indices [g*B/C, (g+1)*B/C); with
  `by_class` (recover.group_by='class') it holds ipc indices [k*B, (k+1)*B) of class c, for
  g = c * (ipc/B) + k. Either way the image of class c at ipc index i has uid i * C + c
  (without `by_class`, the images in uid order: g * B + position). The number of groups is
  padded to a multiple of `num_devices`; padding groups are optimised too (they are
  independent of the real ones) and dropped on export.
  Returns labels (G, B) int32, uids (G, B) int32 (image ids that seed per-image randomness),
  and the number of real groups.
  """
  if by_class:
    chunks = ipc // group_size
    real = num_classes * chunks
    total = math.ceil(real / num_devices) * num_devices
    g = np.arange(total)[:, None]
    p = np.arange(group_size)[None, :]
    labels = ((g // chunks) % num_classes).astype(np.int32)
    uids = ((g % chunks) * group_size + p) * num_classes + labels
    # Padding groups: uids past the real ones (C * ipc), so no real image's randomness repeats.
    uids = np.where(g < real, uids, g * group_size + p).astype(np.int32)
    return np.broadcast_to(labels, uids.shape).copy(), uids, real
  real = ipc * num_classes // group_size
  total = math.ceil(real / num_devices) * num_devices
  uids = (np.arange(total)[:, None] * group_size + np.arange(group_size)[None, :])
  return (uids % num_classes).astype(np.int32), uids.astype(np.int32), real


def to_class_major(images: np.ndarray, num_classes: int, ipc: int,
                   by_class: bool = False) -> np.ndarray:
  """Real groups (G, B, ...) of `group_layout` -> (C, ipc, ...), images[c, i] of class c,
  ipc index i."""
  if by_class:  # groups already run class by class, ipc indices in order
    return images.reshape((num_classes, ipc) + images.shape[2:])
  x = images.reshape((ipc, num_classes) + images.shape[2:])
  return np.swapaxes(x, 0, 1)


# ----------------------------------------------------------------------------- state


def create_optimizer(cfg) -> optax.GradientTransformation:
  """Adam (recover.adam_b1, adam_b2) with cosine decay from recover.lr over the iterations."""
  schedule = optax.cosine_decay_schedule(cfg.lr, cfg.iterations)
  return optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=1e-8)


def pixel_bounds(spec: datasets.DatasetSpec):
  """(low, high) per channel of valid pixels in normalised space, as device arrays."""
  low, high = datasets.pixel_bounds(spec)
  return jnp.asarray(low), jnp.asarray(high)


def create_state(images, tx) -> dict:
  """{'images': (G, B, H, W, C), 'opt_state': Adam's, 'step': ()}."""
  return {'images': images, 'opt_state': tx.init(images), 'step': jnp.int32(0)}


def split_by_group(leaf) -> bool:
  """Whether a leaf of `create_state` is split over the devices by group: the image-shaped
  ones (the images, the optimiser's moments) are, the counters are replicated."""
  return leaf.ndim == 5


def state_shardings(tx, images_shape, mesh):
  """Shardings of `create_state`: `split_by_group` leaves on 'data', the rest replicated."""
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  shapes = jax.eval_shape(lambda x: create_state(x, tx),
                          jax.ShapeDtypeStruct(tuple(images_shape), jnp.float32))
  return jax.tree_util.tree_map(lambda x: sharded if split_by_group(x) else replicated,
                                shapes)


def abstract_state(tx, images_shape, mesh):
  """`create_state`'s shapes with their shardings (an Orbax restore target)."""
  shapes = jax.eval_shape(lambda x: create_state(x, tx),
                          jax.ShapeDtypeStruct(tuple(images_shape), jnp.float32))
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
      state_shardings(tx, images_shape, mesh))


# ----------------------------------------------------------------------------- step


def group_gradients(images, labels, uids, keys, min_scale, teacher, *, method, model, cfg):
  """Each group's gradient of its own loss: (grads like images (G, B, H, W, C), metrics with
  a leading G axis). keys: (G,) one per group.

  `recover.parallel_groups` of them at a time: 1 (default) runs them one after another in a
  loop whose trip count the compiler cannot see, so a group's arithmetic is the same program
  whatever else the device holds: the images do not depend on the round size or the device
  count, to the bit (Adam's first steps amplify last-bit differences on pixels whose gradient
  is near its eps), and one group's activations are alive at a time. 0: all at once
  (vmapped); N: vmapped N at a time (`jax.lax.map`).
  """
  loss_fn = functools.partial(method.group_loss, model=model, teacher=teacher, cfg=cfg)

  def one(x, y, u, k):
    return jax.grad(loss_fn, has_aux=True)(x, y, u, k, min_scale)

  return map_groups(one, (images, labels, uids, keys), uids, cfg.parallel_groups)


def map_groups(one, args: tuple, uids, parallel: int):
  """`one(*group)` of every group of `args` (arrays with a leading G axis), stacked:
  `parallel` 1 one after another in a loop whose trip count the compiler cannot see (a
  group's arithmetic the same program whatever else the device holds, one group's
  activations alive at a time); 0 all at once (vmapped); N vmapped N at a time."""
  groups = args[0].shape[0]
  if parallel == 0 or 1 < parallel >= groups:
    return jax.vmap(one)(*args)
  if parallel > 1:
    return jax.lax.map(lambda a: one(*a), args, batch_size=parallel)

  def take(i):
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                  args)

  def body(i, out):
    return jax.tree_util.tree_map(lambda o, r: jax.lax.dynamic_update_index_in_dim(o, r, i, 0),
                                  out, one(*take(i)))

  shapes = jax.eval_shape(lambda: one(*take(0)))
  out = jax.tree_util.tree_map(lambda s: jnp.zeros((groups,) + s.shape, s.dtype), shapes)
  # = groups, computed from the data: a loop of one iteration would otherwise be inlined and
  # compiled (fused, rounded) differently from a loop of several.
  count = jnp.sum(uids[:, 0] >= 0).astype(jnp.int32)
  return jax.lax.fori_loop(0, count, body, out)


@dataclasses.dataclass(frozen=True)
class Recovery:
  """What a recover step is built from besides its data and the teacher's variables.

  method: a `synthesis.Method` (its `group_loss`, `min_scale_at`); model: the teacher's
  module; cfg: config.recover; tx: the pixels' optimiser; bounds: the pixels' (low, high);
  mesh: the mesh the groups are sharded over ('data'), each device working through its own
  groups (`group_gradients`), or None: one device; num_classes: the recovered classes (the
  uids' stride), read by recover.diversity only.
  """
  method: Any
  model: Any
  cfg: Any
  tx: Any
  bounds: tuple
  mesh: Any = None
  num_classes: int = 0


def local_step(state, labels, uids, rng, teacher, recovery: Recovery):
  """One Adam step on the groups of `state` (all of them, or one device's share): (state,
  metrics averaged over these groups, each with a leading axis of 1)."""
  method, cfg = recovery.method, recovery.cfg
  step = state['step']
  key = jax.random.fold_in(rng, step)
  keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(uids[:, 0])
  grads, metrics = group_gradients(state['images'], labels, uids, keys,
                                   method.min_scale_at(step, cfg), teacher,
                                   method=method, model=recovery.model, cfg=cfg)
  grads = diversity.mask_gradients(grads, uids, step, recovery.num_classes, cfg)
  updates, opt_state = recovery.tx.update(grads, state['opt_state'], state['images'])
  low, high = recovery.bounds
  images = jnp.clip(optax.apply_updates(state['images'], updates), low, high)
  metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0, keepdims=True), metrics)
  metrics['finite'] = jnp.isfinite(images).all().reshape(1)
  return {'images': images, 'opt_state': opt_state, 'step': step + 1}, metrics


def recover_step(state, labels, uids, rng, teacher, recovery: Recovery):
  """One Adam step on all groups: (state, metrics). state: `create_state`'s dict.

  On a mesh each device steps its own groups (`local_step` under `jax.shard_map`): groups
  are independent, so the program has no collective at all, and its metrics keep one row
  per device (averaged where they are read, `train_lib.Loop.per_device`). Besides sparing
  the communication, this keeps XLA's CPU runtime out of a deadlock its in-process
  collectives meet in this program on several CPU devices (docs/performance.md). Without a
  mesh: one row.
  """
  mesh = recovery.mesh
  fn = functools.partial(local_step, recovery=recovery)
  if mesh is not None:
    data, replicated = jax.sharding.PartitionSpec('data'), jax.sharding.PartitionSpec()
    spec = jax.tree_util.tree_map(lambda x: data if split_by_group(x) else replicated, state)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec, data, data, replicated, replicated),
                       out_specs=(spec, data), check_vma=False)
  return fn(state, labels, uids, rng, teacher)


def create_recover_step(recovery: Recovery, state_shardings_):
  """`recover_step` jitted with the stage's shardings (on `recovery.mesh`) and the state
  donated.

  Call as `step(state, labels, uids, rng, teacher)`. The teacher is an argument, not a
  closed-over constant: constants would be embedded in the compiled program (slow to
  compile and duplicated in memory for a ResNet-50).
  """
  mesh = recovery.mesh
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(
      functools.partial(recover_step, recovery=recovery),
      in_shardings=(state_shardings_, sharded, sharded, replicated, replicated),
      out_shardings=(state_shardings_, sharded), donate_argnums=0)


def abstract_step_args(tx, groups: int, group_size: int, image_shape, mesh, teacher, rng):
  """`create_recover_step`'s arguments (state, labels, uids, rng, teacher) for `groups`
  groups as `jax.ShapeDtypeStruct`s with the step's shardings: nothing is allocated.
  teacher, rng: arrays or shapes (e.g. `models.abstract_variables`)."""
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  ids = jax.ShapeDtypeStruct((groups, group_size), jnp.int32, sharding=sharded)
  same = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
  return (abstract_state(tx, (groups, group_size) + tuple(image_shape), mesh), ids, ids,
          same(rng), jax.tree_util.tree_map(same, teacher))


def compile_recover_step(step, tx, groups: int, group_size: int, image_shape, mesh, teacher,
                         rng):
  """`step` (`create_recover_step`) compiled for `groups` groups at abstract shapes: call
  it like the step; `memory.analyse` reads its per-device memory and FLOPs."""
  return step.lower(*abstract_step_args(tx, groups, group_size, image_shape, mesh, teacher,
                                        rng)).compile()


def measure(images, labels, uids, key, *, method, model, teacher, cfg, mesh=None):
  """BN losses (G,) and teacher hits (G, B) of the images as they are now.

  Returns (BN term of the objective on augmented views drawn from the fixed `key`, so
  initial and final images are measured on the same views; BN loss of the un-augmented
  images; teacher correct on the un-augmented images). Groups are measured like the step
  trains them (`map_groups` at recover.parallel_groups, per device on `mesh`): the pass
  holds no more activations than the step, whatever the round size.
  """
  def groups(images, labels, uids, keys, teacher):
    def one(group, group_labels, group_uids, group_key):
      _, metrics = method.group_loss(group, group_labels, group_uids, group_key,
                                     jnp.float32(cfg.min_scale), model=model, teacher=teacher,
                                     cfg=cfg)
      bn, logits = method.unaugmented_bn_loss(group, model=model, teacher=teacher, cfg=cfg)
      return metrics['bn_loss'], bn, jnp.argmax(logits, -1) == group_labels
    return map_groups(one, (images, labels, uids, keys), uids, cfg.parallel_groups)

  keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(uids[:, 0])
  if mesh is not None:  # per device: its own groups; nothing crosses devices
    data, replicated = jax.sharding.PartitionSpec('data'), jax.sharding.PartitionSpec()
    groups = jax.shard_map(groups, mesh=mesh, in_specs=(data,) * 4 + (replicated,),
                           out_specs=data, check_vma=False)
  return groups(images, labels, uids, keys, teacher)


# ----------------------------------------------------------------------------- init


def initial_images(cfg, spec, labels, uids, rng, num_classes: int, train_split=None):
  """Gaussian noise in normalised space (the reference), or real images of each class.

  labels, uids: (G, B) (`group_layout` of `num_classes`). train_split: the real training split (init 'real').
  Returns (G, B, H, W, C) float32: noise as a device array sharded like `uids`, real images
  as host numpy.
  """
  shape = spec.image_shape
  if cfg.init == 'noise':
    noise = jax.vmap(jax.vmap(lambda u: jax.random.normal(jax.random.fold_in(rng, u), shape)))
    # Jitted on the (sharded) uids: the set is made where it lives, never on one device.
    return jax.jit(noise)(uids)
  if cfg.init != 'real':
    raise ValueError(f"recover.init={cfg.init!r}; valid: 'noise', 'real'.")
  train_images, train_labels = train_split.arrays()
  chosen = np.zeros(labels.shape, np.int64)
  order = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**31 - 1)))
  by_class = {c: order.permutation(np.flatnonzero(train_labels == c))
              for c in range(num_classes)}
  uids = np.asarray(uids)  # host uids (the recover stage passes them for real images)
  for g in range(labels.shape[0]):
    for p, c in enumerate(labels[g]):
      pool = by_class[int(c)]
      chosen[g, p] = pool[(int(uids[g, p]) // num_classes) % len(pool)]  # the ipc index
  return np.asarray(datasets.normalise(train_images[chosen], spec))


