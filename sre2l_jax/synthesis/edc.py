"""EDC-style recovery: soft category-aware BN matching on real starting images.

EDC: Shao, Zhou, Chen, Shen, "Elucidating the Design Space of Dataset Condensation",
NeurIPS 2024 (arXiv 2404.13733; code github.com/shaoshitong/EDC). On top of RDED's selected
real crops it runs a short recovery whose BN term mixes the global running statistics with
the statistics of the images' own classes computed over the real data ("soft category-aware
matching"), uses several backbones, and trains the student with a smoothed schedule.

Loss of one group (`recover.batch_size` images; with recover.group_by='class', all of one
class c, the layout the Fashion-MNIST config uses):
  r_ce CE(teacher(aug(x)), y) + r_bn * sum_l w_l [(1 - a) (||mu_l - running_mean_l|| +
                                                      ||var_l - running_var_l||)
                                              + a (||mu_l - m_l[c]|| + ||var_l - v_l[c]||)]
mu_l, var_l: mean and biased variance over (N, H, W) of BN layer l's input in this group (as
`sre2l`); m_l[c], v_l[c]: the same over all real training images of class c
(`class_stats.py`, teacher in inference mode); a = recover.edc.class_bn_weight; w_1 =
first_bn_multiplier; r_ce = recover.r_ce (1 in EDC). In a group of several classes
(group_by='ipc_index') the class term is, by recover.edc.class_term:
- 'group': the whole group against the mean of its images' class statistics (what EDC's
  code matches);
- 'per_class': the images of each class in the group against their own class's statistics
  (mean and variance over their (n_c, H, W)), averaged over the classes present;
in a one-class group both are the term above against class c's. The class variance target,
by recover.edc.class_var:
- 'pooled': v_l[c], the variance over (N, H, W) of all the class's images;
- 'expected': the variance n real images of class c have together on average, n the
  group's images of class c: v_l[c] - (v_l[c] - w_l[c]) / n, w_l[c] the class's mean
  within-image variance over (H, W) (law of total variance; v - w is the variance of the
  images' means). One image is matched to a typical image's spread, not to the spread of
  the whole class (pooled); a large group to nearly the pooled variance.
Starting images: recover.init='scored'
(`selection.py`: per class the teacher's best-scored real candidates, one per source image,
spread over k-means clusters of the teacher's features) or 'real'.

EDC's settings (paper and its scripts), for reference; configs/in1k_edc.py uses them:
- ImageNet-1K, ResNet-18 recovery: 1,000 iterations (the paper's ablations also use 2,000 and
  fewer), Adam lr 0.05 (betas 0.5/0.9, cosine), batch 80 (100 in the paper's table), r_bn
  (its `r-loss`) 0.1, category-aware weight 0.5 against the global term 0.5, crops of scale
  0.5-1 (weak augmentation), initial images: RDED's selected crops; several backbones
  (ResNet-18, MobileNet-V2, EfficientNet-B0, ShuffleNet-V2, ConvNet) for statistics and soft
  labels. Its code also smooths each layer's batch statistics over iterations with momentum
  0.8 (from G-VBSM); not done here (the statistics are each step's own).
- CIFAR-10 (ConvNet/ResNet-18 backbones): lr 0.05, batch 10 (one image per class), 75
  iterations at IPC 1.
- Student (relabel + evaluate): 300 epochs (ImageNet), AdamW lr 1e-3, weight decay 0.01,
  batch 100 (smaller than SRe2L's 1,024), T = 20, CutMix, crops of scale 0.5-1 for the soft
  labels, and the smoothed schedule lr(t) = lr * (1 + cos(pi * t / (zeta * T))) / 2 with
  zeta = 2 (the rate decays only to half of its peak at the last step, T the total steps),
  EMA of the student's weights (decay 0.99) for evaluation, and an MSE + 0.025 x CE loss to
  the soft labels. Published ImageNet-1K ResNet-18 top-1: IPC 10 48.6, IPC 50 58.0.
"""

import jax
import jax.numpy as jnp
import optax

