"""Students for cross-architecture evaluation: the dataset-distillation zoo of DC/DSA/MTT.

MLP, LeNet, AlexNet and VGG-11 follow the networks of the DC/DSA code (Zhao et al.), which
later methods (MTT, RDED, EDC) evaluate with; sizes scale with `width` so that width 128 (the
config default) gives the papers' sizes and a smoke run can shrink them. None of them has
BatchNorm: their `batch_stats` collection is empty (the train state carries `{}`), so they
can be students but not recover teachers. Inputs NHWC float (normalised); logits (N, C) float32.

Single-channel inputs (28 x 28 MNIST-like) get DC's extra padding on the first layer, so that
the feature maps have the sizes they have at 32 x 32.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sre2l_jax.models.layers import instance_norm


def _first_padding(x, base: int, extra: int) -> int:
  """The first layer's padding: DC pads single-channel (28 x 28) images by `extra` more."""
  return base + extra if x.shape[-1] == 1 else base


class MLP(nn.Module):
  """`depth` dense layers: depth - 1 hidden ReLU layers of `width` units, then the classifier
  (depth 3, width 128: DC's MLP)."""
  num_classes: int
  width: int = 128
  depth: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = x.astype(self.dtype).reshape((x.shape[0], -1))
    for i in range(self.depth - 1):
      x = nn.relu(nn.Dense(self.width, dtype=self.dtype, name=f'fc{i}')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


class LeNet(nn.Module):
  """LeNet-5 as in DC: conv5x5(6) - ReLU - maxpool - conv5x5(16) - ReLU - maxpool - fc 120 -
  fc 84 - classifier. Fixed sizes (the classic network has no width knob)."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = x.astype(self.dtype)
    pad = _first_padding(x, 0, 2)
    x = nn.relu(nn.Conv(6, (5, 5), padding=pad, dtype=self.dtype, name='conv0')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(16, (5, 5), padding=0, dtype=self.dtype, name='conv1')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120, dtype=self.dtype, name='fc0')(x))
    x = nn.relu(nn.Dense(84, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


class AlexNet(nn.Module):
  """AlexNet as in DC (for 32 x 32): five convs of (w, 1.5w, 2w, 1.5w, 1.5w) channels,
  max-pools after the 1st, 2nd and 5th, then the classifier; width 128 = DC's sizes."""
  num_classes: int
  width: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = x.astype(self.dtype)
    w = self.width
    layers = ((w, 5, _first_padding(x, 2, 2), True), (w * 3 // 2, 5, 2, True),
              (w * 2, 3, 1, False), (w * 3 // 2, 3, 1, False), (w * 3 // 2, 3, 1, True))
    for i, (features, kernel, pad, pool) in enumerate(layers):
      x = nn.Conv(features, (kernel, kernel), padding=pad, dtype=self.dtype,
                  name=f'conv{i}')(x)
      x = nn.relu(x)
      if pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


# VGG-11's convolutions in units of width / 2 ('M': 2x2 max-pool): width 128 gives
# 64-128-256-256-512-512-512-512, torchvision's and DC's.
_VGG11 = (1, 'M', 2, 'M', 4, 4, 'M', 8, 8, 'M', 8, 8, 'M')


class VGG11(nn.Module):
  """VGG-11 as in DC ('VGG11': instance norm after every conv), then the classifier on the
  flattened last map (1 x 1 at 32 x 32)."""
  num_classes: int
  width: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = x.astype(self.dtype)
    pad = _first_padding(x, 1, 2)
    i = 0
    for unit in _VGG11:
      if unit == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      # No bias: the instance norm after it would remove it.
      x = nn.Conv(max(1, unit * self.width // 2), (3, 3), padding=pad, use_bias=False,
                  dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(instance_norm(x, name=f'norm{i}', dtype=self.dtype))
      pad, i = 1, i + 1
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)

