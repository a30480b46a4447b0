"""Input pipeline: global batches sharded over the mesh's 'data' axis.

Batches are a pure function of (seed, step): the permutation of epoch e comes from
`numpy.random.default_rng([seed, e])`, so a resumed run reads exactly the batches an
uninterrupted run would, and every process derives the same global batch and materialises
only its own rows (`jax.make_array_from_process_local_data`). Images stay uint8 until they
reach the device; normalisation and augmentation run on device inside the jitted step.
"""

import dataclasses
import queue
import threading
from typing import Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sre2l_jax.data import datasets


def create_mesh(num_devices: int = -1) -> Mesh:
  """One-axis ('data') mesh over the first `num_devices` devices (-1: all, across hosts)."""
  devices = jax.devices()
  if num_devices not in (-1, len(devices)):
    if not 0 < num_devices <= len(devices):
      raise ValueError(f'mesh_shape={num_devices}, but {len(devices)} devices are visible.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(local: np.ndarray, sharding: NamedSharding, global_batch: int) -> jax.Array:
  """This process's rows -> one global array of `global_batch` rows sharded on 'data'."""
  return jax.make_array_from_process_local_data(sharding, local,
                                                (global_batch,) + local.shape[1:])


def process_rows(global_batch: int) -> slice:
  """The rows of a global batch that this process materialises."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch % count:
    raise ValueError(f'Global batch {global_batch} does not split over {count} processes.')
  per = global_batch // count
  return slice(index * per, (index + 1) * per)


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
  if batch_size <= 0 or batch_size % mesh.size:
    raise ValueError(f'{what}={batch_size} must be a positive multiple of the number of '
                     f'devices on the data axis ({mesh.size}).')


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs `iterator` in a background thread, `size` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except Exception as e:  # surface errors in the consumer
      q.put(e)
    q.put(sentinel)

  threading.Thread(target=worker, daemon=True).start()
  while (item := q.get()) is not sentinel:
    if isinstance(item, Exception):
      raise item
    yield item


def train_indices(num_examples: int, batch_size: int, seed: int,
                  start_step: int) -> Iterator[tuple[int, np.ndarray]]:
  """Endless (epoch, this process's example indices) of each global batch from `start_step`.

  Epoch e is `default_rng([seed, e]).permutation(num_examples)` cut into drop-remainder
  batches, so batch contents are a pure function of (seed, step).
  """
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(f'batch_size={batch_size} exceeds the {num_examples} examples.')
  rows = process_rows(batch_size)
  step = start_step
  while True:
    epoch, first = divmod(step, steps)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for i in range(first, steps):
      yield epoch, perm[i * batch_size:(i + 1) * batch_size][rows]
    step = (epoch + 1) * steps


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
      for _, index in train_indices(self.num_examples, batch_size, seed, start_step):
        yield {'image': to_global(self.images[index], sharding, batch_size),
               'label': to_global(self.labels[index], sharding, batch_size)}

    return prefetch(generate())

  def eval_batches(self, batch_size: int, sharding: NamedSharding) -> Iterator[dict]:
    """One pass in order; the last batch is padded and carries `mask` (1 real, 0 pad)."""
    rows = process_rows(batch_size)
    for start in range(0, self.num_examples, batch_size):
      index = np.arange(start, start + batch_size)
      mask = index < self.num_examples
      index = np.where(mask, index, 0)[rows]
      yield {'image': to_global(self.images[index], sharding, batch_size),
             'label': to_global(self.labels[index], sharding, batch_size),
             'mask': to_global(mask[rows].astype(np.float32), sharding, batch_size)}


def load_split(config: ml_collections.ConfigDict, split: str):
  """The split named `split` ('train' or 'test') of `config.dataset`, ready to batch."""
  spec = datasets.get_spec(config.name)
  name = spec.train_split if split == 'train' else spec.test_split
  limit = config.get('train_limit' if split == 'train' else 'test_limit') or None
  if not spec.in_memory:
    from sre2l_jax.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.StreamingSplit.create(config, spec, name, limit=limit)
  return InMemorySplit(*datasets.load_arrays(config, name, limit=limit))
