"""Recover: synthesise images whose BatchNorm-input statistics match the frozen teacher's.

Loss of one group (`recover.batch_size` images of different classes, same ipc index):
  CE(teacher(aug(x)), y) + r_bn * sum_l w_l (||mu_l - running_mean_l||_2 +
                                               ||var_l - running_var_l||_2)
with mu_l, var_l the mean and biased variance over (N, H, W) of the *input* of BN layer l,
w_1 = first_bn_multiplier and w_l = 1 otherwise (SRe2L, Yin et al. 2023). Statistics are per
group, as in the reference; the groups are vmapped and sharded over the mesh's 'data' axis,
so more devices mean more groups at once without changing the regulariser. Only the images
get gradients: nothing is differentiated with respect to the teacher's weights.
"""

import functools
import math
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
from sre2l_jax import export
from sre2l_jax import models
from sre2l_jax import multihost
from sre2l_jax import squeeze
from sre2l_jax import train_lib
from sre2l_jax.data import augment
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline


class DivergedError(FloatingPointError):
  """The recover loss or the images stopped being finite."""


# ----------------------------------------------------------------------------- layout


def group_layout(num_classes: int, ipc: int, group_size: int, num_devices: int):
  """Assigns every synthetic image to a group.

  Group g holds classes [j*B, (j+1)*B) at ipc index i, for g = i * (C/B) + j. The number of
  groups is padded to a multiple of `num_devices`; padding groups are optimised too (they
  are independent of the real ones) and dropped on export.
  Returns labels (G, B) int32, uids (G, B) int32 (image ids that seed per-image randomness),
  and the number of real groups.
  """
  chunks = num_classes // group_size
  real = ipc * chunks
  total = math.ceil(real / num_devices) * num_devices
  g = np.arange(total)[:, None]
  p = np.arange(group_size)[None, :]
  labels = ((g % chunks) * group_size + p).astype(np.int32)
  uids = (g * group_size + p).astype(np.int32)
  return labels, uids, real


def recovered_classes(cfg, spec) -> int:
  """How many classes get images: classes 0..N-1 with N = recover.num_classes if set (> 0,
  smoke runs on 1000-class datasets), else all of the dataset's classes."""
  return cfg.get('num_classes', 0) or spec.num_classes


def to_class_major(images: np.ndarray, num_classes: int, ipc: int) -> np.ndarray:
  """Real groups (ipc * C/B, B, ...) -> (C, ipc, ...), images[c, i] of class c, ipc index i."""
  x = images.reshape((ipc, num_classes) + images.shape[2:])
  return np.swapaxes(x, 0, 1)


# ----------------------------------------------------------------------------- loss


def bn_statistics_loss(bn_inputs: dict, batch_stats: dict, first_bn_multiplier: float):
  """Per-layer ||mean - running_mean||_2 + ||var - running_var||_2 of BN inputs.

  bn_inputs: the 'bn_inputs' collection of one forward pass (call order preserved).
  Returns (weighted sum, per-layer losses (L,)). Statistics in float32 over (N, H, W).
  """
  losses = []
  for path, x in models.iter_in_call_order(bn_inputs):
    stats = batch_stats
    for key in path[:-1] + (path[-1][:-len('_input')],):
      stats = stats[key]
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))  # biased, as the reference
    losses.append(jnp.linalg.norm(mean - stats['mean']) + jnp.linalg.norm(var - stats['var']))
  losses = jnp.stack(losses)
  weights = jnp.ones_like(losses).at[0].set(first_bn_multiplier)
  return jnp.sum(weights * losses), losses


