"""Named random streams.

Every random draw of the project comes from one of these streams, derived from the
experiment seed (and the stream's own entropy: epoch, batch, step...) by its name, so two
stages never share a stream by accident and a stream's meaning is readable at the call site.
The numbers are the streams' identities: changing one changes every result drawn from it.
"""

import jax
import numpy as np

STREAMS = {
    'recover': 1,  # recover: split into the initial images and the per-step augmentation
    'recover_measure': 2,  # recover: the fixed views on which the BN term is measured
    'recover_init_scored': 3,  # recover init 'scored': candidates and k-means (selection.py)
    'recover_init_crops': 4,  # recover init 'scored': the candidates' crops
    'rded_candidates': 5,  # recover method 'rded': the real candidates of each class
    'rded_crops': 6,  # recover method 'rded': the candidates' crops
    'coreset': 8,  # the k-means coreset baseline: k-means++ seeding
    'batch_order': 7,  # views: which images form each student batch
    'views': 0x5e1ab,  # views: crops, flips and mixing of each student batch
    'random_subset': 0xba5e,  # the class-balanced random real subset (baseline)
    'class_order': 0xc1a55,  # continual: the order in which classes arrive
    'continual_schedule': 0xc0,  # continual: the view schedule of each class step
}


def _stream_id(name: str) -> int:
  if name not in STREAMS:
    raise KeyError(f'Unknown random stream {name!r}; known: {sorted(STREAMS)}.')
  return STREAMS[name]


def key(seed: int) -> jax.Array:
  """The typed root key of `seed` (the same bits as the legacy `PRNGKey(seed)`)."""
  return jax.random.key(seed)


def stream_key(seed: int, name: str) -> jax.Array:
  """A typed JAX key for stream `name` of experiment seed `seed`."""
  return jax.random.fold_in(key(seed), _stream_id(name))


def numpy_rng(name: str, *entropy: int) -> np.random.Generator:
  """A NumPy generator for stream `name`, seeded by `entropy` (e.g. seed, epoch)."""
  return np.random.default_rng([*(int(e) for e in entropy), _stream_id(name)])
