"""SRe2L's recover objective (Yin, Xing, Shen, NeurIPS 2023).

Loss of one group (`recover.batch_size` images of different classes, same ipc index):
  r_ce CE(teacher(aug(x)), y) + r_bn * sum_l w_l (||mu_l - running_mean_l||_2 +
                                                    ||var_l - running_var_l||_2)
with mu_l, var_l the mean and biased variance over (N, H, W) of the *input* of BN layer l,
w_1 = first_bn_multiplier and w_l = 1 otherwise; r_ce = recover.r_ce (1 in the paper).
Statistics are per group, as in the reference. The CDA curriculum (`recover.curriculum`)
shrinks the crops' minimum scale.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sre2l_jax import models
from sre2l_jax.data import augment
from sre2l_jax.synthesis.method import Method


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
    losses.append(layer_bn_loss(x, stats))
  return weighted_bn_loss(jnp.stack(losses), first_bn_multiplier)


def layer_bn_loss(x, stats):
  """||mean - running_mean||_2 + ||var - running_var||_2 of one BN layer's input x
  (N, H, W, C), statistics in float32 over (N, H, W); stats {'mean', 'var'} (C,)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))  # biased, as the reference
  return jnp.linalg.norm(mean - stats['mean']) + jnp.linalg.norm(var - stats['var'])


def weighted_bn_loss(per_layer, first_bn_multiplier: float):
  """(sum_l w_l loss_l, per_layer) with w_1 = first_bn_multiplier, w_l = 1 otherwise."""
  weights = jnp.ones_like(per_layer).at[0].set(first_bn_multiplier)
  return jnp.sum(weights * per_layer), per_layer


# ----------------------------------------------------------------------------- remat

REMAT = ('none', 'teacher', 'blocks')
# Where 'blocks' collects each BN layer's loss term (a scalar): the layer inputs never leave
# a block, so the block's activations can be recomputed in the backward instead of kept.
BN_TERMS = 'bn_terms'


def _sow_bn_term(next_fun, args, kwargs, context):
  """Method interceptor: a BatchNorm call sows its input's loss term before it runs."""
  if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
    term = layer_bn_loss(args[0], context.module.variables['batch_stats'])
    context.module.sow(BN_TERMS, 'term', term, init_fn=lambda: None,
                       reduce_fn=lambda _, new: new)
  return next_fun(*args, **kwargs)


def teacher_forward(x, *, model, teacher, remat: str = 'none'):
  """(logits (B, C), per-layer BN losses (L,) in call order) of the teacher on x.

  remat: 'none' keeps every activation the backward needs; 'teacher' recomputes the whole
  forward in the backward (`jax.checkpoint`, nothing saved); 'blocks' (ResNets) recomputes
  each residual block's activations in the backward from the block's input, the BN loss
  terms computed inside the block. The same loss either way; memory against FLOPs.
  """
  if remat == 'blocks':
    if not hasattr(model, 'block_cls'):
      raise ValueError(f"recover.remat='blocks' needs a ResNet teacher; "
                       f"{type(model).__name__} has no residual blocks.")
    # `train` (argument 2, after self and x) selects Python branches: static.
    blocks = model.clone(block_cls=nn.remat(model.block_cls, static_argnums=(2,)))
    with nn.intercept_methods(_sow_bn_term):
      logits, state = blocks.apply(teacher, x, train=False, mutable=[BN_TERMS])
    return logits, jnp.stack([t for _, t in models.iter_in_call_order(state[BN_TERMS])])

  def forward(teacher, x):
    logits, state = model.apply(teacher, x, train=False, mutable=[models.BN_INPUTS])
    _, per_layer = bn_statistics_loss(state[models.BN_INPUTS], teacher['batch_stats'], 1.0)
    return logits, per_layer

  if remat == 'teacher':
    forward = jax.checkpoint(forward, policy=jax.checkpoint_policies.nothing_saveable)
  elif remat != 'none':
    raise ValueError(f'recover.remat={remat!r}; valid: {", ".join(map(repr, REMAT))}.')
  return forward(teacher, x)


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
  """Loss of one group and its metrics. images (B, H, W, C) normalised float32. Several
  teachers (`models.Ensemble`): the sum of each teacher's loss on the same views."""
  if isinstance(model, models.Ensemble):
    return models.ensemble.sum_over_members(group_loss, model, teacher, images, labels, uids,
                                            key, min_scale, cfg=cfg)
  x = augment_group(key, images, uids, cfg=cfg, min_scale=min_scale)
  logits, per_layer = teacher_forward(x, model=model, teacher=teacher,
                                      remat=cfg.remat)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  bn, per_layer = weighted_bn_loss(per_layer, cfg.first_bn_multiplier)
  loss = cfg.r_ce * ce + cfg.r_bn * bn
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {'loss': loss, 'ce': ce, 'bn_loss': bn, 'bn_loss_per_layer': per_layer,
                'accuracy': accuracy}


def unaugmented_bn_loss(images, *, model, teacher, cfg):
  """(BN loss of the images as they are (), their logits (B, C)); several teachers: the sum
  of their BN losses, the ensemble's logits."""
  if isinstance(model, models.Ensemble):
    bn = sum(unaugmented_bn_loss(images, model=models.ensemble.member(model, i),
                                 teacher=models.ensemble.member_variables(teacher, i),
                                 cfg=cfg)[0] for i in range(len(model.members)))
    return bn, model.apply(teacher, images, train=False)
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


METHOD = Method(name='sre2l', kind='optimised', group_loss=group_loss,
                unaugmented_bn_loss=unaugmented_bn_loss, min_scale_at=min_scale_at,
                several_teachers=True)