def augment_group(key, images, uids, *, cfg, min_scale, bounds=None):
  """Per-step augmentation of one group (B, H, W, C): crop, flip, jitter.

  'per_image' draws each image's crop/flip/shift from its own key (fold_in of its uid);
  'per_group' shares one draw across the group, like the reference's batch transforms.
  """
  del bounds
  size = images.shape[1:3]

  def one(k, image):
    k_crop, k_flip, k_roll = jax.random.split(k, 3)
    if cfg.crop != 'none':
      image = augment.random_resized_crop(k_crop, image, size, (min_scale, cfg.max_scale))
    if cfg.flip:
      image = augment.random_flip(k_flip, image)
    return augment.random_roll(k_roll, image, cfg.jitter)

  if cfg.crop == 'per_group':
    keys = jnp.broadcast_to(key, (images.shape[0],) + key.shape)
  else:
    keys = jax.vmap(lambda u: jax.random.fold_in(key, u))(uids)
  return jax.vmap(one)(keys, images)


def group_loss(images, labels, uids, key, min_scale, *, model, teacher, cfg):
  """Loss of one group and its metrics. images (B, H, W, C) normalised float32."""
  x = augment_group(key, images, uids, cfg=cfg, min_scale=min_scale)
  logits, state = model.apply(teacher, x, train=False, mutable=[models.BN_INPUTS])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  bn, per_layer = bn_statistics_loss(state[models.BN_INPUTS], teacher['batch_stats'],
                                     cfg.first_bn_multiplier)
  loss = ce + cfg.r_bn * bn
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {'loss': loss, 'ce': ce, 'bn_loss': bn, 'bn_loss_per_layer': per_layer,
                'accuracy': accuracy}


def min_scale_at(step, cfg):
  """The crop's minimum scale; with the CDA curriculum, cosine from max_scale to min_scale."""
  if not cfg.curriculum:
    return jnp.float32(cfg.min_scale)
  t = jnp.clip(step / cfg.iterations, 0.0, 1.0)
  return cfg.min_scale + (cfg.max_scale - cfg.min_scale) * 0.5 * (1 + jnp.cos(jnp.pi * t))


def recover_step(state, labels, uids, rng, *, model, teacher, cfg, tx, bounds):
  """One Adam step on all groups: (state, ...) -> (state, metrics averaged over groups).

  state: {'images': (G, B, H, W, C), 'opt_state': ..., 'step': ()}.
  """
  step = state['step']
  key = jax.random.fold_in(rng, step)
  loss_fn = functools.partial(group_loss, model=model, teacher=teacher, cfg=cfg)

  def total_loss(images):
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(uids[:, 0])
    losses, metrics = jax.vmap(loss_fn, in_axes=(0, 0, 0, 0, None))(
        images, labels, uids, keys, min_scale_at(step, cfg))
    # A sum, so that each group's gradient is that of its own loss alone.
    return jnp.sum(losses), metrics

  grads, metrics = jax.grad(total_loss, has_aux=True)(state['images'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['images'])
  images = jnp.clip(optax.apply_updates(state['images'], updates), bounds[0], bounds[1])
  metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)
  metrics['finite'] = jnp.isfinite(images).all()
  return {'images': images, 'opt_state': opt_state, 'step': step + 1}, metrics


