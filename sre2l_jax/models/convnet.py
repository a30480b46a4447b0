"""ConvNet: the classic dataset-distillation ConvNet, with BatchNorm (teachers) or InstanceNorm.

depth x [conv3x3(width) -> norm -> ReLU -> 2x2 pool], then a linear classifier. SRe2L's
recover stage needs BatchNorm running statistics, hence BN for teachers ('convnet');
'convnet_in' (norm='instance') is the DC/DSA/MTT evaluation standard (no running statistics).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sre2l_jax.models.layers import batch_norm
from sre2l_jax.models.layers import instance_norm


class ConvNet(nn.Module):
  """ConvNet. Input NHWC float (normalised), output logits (N, num_classes).

  norm: 'batch' (BatchNorm, layers `bn{i}`) | 'instance' (layers `norm{i}`) | 'none'.
  """
  num_classes: int
  width: int = 128
  depth: int = 3
  pooling: str = 'avg'  # 'avg' | 'max'
  norm: str = 'batch'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    pool = {'avg': nn.avg_pool, 'max': nn.max_pool}[self.pooling]
    for i in range(self.depth):
      # Instance norm removes a conv bias (zero gradient, which Adam would turn into noise);
      # 'batch' keeps it for the checkpoints of existing teachers.
      x = nn.Conv(self.width, (3, 3), padding=1, use_bias=self.norm != 'instance',
                  dtype=self.dtype, name=f'conv{i}')(x)
      if self.norm == 'batch':
        x = batch_norm(self, x, name=f'bn{i}', train=train, dtype=self.dtype)
      elif self.norm == 'instance':
        x = instance_norm(x, name=f'norm{i}', dtype=self.dtype)
      elif self.norm != 'none':
        raise ValueError(f"ConvNet norm={self.norm!r}; valid: 'batch', 'instance', 'none'.")
      x = nn.relu(x)
      x = pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x).astype(jnp.float32)
