"""Several teachers as one: `Ensemble`, whose logits give the members' averaged soft labels.

G-VBSM and EDC recover from, and label with, several teachers. The ensemble's output is
  T * log(mean_i softmax(logits_i / T)),
so that softmax(output / T), what relabel/evaluate compute from any teacher at temperature T,
is exactly the average of the members' soft labels at T (the ensemble average of issue 13).
Its variables are the members' under `members_<i>` ({'params': {'members_0': ...}, ...}), and
BatchNorm inputs are sown per member (`bn_inputs/members_<i>/...`). Recover objectives sum
the members' own losses instead (`member`, `member_variables`; synthesis/sre2l.py).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Ensemble(nn.Module):
  """Members (Linen modules, same classes) applied to the same input; logits (N, C) float32
  as the module docstring says. temperature: the T of the soft labels it is averaged for."""
  members: Sequence[nn.Module]
  temperature: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    t = self.temperature
    probs = [jax.nn.softmax(m(x, train=train).astype(jnp.float32) / t, axis=-1)
             for m in self.members]
    return t * jnp.log(jnp.mean(jnp.stack(probs), axis=0) + 1e-30)


def combine_variables(variables: Sequence[dict]) -> dict:
  """The members' {'params', 'batch_stats'} -> the Ensemble's."""
  return {k: {f'members_{i}': v.get(k, {}) for i, v in enumerate(variables)}
          for k in ('params', 'batch_stats')}


def member_variables(variables: dict, i: int) -> dict:
  """Member i's {'params', 'batch_stats'} out of the Ensemble's (other entries of
  `variables`, e.g. class statistics, are left out)."""
  name = f'members_{i}'
  return {'params': variables['params'][name],
          'batch_stats': variables.get('batch_stats', {}).get(name, {})}


def member(model: Ensemble, i: int) -> nn.Module:
  """Member i as a stand-alone (unbound, unnamed) module."""
  return model.members[i].clone(parent=None, name=None)


__all__ = ['Ensemble', 'combine_variables', 'member', 'member_variables']


def sum_over_members(loss_fn, model: Ensemble, variables: dict, *args, **kwargs):
  """Sum of `loss_fn(*args, model=member_i, teacher=variables_i, **kwargs)` over the members
  (each returns (loss, metrics)): (total loss, metrics) with vector metrics (per-layer
  terms) concatenated in member order, 'accuracy' averaged, other scalars summed."""
  results = [loss_fn(*args, model=member(model, i), teacher=member_variables(variables, i),
                     **kwargs) for i in range(len(model.members))]
  total = sum(loss for loss, _ in results)
  metrics = {}
  for key in results[0][1]:
    values = [m[key] for _, m in results]
    if jnp.ndim(values[0]):
      metrics[key] = jnp.concatenate(values)
    elif key == 'accuracy':
      metrics[key] = jnp.mean(jnp.stack(values))
    else:
      metrics[key] = sum(values)
  return total, metrics