def jit_recover_step(model, cfg, tx, bounds, state_shardings, mesh):
  """`recover_step` jitted with the stage's shardings and the state donated.

  Call as `step(state, labels, uids, rng, teacher)`. The teacher is an argument, not a
  closed-over constant: constants would be embedded in the compiled program (slow to
  compile and duplicated in memory for a ResNet-50).
  """
  sharded, replicated = pipeline.data_sharding(mesh), pipeline.replicated(mesh)
  return jax.jit(
      lambda state, labels, uids, rng, teacher: recover_step(
          state, labels, uids, rng, model=model, teacher=teacher, cfg=cfg, tx=tx,
          bounds=bounds),
      in_shardings=(state_shardings, sharded, sharded, replicated, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=0)


def measure(images, labels, uids, key, *, model, teacher, cfg):
  """BN losses (G,) and teacher hits (G, B) of the images as they are now.

  Returns (BN term of the objective on augmented views drawn from the fixed `key`, so
  initial and final images are measured on the same views; BN loss of the un-augmented
  images; teacher correct on the un-augmented images).
  """
  def one(group, group_labels, group_uids, group_key):
    _, metrics = group_loss(group, group_labels, group_uids, group_key,
                            jnp.float32(cfg.min_scale), model=model, teacher=teacher, cfg=cfg)
    logits, state = model.apply(teacher, group, train=False, mutable=[models.BN_INPUTS])
    bn, _ = bn_statistics_loss(state[models.BN_INPUTS], teacher['batch_stats'],
                               cfg.first_bn_multiplier)
    return metrics['bn_loss'], bn, jnp.argmax(logits, -1) == group_labels
  keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(uids[:, 0])
  return jax.vmap(one)(images, labels, uids, keys)


# ----------------------------------------------------------------------------- init


def initial_images(cfg, spec, labels, uids, rng, dataset_config):
  """Gaussian noise in normalised space (the reference), or real images of each class.

  labels, uids: (G, B) (`group_layout`). Returns (G, B, H, W, C) float32: noise as a device
  array sharded like `uids`, real images as host numpy.
  """
  shape = spec.image_shape
  if cfg.init == 'noise':
    noise = jax.vmap(jax.vmap(lambda u: jax.random.normal(jax.random.fold_in(rng, u), shape)))
    # Jitted on the (sharded) uids: the set is made where it lives, never on one device.
    return jax.jit(noise)(uids)
  if cfg.init != 'real':
    raise ValueError(f"recover.init={cfg.init!r}; valid: 'noise', 'real'.")
  train = pipeline.load_split(dataset_config, 'train')
  if not isinstance(train, pipeline.InMemorySplit):
    raise ValueError("recover.init='real' needs an in-memory dataset.")
  chosen = np.zeros(labels.shape, np.int64)
  order = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**31 - 1)))
  num_classes = recovered_classes(cfg, spec)
  by_class = {c: order.permutation(np.flatnonzero(train.labels == c))
              for c in range(num_classes)}
  for g in range(labels.shape[0]):
    ipc_index = g // (num_classes // labels.shape[1])
    for p, c in enumerate(labels[g]):
      pool = by_class[int(c)]
      chosen[g, p] = pool[ipc_index % len(pool)]
  return np.asarray(datasets.normalise(train.images[chosen], spec))


# ----------------------------------------------------------------------------- run


def fingerprint(config) -> dict:
  keep = {k: v for k, v in config.recover.to_dict().items()
          if k not in ('log_every_steps', 'checkpoint_every_steps')}
  return {'dataset': config.dataset.name, 'teacher': config.teacher.to_dict(),
          'teacher_dir': config.squeeze.teacher_dir, 'recover': keep, 'seed': config.seed}


def validate(config, spec, mesh) -> None:
  cfg = config.recover
  if cfg.ipc <= 0:
    raise ValueError(f'recover.ipc={cfg.ipc} must be a positive number of images per class.')
  num_classes = recovered_classes(cfg, spec)
  if not 0 < num_classes <= spec.num_classes:
    raise ValueError(f'recover.num_classes={num_classes}; {spec.name} has '
                     f'{spec.num_classes} classes (0: all).')
  if cfg.batch_size <= 0 or num_classes % cfg.batch_size:
    raise ValueError(
        f'recover.batch_size={cfg.batch_size} is the group size (images of different classes '
        f'sharing an ipc index); it must divide the {num_classes} classes of '
        f'{spec.name}' + (' recovered' if num_classes < spec.num_classes else '') + '.')
  if cfg.iterations <= 0 or cfg.lr <= 0 or cfg.r_bn < 0:
    raise ValueError(f'recover needs iterations > 0, lr > 0, r_bn >= 0; got '
                     f'{cfg.iterations}, {cfg.lr}, {cfg.r_bn}.')
  if cfg.crop not in ('per_image', 'per_group', 'none'):
    raise ValueError(f"recover.crop={cfg.crop!r}; valid: 'per_image', 'per_group', 'none'.")
  if not 0 < cfg.min_scale <= cfg.max_scale <= 1:
    raise ValueError(f'recover needs 0 < min_scale <= max_scale <= 1; got {cfg.min_scale}, '
                     f'{cfg.max_scale}.')
  del mesh


