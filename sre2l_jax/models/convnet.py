"""ConvNet-BN: the classic dataset-distillation ConvNet with BatchNorm instead of InstanceNorm.

depth x [conv3x3(width) -> BatchNorm -> ReLU -> 2x2 pool], then a linear classifier. SRe2L's
recover stage needs BatchNorm running statistics, hence BN rather than the usual InstanceNorm.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sre2l_jax.models.layers import batch_norm


class ConvNet(nn.Module):
  """ConvNet-BN. Input NHWC float (normalised), output logits (N, num_classes)."""
  num_classes: int
  width: int = 128
  depth: int = 3
  pooling: str = 'avg'  # 'avg' | 'max'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    pool = {'avg': nn.avg_pool, 'max': nn.max_pool}[self.pooling]
    for i in range(self.depth):
      x = nn.Conv(self.width, (3, 3), padding=1, dtype=self.dtype, name=f'conv{i}')(x)
      x = batch_norm(self, x, name=f'bn{i}', train=train, dtype=self.dtype)
      x = nn.relu(x)
      x = pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x).astype(jnp.float32)
