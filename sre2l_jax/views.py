"""The student's views: which images form each batch, and their crops, flips and mixing.

The view of batch b in epoch e (which images, their crops and flips, the CutMix/MixUp
lambda, box and partner permutation) is a pure function of (seed, e, b): nothing about crops
is stored, and replay is exact by construction. Relabel (stored labels), evaluate and
continual all draw their views here, so the labels always belong to the views a student sees.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sre2l_jax import rngs
from sre2l_jax.data import augment
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

MIXES = ('cutmix', 'mixup', 'none')
# The relabel settings that, with the schedule, fix every view (stored with stored labels).
VIEW_KEYS = ('min_scale', 'max_scale', 'mix', 'cutmix_alpha', 'mixup_alpha', 'mix_prob')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which images form batch b of epoch e. Epochs are padded by wrapping around so every
  batch has `batch_size` images (one compiled step) and every image is seen each epoch."""
  num_images: int
  batch_size: int
  epochs: int
  seed: int

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_images // self.batch_size)

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch

  def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
    order = rngs.numpy_rng('batch_order', self.seed, epoch).permutation(self.num_images)
    order = np.resize(order, self.steps_per_epoch * self.batch_size)
    return order[batch * self.batch_size:(batch + 1) * self.batch_size]

  def view_key(self, epoch: int, batch: int) -> jax.Array:
    key = rngs.stream_key(self.seed, 'views')
    return jax.random.fold_in(jax.random.fold_in(key, epoch), batch)

  def position(self, step: int) -> tuple[int, int]:
    """(epoch, batch) of the 0-based global step `step`."""
    return divmod(step, self.steps_per_epoch)


def create_schedule(config: ml_collections.ConfigDict, num_images: int) -> Schedule:
  """The evaluate/relabel schedule of a set of `num_images` images."""
  batch = min(config.student.batch_size, num_images)
  return Schedule(num_images, batch, config.student.epochs, config.seed)


def view_settings(cfg: ml_collections.ConfigDict) -> dict:
  """The relabel settings that, with the schedule, fix every view."""
  return {k: cfg[k] for k in VIEW_KEYS}


def cutmix_box(key, lam, height: int, width: int):
  """The CutMix region (y0, x0, y1, x1), int32 pixel bounds (end excluded), and the lambda
  corrected to its clipped area."""
  k_y, k_x = jax.random.split(key)
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.floor(height * cut), jnp.floor(width * cut)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  box = jnp.stack([y0, x0, y1, x1]).astype(jnp.int32)
  return box, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def box_mask(box, height: int, width: int):
  """Boolean (H, W) mask of the region `box` (y0, x0, y1, x1)."""
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (ys >= box[0]) & (ys < box[2]) & (xs >= box[1]) & (xs < box[3])


def view_params(key, batch: int, height: int, width: int, *, cfg) -> dict:
  """Everything random about the views of one batch (what `batch_views` applies, and what
  the FKD export writes), for images of (height, width):
    crop (B, 4) float32: (top, left, h, w) of each RandomResizedCrop box, in pixels;
    flip (B,) bool: horizontal flip after the crop;
    partner (B,) int32: view i is mixed with image partner[i];
    lam () float32: the weight of view i's own image (1: not mixed);
    box (4,) int32: the CutMix region (y0, x0, y1, x1) pasted from the partner ('cutmix'
      applied; else empty, (0, 0, 0, 0)).
  """
  k_crop, k_flip, k_lam, k_perm, k_box, k_apply = jax.random.split(key, 6)
  scale = (cfg.min_scale, cfg.max_scale)
  crop = jax.vmap(lambda k: jnp.stack(augment.sample_crop_box(k, height, width, scale)))(
      jax.random.split(k_crop, batch))
  flip = jax.vmap(jax.random.bernoulli)(jax.random.split(k_flip, batch))
  partner = jax.random.permutation(k_perm, batch).astype(jnp.int32)
  apply = jax.random.uniform(k_apply) < cfg.mix_prob
  box = jnp.zeros((4,), jnp.int32)
  if cfg.mix == 'cutmix':
    lam = jax.random.beta(k_lam, cfg.cutmix_alpha, cfg.cutmix_alpha)
    box, lam = cutmix_box(k_box, lam, height, width)
    box = jnp.where(apply, box, 0)
  elif cfg.mix == 'mixup':
    lam = jax.random.beta(k_lam, cfg.mixup_alpha, cfg.mixup_alpha)
  elif cfg.mix == 'none':
    lam = jnp.float32(1.0)
  else:
    raise ValueError(f'relabel.mix={cfg.mix!r}; valid: {", ".join(MIXES)}.')
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  return {'crop': crop, 'flip': flip, 'partner': partner, 'lam': lam, 'box': box,
          'apply': apply}


def batch_views(key, images_u8, *, cfg, spec: datasets.DatasetSpec):
  """The augmented, mixed views of one batch (the draws of `view_params`).

  images_u8: (B, H, W, C) uint8. cfg: the relabel config (view settings). Returns (views
  (B, H, W, C) normalised float32, lam () float32, partner (B,) int32): view i mixes image i
  (weight lam) with image partner[i] (weight 1 - lam), as the hard-label targets need.
  """
  x = datasets.normalise(images_u8, spec)
  b, h, w = x.shape[:3]
  p = view_params(key, b, h, w, cfg=cfg)
  x = jax.vmap(lambda im, box: augment.crop_and_resize(im, tuple(box), (h, w)))(x, p['crop'])
  x = jnp.where(p['flip'][:, None, None, None], x[:, :, ::-1], x)
  partner = p['partner']
  if cfg.mix == 'cutmix':
    mixed = jnp.where(box_mask(p['box'], h, w)[None, :, :, None], x[partner], x)
  elif cfg.mix == 'mixup':
    mixed = p['lam'] * x + (1 - p['lam']) * x[partner]
  else:
    mixed = x
  return jnp.where(p['apply'], mixed, x), p['lam'], partner


def create_batch_views(cfg, spec: datasets.DatasetSpec, mesh):
  """Jitted `batch_views`: (key, images_u8 sharded on 'data') -> (views sharded on 'data',
  lam, partner replicated), as relabel labels them."""
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(functools.partial(batch_views, cfg=cfg, spec=spec),
                 in_shardings=(replicated, sharded),
                 out_shardings=(sharded, replicated, replicated))


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Clear errors for view settings that cannot run (called before any work)."""
  if cfg.mix not in MIXES:
    raise ValueError(f'relabel.mix={cfg.mix!r}; valid: {", ".join(MIXES)}.')
  if not 0 < cfg.min_scale <= cfg.max_scale <= 1:
    raise ValueError(f'relabel needs 0 < min_scale <= max_scale <= 1; got {cfg.min_scale}, '
                     f'{cfg.max_scale}.')