def distilled_dir(workdir: str) -> str:
  return os.path.join(workdir, 'recover', 'tfds')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Recovers `ipc` images per class; resumes from `workdir/recover/checkpoints`."""
  cfg = config.recover
  stage_dir = os.path.join(workdir, 'recover')
  spec = datasets.get_spec(config.dataset.name)
  mesh = pipeline.create_mesh(config.mesh_shape)
  validate(config, spec, mesh)
  _, teacher = squeeze.load_teacher(config, workdir, mesh)  # fails early if missing/unfit
  model = models.create_model(config.teacher, spec.num_classes, dtype=None if
                              cfg.dtype == 'float32' else jnp.bfloat16)
  checkpoint.check_fingerprint(stage_dir, fingerprint(config))

  # Layout: groups sharded on 'data'.
  num_classes = recovered_classes(cfg, spec)
  labels, uids, real_groups = group_layout(num_classes, cfg.ipc, cfg.batch_size, mesh.size)
  sharded, replicated = pipeline.data_sharding(mesh), pipeline.replicated(mesh)
  labels_dev = jax.device_put(labels, sharded)
  uids_dev = jax.device_put(uids, sharded)
  init_rng, step_rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))

  schedule = optax.cosine_decay_schedule(cfg.lr, cfg.iterations)
  tx = optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=1e-8)
  low, high = datasets.pixel_bounds(spec)
  bounds = (jnp.asarray(low), jnp.asarray(high))

  def create_state(images):
    return {'images': images, 'opt_state': tx.init(images), 'step': jnp.int32(0)}

  state_shardings = jax.tree_util.tree_map(
      lambda x: sharded if x.ndim == 5 else replicated,
      jax.eval_shape(create_state, jax.ShapeDtypeStruct(labels.shape + spec.image_shape,
                                                        jnp.float32)))

  # Resume or initialise.
  manager = checkpoint.create_manager(os.path.join(stage_dir, 'checkpoints'),
                                      max_to_keep=2)
  start_step = manager.latest_step() or 0
  if start_step:
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(create_state, jax.ShapeDtypeStruct(labels.shape + spec.image_shape,
                                                          jnp.float32)), state_shardings)
    state = manager.restore(start_step, args=ocp.args.StandardRestore(abstract))
    logging.info('recover: resumed from step %d', start_step)
  else:
    images = initial_images(cfg, spec, labels, uids_dev, init_rng, config.dataset)
    state = jax.jit(create_state, out_shardings=state_shardings)(
        jax.device_put(images, sharded))

  # Replicated outputs: every process reads them (small: one value per group / image).
  measure_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  # Global arrays are passed as arguments: closing over them fails on several processes.
  measure_fn = jax.jit(lambda images, labels, uids, teacher: measure(
      images, labels, uids, measure_key, model=model, teacher=teacher, cfg=cfg),
                       out_shardings=replicated)

  def mean_losses(images):
    bn, plain, correct = jax.device_get(measure_fn(images, labels_dev, uids_dev, teacher))
    return (float(bn[:real_groups].mean()), float(plain[:real_groups].mean()),
            float(correct[:real_groups].mean()))

  initial_path = os.path.join(stage_dir, 'initial.json')
  if not start_step or not os.path.exists(initial_path):
    # Not read back from the file: only process 0 writes it.
    initial = dict(zip(('bn_loss', 'bn_loss_unaugmented'), mean_losses(state['images'])))
    checkpoint.write_json(initial_path, initial)
  else:
    initial = checkpoint.read_json(initial_path)

  step_fn = jit_recover_step(model, cfg, tx, bounds, state_shardings, mesh)

  writer = train_lib.create_writer(os.path.join(stage_dir, 'logs'))
  progress = train_lib.create_progress(cfg.iterations, writer, cfg.log_every_steps)
  throughput = train_lib.Throughput()
  num_images = real_groups * cfg.batch_size
  start_time, history = time.time(), []
  last_saved = start_step
  for step in range(start_step + 1, cfg.iterations + 1):
    state, metrics = step_fn(state, labels_dev, uids_dev, step_rng, teacher)
    history.append(metrics)
    if step == start_step + 1:
      jax.block_until_ready(state)
    throughput.tick(num_images)
    progress(step)
    is_log = step % cfg.log_every_steps == 0 or step == cfg.iterations
    is_save = step % cfg.checkpoint_every_steps == 0 or step == cfg.iterations
    if is_log or is_save:
      host = jax.device_get(history)
      history = []
      if not all(bool(m['finite']) and np.isfinite(m['loss']) for m in host):
        manager.wait_until_finished()
        kept = (f'The last good checkpoint (step {last_saved}) is kept in '
                f'{stage_dir}/checkpoints.' if last_saved else
                'No checkpoint had been saved yet.')
        # lr and r_bn are part of the stage fingerprint: new values need a new workdir.
        raise DivergedError(
            f'recover diverged (loss or images not finite) by step {step}. Lower '
            f'recover.lr (now {cfg.lr}) or recover.r_bn (now {cfg.r_bn}) and re-run with a '
            f'new --workdir. {kept}')
      per_layer = np.mean([m['bn_loss_per_layer'] for m in host], axis=0)
      scalars = {k: float(np.mean([m[k] for m in host]))
                 for k in ('loss', 'ce', 'bn_loss', 'accuracy')}
      scalars |= {f'bn_loss_layer_{i:02d}': float(v) for i, v in enumerate(per_layer)}
      scalars['image_iterations_per_second'] = throughput.rate()
      writer.write_scalars(step, scalars)
    if is_save:
      manager.save(step, args=ocp.args.StandardSave(state))
      last_saved = step
  manager.wait_until_finished()
  wall = time.time() - start_time

  bn_final, bn_final_unaugmented, teacher_top1 = mean_losses(state['images'])
  images = multihost.to_host(state['images'])[:real_groups]  # sharded over processes
  images = to_class_major(datasets.denormalise(images, spec), num_classes, cfg.ipc)

  if jax.process_index() == 0:
    flat_labels = np.repeat(np.arange(num_classes), cfg.ipc)
    export.write_tfds(distilled_dir(workdir), images.reshape((-1,) + spec.image_shape),
                      flat_labels, spec.num_classes)
    export.write_image_folder(os.path.join(stage_dir, 'images'), images)
    export.write_grid(os.path.join(stage_dir, 'grid.png'), images)
  writer.write_scalars(cfg.iterations, {'bn_loss_final': bn_final,
                                        'teacher_top1_on_synthetic': teacher_top1})
  writer.flush()
  result = {
      'stage': 'recover', 'dataset': spec.name, 'ipc': cfg.ipc, 'iterations': cfg.iterations,
      'group_size': cfg.batch_size, 'groups': real_groups, 'images': num_images,
      'classes': num_classes,
      'bn_loss_initial': initial['bn_loss'], 'bn_loss_final': bn_final,
      'bn_loss_unaugmented_initial': initial['bn_loss_unaugmented'],
      'bn_loss_unaugmented_final': bn_final_unaugmented,
      'bn_loss_note': ('sum over BN layers of w_l (|mean - running mean| + |var - running var|)'
                       ', mean over groups; bn_loss_*: the objective\'s BN term on one fixed '
                       'draw of the training augmentation, the same views at start and end; '
                       'bn_loss_unaugmented_*: on the images as they are'),
      'teacher_top1_on_synthetic': teacher_top1, 'teacher_top1_unit': 'fraction',
      'image_iterations_per_second': throughput.rate(), 'wall_seconds': wall,
      'resumed_from_step': start_step, 'devices': mesh.size,
      'outputs': {'tfds': distilled_dir(workdir), 'png': os.path.join(stage_dir, 'images'),
                  'grid': os.path.join(stage_dir, 'grid.png')},
  }
  checkpoint.write_json(os.path.join(stage_dir, 'result.json'), result)
  logging.info('recover: BN loss %.4g -> %.4g (un-augmented %.4g -> %.4g), teacher top-1 '
               'on synthetic %.4f', initial['bn_loss'], bn_final,
               initial['bn_loss_unaugmented'], bn_final_unaugmented, teacher_top1)
  return result
