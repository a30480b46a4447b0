"""SRe2L's recover objective (Yin, Xing, Shen, NeurIPS 2023).

Loss of one group (`recover.batch_size` images of different classes, same ipc index):
  CE(teacher(aug(x)), y) + r_bn * sum_l w_l (||mu_l - running_mean_l||_2 +
                                               ||var_l - running_var_l||_2)
with mu_l, var_l the mean and biased variance over (N, H, W) of the *input* of BN layer l,
w_1 = first_bn_multiplier and w_l = 1 otherwise. Statistics are per group, as in the
reference. The CDA curriculum (`recover.curriculum`) shrinks the crops' minimum scale.
"""

import jax
import jax.numpy as jnp
import optax

from sre2l_jax import models
from sre2l_jax.data import augment


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


def augment_group(key, images, uids, *, cfg, min_scale):
  """Per-step augmentation of one group (B, H, W, C): crop, flip, jitter.

  'per_image' draws each image's crop/flip/shift from its own key (fold_in of its uid);
  'per_group' shares one draw across the group, like the reference's batch transforms.
  """
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


def unaugmented_bn_loss(images, *, model, teacher, cfg):
  """(BN loss of the images as they are (), their logits (B, C))."""
  logits, state = model.apply(teacher, images, train=False, mutable=[models.BN_INPUTS])
  bn, _ = bn_statistics_loss(state[models.BN_INPUTS], teacher['batch_stats'],
                             cfg.first_bn_multiplier)
  return bn, logits


def min_scale_at(step, cfg):
  """The crop's minimum scale; with the CDA curriculum, cosine from max_scale to min_scale."""
  if not cfg.curriculum:
    return jnp.float32(cfg.min_scale)
  t = jnp.clip(step / cfg.iterations, 0.0, 1.0)
  return cfg.min_scale + (cfg.max_scale - cfg.min_scale) * 0.5 * (1 + jnp.cos(jnp.pi * t))
