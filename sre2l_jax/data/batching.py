"""Batching primitives shared by every split: the mesh, shardings and global batches.

Batches are a pure function of (seed, step): the permutation of epoch e comes from
`numpy.random.default_rng([seed, e])`, so a resumed run reads exactly the batches an
uninterrupted run would, and every process derives the same global batch and materialises
only its own rows (`jax.make_array_from_process_local_data`). This module knows nothing of
datasets; `pipeline` (in memory) and `streaming` (record files) build their splits on it.
"""

import queue
import threading
from typing import Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def create_mesh(num_devices: int = -1) -> Mesh:
  """One-axis ('data') mesh over the first `num_devices` devices (-1: all, across hosts).

  Built from `jax.devices()` in its own order rather than by `jax.make_mesh`: make_mesh
  reorders devices by topology on TPU and by id on GPU, which can break `process_rows`'s
  assumption that process p owns the p-th block of a global batch, and it defaults to
  Explicit axes (sharding in types) where the steps are written for Auto.
  """
  devices = jax.devices()
  if num_devices not in (-1, len(devices)):
    if not 0 < num_devices <= len(devices):
      raise ValueError(f'mesh_shape={num_devices}, but {len(devices)} devices are visible.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over the 'data' axis (batches, synthetic images)."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (model weights, optimiser state)."""
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


def pad_rows(arrays, multiple: int) -> list[np.ndarray]:
  """Every array (n, ...) with its rows repeated cyclically up to the next multiple of
  `multiple` (e.g. the device count), so that a sharded batch divides; the repeats' results
  are for the caller to drop (rows n and on)."""
  n = len(arrays[0])
  index = np.arange(-(-n // multiple) * multiple) % n
  return [np.asarray(a)[index] for a in arrays]


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises unless `batch_size` (named `what` in the message) splits over the mesh."""
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


def eval_indices(num_examples: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One in-order pass: (this process's example indices, its mask) of each global batch.

  The last batch is padded up to `batch_size` with example 0; mask is float32, 1 for a real
  example and 0 for padding, so padded rows drop out of masked sums.
  """
  rows = process_rows(batch_size)
  for start in range(0, num_examples, batch_size):
    index = np.arange(start, start + batch_size)
    mask = index < num_examples
    yield np.where(mask, index, 0)[rows], mask[rows].astype(np.float32)


class TooFewPerClass(ValueError):
  """A class-balanced draw (`Split.class_balanced_subset`, `Split.candidate_batches`) asked
  for more examples of a class than the split has; the caller says what asked for them."""


def too_few_per_class(count: int, short: list[int], num_examples: int) -> TooFewPerClass:
  """The error of a class-balanced draw when classes `short` have < `count` examples."""
  return TooFewPerClass(
      f'{count} training images of every class are needed; {len(short)} classes (e.g. '
      f'{short[:10]}) have fewer among the {num_examples} training images used '
      f'(dataset.train_limit?).')


def named_draw(batches, setting: str):
  """`batches` (a `Split.candidate_batches` iterator) as they come; a split too small for the
  draw raises a ValueError naming `setting` (e.g. 'recover.rded.candidates'), to be lowered."""
  try:
    yield from batches
  except TooFewPerClass as e:
    raise ValueError(f'{setting}: {e} Lower {setting}.') from e
