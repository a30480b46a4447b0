"""ResNet-18/50/101 in torchvision's layout (V1.5: stride on the 3x3 conv of bottlenecks).

Module names follow torchvision's state-dict names (`conv1`, `bn1`, `layer1_0/conv1`, ...,
`layer1_0/downsample_conv`, `fc`) so `sre2l_jax.models.torch_import` maps them one to one.
`stem='imagenet'`: 7x7/2 conv + 3x3/2 max-pool; `stem='small'`: 3x3/1 conv, no pool (the
CIFAR / Tiny-ImageNet variant used by SRe2L).
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sre2l_jax.models.layers import batch_norm


class BasicBlock(nn.Module):
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
    residual = x
    y = conv(self.filters, (3, 3), self.strides, padding=1, name='conv1')(x)
    y = nn.relu(batch_norm(self, y, name='bn1', train=train, dtype=self.dtype))
    y = conv(self.filters, (3, 3), padding=1, name='conv2')(y)
    y = batch_norm(self, y, name='bn2', train=train, dtype=self.dtype)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), self.strides, name='downsample_conv')(residual)
      residual = batch_norm(self, residual, name='downsample_bn', train=train, dtype=self.dtype)
    return nn.relu(residual + y)


class Bottleneck(nn.Module):
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
    residual = x
    y = conv(self.filters, (1, 1), name='conv1')(x)
    y = nn.relu(batch_norm(self, y, name='bn1', train=train, dtype=self.dtype))
    y = conv(self.filters, (3, 3), self.strides, padding=1, name='conv2')(y)
    y = nn.relu(batch_norm(self, y, name='bn2', train=train, dtype=self.dtype))
    y = conv(self.filters * 4, (1, 1), name='conv3')(y)
    y = batch_norm(self, y, name='bn3', train=train, dtype=self.dtype)
    if residual.shape != y.shape:
      residual = conv(self.filters * 4, (1, 1), self.strides, name='downsample_conv')(residual)
      residual = batch_norm(self, residual, name='downsample_bn', train=train, dtype=self.dtype)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet. Input NHWC float (normalised), output logits (N, num_classes) in float32."""
  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  width: int = 64
  stem: str = 'imagenet'  # 'imagenet' | 'small'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = nn.Conv(self.width, (7, 7), (2, 2), padding=3, use_bias=False, dtype=self.dtype,
                  name='conv1')(x)
    else:
      x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                  name='conv1')(x)
    x = nn.relu(batch_norm(self, x, name='bn1', train=train, dtype=self.dtype))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2**i, strides, dtype=self.dtype,
                           name=f'layer{i + 1}_{j}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x).astype(jnp.float32)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
