"""Input pipeline: the `Split` protocol and `load_split`, its entry point.

A split is either held in host memory (`InMemorySplit`, the small datasets) or read record
by record (`streaming.StreamingSplit`, ImageNet-1K); both implement `Split`, so a stage
never asks which one it has. Batches are a pure function of (seed, step) (see `batching`).
Images stay uint8 until they reach the device; normalisation and augmentation run on device
inside the jitted step.
"""

import dataclasses
from typing import Iterator, Protocol, runtime_checkable

import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import streaming


@runtime_checkable
class Split(Protocol):
  """One split of a dataset, ready to batch: what the stages may ask of it.

  Batches are dicts of global arrays sharded like `sharding` (the mesh's 'data' axis):
  'image' uint8 (B, H, W, C), 'label' int32 (B,), and for eval batches 'mask' float32 (B,).
  """

  @property
  def num_examples(self) -> int:
    """How many examples the split uses (after `train_limit` / `test_limit`)."""

  def steps_per_epoch(self, batch_size: int) -> int:
    """Drop-remainder steps of `batch_size` in one epoch."""

  def train_batches(self, batch_size: int, seed: int, start_step: int,
                    sharding: NamedSharding) -> Iterator[dict]:
    """Endless training batches from `start_step` on, a pure function of (seed, step)."""

  def eval_batches(self, batch_size: int, sharding: NamedSharding) -> Iterator[dict]:
    """One pass in order; the last batch is padded and carries `mask` (1 real, 0 pad)."""

  def class_balanced_subset(self, num_classes: int, ipc: int,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`ipc` random examples of each class < `num_classes`, class-major, drawn with `rng`:
    images uint8 (num_classes * ipc, H, W, C), labels int32 (num_classes * ipc,)."""

  def candidate_batches(self, num_classes: int, per_class: int, rng: np.random.Generator,
                        batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`class_balanced_subset`'s draw (the same examples for the same `rng` state) in
    batches of `batch_size` (the last may be shorter), for passes that keep a little per
    example rather than the images: (images uint8 (b, H, W, C), labels int32 (b,), ids
    int64 (b,) for `take`). Only one batch is held at a time."""

  def take(self, ids) -> np.ndarray:
    """The images of examples `ids` (from `candidate_batches`), uint8 (n, H, W, C), as
    `candidate_batches` gave them."""

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """The whole split in host memory: images uint8 (N, H, W, C), labels int32 (N,).

    Raises ValueError for a split too large to hold (streamed)."""


@dataclasses.dataclass
class InMemorySplit:
  """A split held in host memory: images uint8 (N, H, W, C), labels int32 (N,)."""
  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.num_examples // batch_size

  def train_batches(self, batch_size: int, seed: int, start_step: int,
                    sharding: NamedSharding) -> Iterator[dict]:
    """Endless global batches from `start_step` on (drop-remainder epochs)."""
    def generate():
      for _, index in batching.train_indices(self.num_examples, batch_size, seed, start_step):
        yield {'image': batching.to_global(self.images[index], sharding, batch_size),
               'label': batching.to_global(self.labels[index], sharding, batch_size)}

    return batching.prefetch(generate())

  def eval_batches(self, batch_size: int, sharding: NamedSharding) -> Iterator[dict]:
    """One pass in order; the last batch is padded and carries `mask` (1 real, 0 pad)."""
    for index, mask in batching.eval_indices(self.num_examples, batch_size):
      yield {'image': batching.to_global(self.images[index], sharding, batch_size),
             'label': batching.to_global(self.labels[index], sharding, batch_size),
             'mask': batching.to_global(mask, sharding, batch_size)}

  def class_balanced_subset(self, num_classes: int, ipc: int,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`ipc` examples of each class < `num_classes`, each class's drawn without replacement
    by `rng.choice`: images uint8 (num_classes * ipc, H, W, C), labels int32, class-major."""
    index = self._balanced_index(num_classes, ipc, rng)
    return self.images[index], self.labels[index]

  def candidate_batches(self, num_classes: int, per_class: int, rng: np.random.Generator,
                        batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`class_balanced_subset`'s draw in class-major batches: (images, labels, ids)."""
    index = self._balanced_index(num_classes, per_class, rng)
    for start in range(0, len(index), batch_size):
      ids = index[start:start + batch_size]
      yield self.images[ids], self.labels[ids], ids

  def take(self, ids) -> np.ndarray:
    return self.images[np.asarray(ids, np.int64)]

  def _balanced_index(self, num_classes: int, ipc: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(self.labels, minlength=num_classes)[:num_classes]
    if (counts < ipc).any():
      raise batching.too_few_per_class(ipc, np.flatnonzero(counts < ipc).tolist(),
                                       self.num_examples)
    return np.concatenate([rng.choice(np.flatnonzero(self.labels == c), ipc, replace=False)
                           for c in range(num_classes)]).astype(np.int64)

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """The split itself: images uint8 (N, H, W, C), labels int32 (N,) (not copies)."""
    return self.images, self.labels


def load_split(config: ml_collections.ConfigDict, split: str) -> Split:
  """The split named `split` ('train' or 'test') of `config.dataset`, ready to batch."""
  spec = datasets.spec_of(config)
  name = spec.train_split if split == 'train' else spec.test_split
  limit = config.get('train_limit' if split == 'train' else 'test_limit') or None
  if not spec.in_memory:
    return streaming.StreamingSplit.create(config, spec, name, limit=limit)
  return InMemorySplit(*datasets.load_arrays(config, name, limit=limit))