from sre2l_jax import class_stats
from sre2l_jax import models
# Names, not the module: `from sre2l_jax.synthesis import sre2l` would import this package's
# __init__, which imports this module (a cycle).
from sre2l_jax.synthesis.method import Method
from sre2l_jax.synthesis.sre2l import augment_group
from sre2l_jax.synthesis.sre2l import layer_bn_loss
from sre2l_jax.synthesis.sre2l import min_scale_at
from sre2l_jax.synthesis.sre2l import unaugmented_bn_loss as global_unaugmented_bn_loss
from sre2l_jax.synthesis.sre2l import weighted_bn_loss

CLASS_STATS = class_stats.KEY  # the teacher pytree's extra entry (set by the recover stage)
# Shared with sre2l: the augmentation, the crop curriculum (min_scale_at, which the
# optimizer calls on the method), the BN-term weighting.
__all__ = ['group_loss', 'unaugmented_bn_loss', 'min_scale_at']


def _teacher_only(teacher: dict) -> dict:
  return {k: v for k, v in teacher.items() if k != CLASS_STATS}


def _stats_at(tree: dict, path) -> dict:
  for key in path:
    tree = tree[key]
  return tree


CLASS_TERMS = ('group', 'per_class')
CLASS_VARS = ('pooled', 'expected')


def expected_variance(class_stats: dict, images) -> jax.Array:
  """(K, C): the variance over (n, H, W) that n real images of each class have on average,
  n = images (K,) (at least 1): pooled - (pooled - within) / n."""
  pooled, within = class_stats['var'], class_stats['within_var']
  return pooled - (pooled - within) / jnp.maximum(images, 1.0)[:, None]


def class_variance(class_stats: dict, counts, class_var: str) -> jax.Array:
  """(K, C) variance targets of classes with `counts` (K,) images in the group."""
  return class_stats['var'] if class_var == 'pooled' else expected_variance(class_stats,
                                                                             counts)


def class_target(class_stats: dict, labels, class_var: str = 'pooled') -> dict:
  """{'mean', 'var'} (C,) a group of images with `labels` (B,) is matched to: the mean of
  their classes' statistics (class c's own when the group is all of class c)."""
  counts = jnp.sum(jax.nn.one_hot(labels, class_stats['mean'].shape[0]), axis=0)
  targets = {'mean': class_stats['mean'],
             'var': class_variance(class_stats, counts, class_var)}
  return {k: jnp.mean(v[labels], axis=0) for k, v in targets.items()}


def per_class_bn_loss(x, class_stats: dict, labels, class_var: str):
  """The mean over the classes present in the group of ||mu_c - m[c]|| + ||var_c - t[c]||,
  mu_c and var_c over (n_c, H, W) of the images of class c in x (B, H, W, C), t[c] its
  variance target. var_c by the law of total variance (each image's variance about its own
  mean plus its mean's spread about mu_c), so no (B, K, H, W, C) array is formed."""
  x = x.astype(jnp.float32)
  num_classes = class_stats['mean'].shape[0]
  weights = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # (B, K)
  counts = jnp.sum(weights, axis=0)
  present = counts > 0
  per_image = jnp.mean(x, axis=(1, 2))  # (B, C)
  within = jnp.mean(jnp.square(x - per_image[:, None, None]), axis=(1, 2))
  dot = lambda a: jnp.einsum('bk,bc->kc', weights, a, precision=jax.lax.Precision.HIGHEST)
  n = jnp.maximum(counts, 1.0)[:, None]
  mean = dot(per_image) / n  # (K, C)
  var = dot(within + jnp.square(per_image - mean[labels])) / n
  target_var = class_variance(class_stats, counts, class_var)
  terms = (jnp.linalg.norm(mean - class_stats['mean'], axis=-1) +
           jnp.linalg.norm(var - target_var, axis=-1))
  return jnp.sum(jnp.where(present, terms, 0.0)) / jnp.sum(present)


