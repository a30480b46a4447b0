"""Image augmentations in JAX: per-image, keyed, differentiable where it matters.

All functions take one image (H, W, C) and one PRNG key; `jax.vmap` them over a batch with
one key per image. Crops are resampled bilinearly with `jax.image.scale_and_translate`, so
gradients flow back to the source pixels (the recover stage optimises through them).
"""

import jax
import jax.numpy as jnp


def sample_crop_box(key, height: int, width: int, scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision's RandomResizedCrop box sampling: returns (top, left, h, w) floats.

  Tries `attempts` (area, aspect) draws and keeps the first that fits, else the centred
  full-ratio fallback, like torchvision. `scale` may hold traced values (curriculum).
  """
  area = height * width
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  target = area * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (attempts,), minval=jnp.log(ratio[0]),
                             maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_r)
  w = jnp.round(jnp.sqrt(target * aspect))
  h = jnp.round(jnp.sqrt(target / aspect))
  ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = jnp.argmax(ok)
  any_ok = ok.any()
  # Fallback: the whole image, clamped to the ratio range.
  in_ratio = width / height
  fw = jnp.where(in_ratio < ratio[0], width, jnp.where(in_ratio > ratio[1],
                                                        jnp.round(height * ratio[1]), width))
  fh = jnp.where(in_ratio < ratio[0], jnp.round(width / ratio[0]),
                 jnp.where(in_ratio > ratio[1], height, height))
  h = jnp.where(any_ok, h[first], fh)
  w = jnp.where(any_ok, w[first], fw)
  top = jnp.floor(jax.random.uniform(k_y) * (height - h + 1))
  left = jnp.floor(jax.random.uniform(k_x) * (width - w + 1))
  return top, left, h, w


def crop_and_resize(image, box, out_size: tuple[int, int]):
  """Bilinear resize of `image[top:top+h, left:left+w]` to `out_size` (differentiable)."""
  top, left, h, w = box
  out_h, out_w = out_size
  scale = jnp.stack([out_h / h, out_w / w])
  translation = -jnp.stack([top, left]) * scale
  return jax.image.scale_and_translate(image, (out_h, out_w, image.shape[-1]), (0, 1),
                                       scale, translation, method='linear', antialias=False)


def random_resized_crop(key, image, out_size=None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop of one image (H, W, C) to `out_size` (default: the input size)."""
  height, width = image.shape[:2]
  box = sample_crop_box(key, height, width, scale, ratio)
  return crop_and_resize(image, box, out_size or (height, width))


def random_flip(key, image):
  """Horizontal flip with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def random_roll(key, image, max_shift: int):
  """The reference's "jitter": a cyclic shift by 0..`max_shift` pixels in H and in W."""
  if max_shift <= 0:
    return image
  dy, dx = jax.random.randint(key, (2,), 0, max_shift + 1)
  return jnp.roll(image, (dy, dx), axis=(0, 1))


def pad_and_crop(key, image, pad: int):
  """Zero-pad by `pad` then take a random crop of the original size (CIFAR style)."""
  height, width = image.shape[:2]
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  dy, dx = jax.random.randint(key, (2,), 0, 2 * pad + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, image.shape[-1]))


def train_augment(key, image, kind: str, pad: int = 4):
  """The squeeze-stage augmentation of one normalised image, by dataset kind."""
  k_crop, k_flip = jax.random.split(key)
  if kind == 'pad_crop_flip':
    image = pad_and_crop(k_crop, image, pad)
  elif kind == 'random_resized_crop_flip':
    image = random_resized_crop(k_crop, image)
  elif kind != 'flip':
    raise ValueError(f'Unknown augmentation {kind!r}.')
  return random_flip(k_flip, image)
