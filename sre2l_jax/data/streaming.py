"""Streaming input for datasets too large for host RAM (ImageNet-1K).

Records are read from TFDS's ArrayRecord files by random access, then decoded and cropped
on the host, a batch at a time in a thread pool (two threads per core, `decode_threads`).
Like every `pipeline.Split`, a batch is a pure function of (seed, step): epoch e's
permutation comes from
`numpy.random.default_rng([seed, e])` and the crop of example i in epoch e from
`numpy.random.default_rng([seed, e, i])`, so neither thread scheduling nor a restart
changes what a step sees. Each process decodes only its own rows of a global
batch. Training crops are returned as uint8; the flip runs on device.
"""

import concurrent.futures
import dataclasses
import math
import os
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from PIL import Image

from sre2l_jax.data import batching
from sre2l_jax.data import datasets


def sample_crop_box(rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: (top, left, h, w) of one image."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(image, np.uint8)
  return array[..., None] if channels == 1 else array


def random_resized_crop(image: np.ndarray, rng: np.random.Generator,
                        out_shape: Sequence[int]) -> np.ndarray:
  """uint8 (h, w, C) -> uint8 out_shape (H, W, C): RandomResizedCrop, PIL bilinear."""
  top, left, h, w = sample_crop_box(rng, *image.shape[:2])
  out_h, out_w = out_shape[:2]
  crop = _to_pil(image).resize((out_w, out_h), Image.BILINEAR,
                               box=(left, top, left + w, top + h))
  return _from_pil(crop, image.shape[-1])


def center_crop(image: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
  """uint8 (h, w, C) -> uint8 out_shape (H, W, C): resize the shorter side to 256*H/224
  (torchvision's Resize), then the centred (H, W) crop (CenterCrop)."""
  out_h, out_w = out_shape[:2]
  height, width = image.shape[:2]
  short = int(round(256 * out_h / 224))
  if height <= width:
    new_h, new_w = short, int(short * width / height)
  else:
    new_h, new_w = int(short * height / width), short
  resized = _from_pil(_to_pil(image).resize((new_w, new_h), Image.BILINEAR), image.shape[-1])
  top = int(round((new_h - out_h) / 2.0))
  left = int(round((new_w - out_w) / 2.0))
  return resized[top:top + out_h, left:left + out_w]


def decode_threads() -> int:
  """Decoding threads for this process: two per core it may run on (its CPU affinity: a
  SLURM task's --cpus-per-task, a whole TPU VM host), no fixed cap. Threads, not worker
  processes: Pillow releases the GIL in its C decoding and resizing, and a batch stays a
  pure function of (seed, step), with no iterator state beyond the step that the stages
  checkpoint already. How far threads scale on a many-core host is not measured yet
  (benchmarks/input_pipeline.py; the README's Data section)."""
  return 2 * len(os.sched_getaffinity(0))


@dataclasses.dataclass
class StreamingSplit:
  """A split read record by record from a TFDS data source (`as_data_source`).

  source: random-access records {'image': uint8 (h, w, C) of any size, 'label': int}
  (`source[i]`, and `source.__getitems__(indices)` for many at once).
  num_examples: how many of the first records are used. image_shape: (H, W, C) of batches.
  name: what the split is called in messages.
  """
  source: Any
  num_examples: int
  image_shape: tuple[int, int, int]
  num_threads: int = 16
  name: str = 'a streamed split'
  _pool: concurrent.futures.ThreadPoolExecutor | None = dataclasses.field(
      default=None, init=False, repr=False)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
             split_name: str, limit: int | None = None,
             num_threads: int | None = None) -> 'StreamingSplit':
    """Prepares the dataset if needed and opens split `split_name` (first `limit` records)."""
    source = datasets.prepare(config).as_data_source(split=split_name)
    n = len(source) if not limit else min(limit, len(source))
    return cls(source, n, tuple(spec.image_shape), num_threads or decode_threads(),
               name=f"{spec.name}'s {split_name!r} split")

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.num_examples // batch_size

  def _map(self, fn, items) -> list:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads,
                                                         thread_name_prefix='decode')
    return list(self._pool.map(fn, items))

  @staticmethod
  def _decode(record) -> tuple[np.ndarray, int]:
    image = np.asarray(record['image'], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    return image, int(record['label'])

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    return self._decode(self.source[int(index)])

  def read(self, indices) -> list[tuple[np.ndarray, int]]:
    """Records `indices` in one random-access read: [(uint8 (h, w, C) as stored, label)]."""
    return [self._decode(r) for r in self.source.__getitems__([int(i) for i in indices])]

  def _train_example(self, seed: int, epoch: int, index: int) -> tuple[np.ndarray, int]:
    image, label = self._read(index)
    rng = np.random.default_rng([seed, epoch, int(index)])
    return random_resized_crop(image, rng, self.image_shape), label

  def _eval_example(self, index: int) -> tuple[np.ndarray, int]:
    image, label = self._read(index)
    return center_crop(image, self.image_shape), label

  @staticmethod
  def _stack(examples) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*examples)
    return np.stack(images), np.asarray(labels, np.int32)

  def train_batches(self, batch_size: int, seed: int, start_step: int,
                    sharding: NamedSharding) -> Iterator[dict]:
    """Endless global batches from `start_step` on (drop-remainder epochs).

    Yields {'image': uint8 (B, H, W, C), 'label': int32 (B,)}, sharded on 'data'.
    """
    indices = batching.train_indices(self.num_examples, batch_size, seed, start_step)

    def generate():
      for epoch, index in indices:
        images, labels = self._stack(
            self._map(lambda j, e=epoch: self._train_example(seed, e, j), index))
        yield {'image': batching.to_global(images, sharding, batch_size),
               'label': batching.to_global(labels, sharding, batch_size)}

    return batching.prefetch(generate())

  def eval_batches(self, batch_size: int, sharding: NamedSharding) -> Iterator[dict]:
    """One pass in order, centre crops; the last batch is padded and carries `mask`.

    Yields {'image': uint8 (B, H, W, C), 'label': int32 (B,), 'mask': float32 (B,)}.
    """
    def generate():
      for index, mask in batching.eval_indices(self.num_examples, batch_size):
        images, labels = self._stack(self._map(self._eval_example, index))
        yield {'image': batching.to_global(images, sharding, batch_size),
               'label': batching.to_global(labels, sharding, batch_size),
               'mask': batching.to_global(mask, sharding, batch_size)}

    return batching.prefetch(generate())

  def class_balanced_subset(self, num_classes: int, ipc: int, rng: np.random.Generator,
                            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """`ipc` random examples of each class < `num_classes`, centre-cropped like the test
    images: images uint8 (num_classes * ipc, H, W, C), labels int32, class-major (within a
    class in reading order); the examples of `candidate_batches`."""
    images, labels = [], []
    for batch_images, batch_labels, _ in self.candidate_batches(num_classes, ipc, rng, chunk,
                                                                chunk):
      images.append(batch_images)
      labels.append(batch_labels)
    labels = np.concatenate(labels)
    order = np.argsort(labels, kind='stable')
    return np.concatenate(images)[order], labels[order]

  def candidate_batches(self, num_classes: int, per_class: int, rng: np.random.Generator,
                        batch_size: int, chunk: int = 1024
                        ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`per_class` random examples of each class < `num_classes`, in batches of
    `batch_size` in reading order: (images uint8 (b, H, W, C) centre-cropped, labels int32
    (b,), record ids int64 (b,)).

    Records are read `chunk` at a time in the order `rng.permutation(num_examples)` until
    every class has `per_class`; labels come with the records, so only a little more than
    num_classes * per_class are read, never the whole split, and the host holds one chunk
    and one batch, whatever num_classes * per_class is.
    """
    counts = np.zeros(num_classes, np.int64)
    missing = num_classes * per_class
    order = rng.permutation(self.num_examples)
    pending = []
    for start in range(0, len(order), chunk):
      ids = order[start:start + chunk]
      for record_id, (image, label) in zip(ids, self.read(ids)):
        if label < num_classes and counts[label] < per_class:
          counts[label] += 1
          missing -= 1
          pending.append((center_crop(image, self.image_shape), label, int(record_id)))
          if len(pending) == batch_size:
            yield self._candidates(pending)
            pending = []
      if not missing:
        break
    if missing:
      short = np.flatnonzero(counts < per_class).tolist()
      raise batching.too_few_per_class(per_class, short, self.num_examples)
    if pending:
      yield self._candidates(pending)

  @staticmethod
  def _candidates(pending) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels, ids = zip(*pending)
    return np.stack(images), np.asarray(labels, np.int32), np.asarray(ids, np.int64)

  def take(self, ids) -> np.ndarray:
    """Records `ids` centre-cropped (as `candidate_batches` gave them): uint8 (n, H, W, C)."""
    return np.stack([center_crop(image, self.image_shape) for image, _ in self.read(ids)])

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """Always raises: a streamed split is too large to hold in host memory."""
    raise ValueError(
        f'This needs a dataset held in memory (the whole split as arrays); {self.name} is '
        f'streamed record by record because it does not fit in host memory.')