def bn_terms(bn_inputs: dict, teacher: dict, labels, class_term: str = 'group',
             class_var: str = 'pooled'):
  """Per-layer (global term (L,), class term (L,)) in call order."""
  global_terms, class_terms = [], []
  for path, x in models.iter_in_call_order(bn_inputs):
    layer = path[:-1] + (path[-1][:-len('_input')],)
    global_terms.append(layer_bn_loss(x, _stats_at(teacher['batch_stats'], layer)))
    stats = _stats_at(teacher[CLASS_STATS], layer)
    if class_term == 'per_class':
      class_terms.append(per_class_bn_loss(x, stats, labels, class_var))
    else:
      class_terms.append(layer_bn_loss(x, class_target(stats, labels, class_var)))
  return jnp.stack(global_terms), jnp.stack(class_terms)


REMAT = ('none', 'teacher')


def remat_refusal(remat: str) -> str:
  return f"recover.method='edc' supports recover.remat 'none' and 'teacher'; got {remat!r}."


def validate(cfg, spec=None) -> None:
  """Refuses a recover.remat edc's forward does not implement, and an unknown
  edc.class_term or edc.class_var (before any stage runs)."""
  del spec
  if cfg.get('remat', 'none') not in REMAT:
    raise ValueError(remat_refusal(cfg.remat))
  if cfg.edc.class_term not in CLASS_TERMS:
    raise ValueError(f'recover.edc.class_term={cfg.edc.class_term!r}; valid: '
                     f"'group' (the group against its classes' mean statistics, EDC's code), "
                     f"'per_class' (each class's images in the group against their class's).")
  if cfg.edc.class_var not in CLASS_VARS:
    raise ValueError(f'recover.edc.class_var={cfg.edc.class_var!r}; valid: '
                     f"'pooled' (the class's variance over all its images), 'expected' (the "
                     f'variance of as many of its real images as the group holds).')


def teacher_forward(x, labels, *, model, teacher, remat: str = 'none',
                    class_term: str = 'group', class_var: str = 'pooled'):
  """(logits (B, K), global terms (L,), class terms (L,)) of the teacher on x."""

  def forward(teacher, x):
    logits, state = model.apply(_teacher_only(teacher), x, train=False,
                                mutable=[models.BN_INPUTS])
    return (logits,) + bn_terms(state[models.BN_INPUTS], teacher, labels, class_term,
                                class_var)

  if remat == 'teacher':
    forward = jax.checkpoint(forward, policy=jax.checkpoint_policies.nothing_saveable)
  elif remat != 'none':
    raise ValueError(remat_refusal(remat))
  return forward(teacher, x)


def group_loss(images, labels, uids, key, min_scale, *, model, teacher, cfg):
  """Loss of one group and its metrics. images (B, H, W, C) normalised float32; teacher:
  {'params', 'batch_stats', 'class_stats'} (class statistics (K, C) per BN layer)."""
  x = augment_group(key, images, uids, cfg=cfg, min_scale=min_scale)
  logits, global_terms, class_terms = teacher_forward(
      x, labels, model=model, teacher=teacher, remat=cfg.remat,
      class_term=cfg.edc.class_term, class_var=cfg.edc.class_var)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  weight = cfg.edc.class_bn_weight
  bn, per_layer = weighted_bn_loss((1 - weight) * global_terms + weight * class_terms,
                                         cfg.first_bn_multiplier)
  loss = cfg.r_ce * ce + cfg.r_bn * bn
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {'loss': loss, 'ce': ce, 'bn_loss': bn, 'bn_loss_per_layer': per_layer,
                'bn_loss_global': weighted_bn_loss(global_terms,
                                                         cfg.first_bn_multiplier)[0],
                'bn_loss_class': weighted_bn_loss(class_terms,
                                                        cfg.first_bn_multiplier)[0],
                'accuracy': accuracy}


def unaugmented_bn_loss(images, *, model, teacher, cfg):
  """(the global BN loss of the images as they are (), their logits (B, K)), as `sre2l`."""
  return global_unaugmented_bn_loss(images, model=model, teacher=_teacher_only(teacher),
                                    cfg=cfg)


METHOD = Method(name='edc', kind='optimised', group_loss=group_loss,
                unaugmented_bn_loss=unaugmented_bn_loss, min_scale_at=min_scale_at,
                needs_class_stats=True, validate=validate)
