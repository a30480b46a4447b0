"""Layers shared by the model zoo."""

from typing import Any, Iterator

import flax.linen as nn
import jax.numpy as jnp

# Collection that holds the input of every BatchNorm layer when the caller marks it mutable.
# Nobody asks for it during squeeze or evaluation, so the sow is a no-op there (nothing is
# stored or computed); the recover stage asks for it to match the batch statistics of those
# inputs to the running statistics.
BN_INPUTS = 'bn_inputs'


def batch_norm(module: nn.Module, x: jnp.ndarray, *, name: str, train: bool,
               dtype: Any = jnp.float32, momentum: float = 0.9,
               epsilon: float = 1e-5) -> jnp.ndarray:
  """BatchNorm over (N, H, W) of `x` that sows its input under `bn_inputs/.../<name>_input`.

  Call it from `module`'s compact method: the BatchNorm submodule and the sown value belong
  to `module`. `momentum=0.9`, `epsilon=1e-5` equal PyTorch's BatchNorm2d defaults.
  """
  # A variable may not share its name with a submodule, hence the suffix.
  module.sow(BN_INPUTS, f'{name}_input', x, init_fn=lambda: None,
             reduce_fn=lambda _, new: new)
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      dtype=dtype, name=name)(x)


def iter_in_call_order(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
  """Yields (path, leaf) of a nested dict in insertion order.

  Flax fills a mutable collection as the layers run, so insertion order is call order;
  `jax.tree_util` would sort the keys instead. Use on the `bn_inputs` collection returned by
  `apply` *inside* the traced function (a jit boundary would re-sort it).
  """
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      yield from iter_in_call_order(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def instance_norm(x: jnp.ndarray, *, name: str, dtype: Any = jnp.float32) -> jnp.ndarray:
  """Instance norm with a per-channel affine, as DC's GroupNorm(C, C): each image's each
  channel normalised over (H, W), eps 1e-5; no running statistics. Call it inside a compact
  method (the GroupNorm belongs to the calling module)."""
  return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, dtype=dtype, name=name)(x)
