"""RDED: realistic and diverse patches of real images, scored by the teacher and stitched
(Sun, Shi, Xu, Zhang, Zhang, "On the Diversity and Realism of Distilled Dataset", CVPR 2024).

No optimisation. For each class c:
  1. `recover.rded.candidates` random real training images of c (RDED's `mipc`, 300 on
     ImageNet-1K);
  2. `recover.rded.crops` random square resized crops of each (RDED's `num_crop`, 5), of side
     ceil(H / f) with f = `recover.rded.factor`, crop area in [min_scale, max_scale] of the
     image (torchvision's RandomResizedCrop defaults: 0.08, 1);
  3. realism score of a crop = -CE(teacher(crop zero-padded to H x W, centred), c) (the
     teacher sees the crop at its stitched size, the rest of the image at the normalised
     mean, as RDED's `pad`);
  4. each candidate keeps its best crop; the ipc * f^2 candidates with the best scores are
     kept, ranked (one crop per source image);
  5. image t (t < ipc) is stitched from f x f of them: cell k = i * f + j (row i, column j)
     holds the crop ranked k * ipc + t, resized to the cell (cells are H // f, the first
     H % f rows/columns one pixel more). f = 1: the top ipc whole crops.
RDED's ImageNet-1K setting (ResNet-18 teacher, IPC 10): factor 2, 5 crops, 300 candidates.
The student then learns from the teacher's soft labels on views of the stitched images
(relabel/evaluate), like every other set here; RDED's own patch-level labels are not used.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sre2l_jax import rngs
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
# Names, not the module: `from sre2l_jax.synthesis import candidates` would import this
# package's __init__, which imports this module (a cycle).
from sre2l_jax.synthesis.candidates import class_scores
from sre2l_jax.synthesis.candidates import random_crops
from sre2l_jax.synthesis.method import Method


def validate(cfg: ml_collections.ConfigDict, spec: datasets.DatasetSpec | None = None) -> None:
  """Raises ValueError for settings RDED cannot run with."""
  del spec
  if cfg.rded.factor < 1 or cfg.rded.crops < 1:
    raise ValueError(f'recover.rded.factor={cfg.rded.factor} and recover.rded.crops='
                     f'{cfg.rded.crops} must be >= 1.')
  needed = cfg.ipc * cfg.rded.factor**2
  if cfg.rded.candidates < needed:
    raise ValueError(f'recover.rded.candidates={cfg.rded.candidates} must be at least ipc * '
                     f'rded.factor^2 = {needed} (one patch per source image).')


def patch_size(image_size: int, factor: int) -> int:
  """Side of the crops scored for factor f: the largest stitched cell, ceil(H / f)."""
  return math.ceil(image_size / factor)


def cell_bounds(size: int, factor: int) -> list[tuple[int, int]]:
  """[(start, length)] of the f cells along one side of `size` pixels: size // f each,
  the first size % f one pixel more (RDED's `mix_images`)."""
  base, extra = divmod(size, factor)
  bounds, start = [], 0
  for i in range(factor):
    length = base + (1 if i < extra else 0)
    bounds.append((start, length))
    start += length
  return bounds


def pad_to(patches, height: int, width: int):
  """Zero-pads patches (N, h, w, C) to (N, height, width, C), centred (RDED's `pad`)."""
  h, w = patches.shape[1:3]
  top, left = (height - h) // 2, (width - w) // 2
  return jnp.pad(patches, ((0, 0), (top, height - h - top), (left, width - w - left), (0, 0)))


def select(scores, count: int):
  """The best crop of each candidate, then the `count` best candidates.

  scores: (N, m) realism of crop j of candidate i. Returns (candidates (count,), crops
  (count,)) int arrays, best first: distinct candidates (one crop per source image), ties
  broken by the lower candidate index.
  """
  scores = np.asarray(scores)
  best_crop = np.argmax(scores, axis=1)
  best = scores[np.arange(len(scores)), best_crop]
  order = np.argsort(-best, kind='stable')[:count]
  return order, best_crop[order]


def stitch(patches, factor: int, ipc: int, out_shape):
  """Stitches ranked patches into `ipc` images.

  patches: (ipc * f^2, h, w, C), best first. Image t, cell k = i * f + j holds patch
  k * ipc + t resized (bilinear) to the cell (`cell_bounds`). out_shape: (H, W, C).
  Returns (ipc, H, W, C) float32.
  """
  patches = jnp.asarray(patches, jnp.float32)
  height, width, channels = out_shape
  out = jnp.zeros((ipc, height, width, channels), jnp.float32)
  rows, cols = cell_bounds(height, factor), cell_bounds(width, factor)
  for i, (top, h) in enumerate(rows):
    for j, (left, w) in enumerate(cols):
      k = i * factor + j
      cell = patches[k * ipc:(k + 1) * ipc]
      if cell.shape[1:3] != (h, w):
        cell = jax.image.resize(cell, (ipc, h, w, channels), 'linear', antialias=False)
      out = out.at[:, top:top + h, left:left + w].set(cell)
  return out


def create_scorer(model, spec: datasets.DatasetSpec, cfg, mesh):
  """Jitted (teacher, images uint8 (N, H, W, C), labels (N,), ranks (N,), key) -> (crops (N,
  m, p, p, C) normalised, scores (N, m)); N a multiple of the mesh size, sharded on 'data'.
  A candidate's crops come from fold_in(fold_in(key, label), rank), rank its place among its
  class's candidates: the same on any number of devices and in any batch."""
  height, width = spec.image_shape[:2]
  size = patch_size(min(height, width), cfg.rded.factor)

  def score(teacher, images, labels, ranks, key):
    x = datasets.normalise(images, spec)
    keys = jax.vmap(lambda c, i: jax.random.fold_in(jax.random.fold_in(key, c), i))(
        labels, ranks)
    # Square crops, each candidate's from its own key.
    crop_keys = jax.vmap(lambda k: jax.random.split(k, cfg.rded.crops))(keys)
    crops = random_crops(crop_keys, x, (size, size), (cfg.min_scale, cfg.max_scale),
                         ratio=(1.0, 1.0))
    n, m = crops.shape[:2]
    flat = pad_to(crops.reshape((n * m,) + crops.shape[2:]), height, width)
    logits = model.apply(teacher, flat, train=False)
    # Realism: -CE of the true class.
    scores = class_scores(logits, jnp.repeat(labels, m), log=True).reshape(n, m)
    return crops, scores

  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(score, in_shardings=(replicated, sharded, sharded, sharded, replicated),
                 out_shardings=(sharded, sharded))


def synthesize(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec, *, model,
               teacher, train, num_classes: int, mesh, batch_size: int = 1024) -> np.ndarray:
  """RDED's images for classes 0..num_classes-1: uint8 (num_classes, ipc, H, W, C).

  model, teacher: the frozen teacher (module, variables replicated on `mesh`); train: the
  training split (`pipeline.Split`). One pass scores the candidates as they are read
  (`Split.candidate_batches`, `batch_size` at a time) and keeps their scores only; the
  chosen ones are read again (`Split.take`) and cropped again, so the host never holds all
  num_classes * rded.candidates images. Deterministic for (config.seed, settings), whatever
  the device count.
  """
  cfg = config.recover
  validate(cfg)
  scorer = create_scorer(model, spec, cfg, mesh)
  key = rngs.stream_key(config.seed, 'rded_crops')
  sharded = batching.data_sharding(mesh)
  per_class = cfg.rded.candidates
  scores = np.zeros((num_classes, per_class, cfg.rded.crops), np.float32)
  ids = np.zeros((num_classes, per_class), np.int64)
  seen = np.zeros(num_classes, np.int64)  # each class's candidates so far: the next rank

  def run(images, labels, ranks):
    n = len(labels)
    padded = batching.pad_rows([images, labels.astype(np.int32), ranks.astype(np.int32)],
                              mesh.size)
    crops, score = scorer(teacher, *(jax.device_put(a, sharded) for a in padded), key)
    return crops, np.asarray(jax.device_get(score))[:n]  # the repeats' scores dropped

  batches = train.candidate_batches(num_classes, per_class,
                                    rngs.numpy_rng('rded_candidates', config.seed), batch_size)
  for images, labels, batch_ids in batching.named_draw(batches, 'recover.rded.candidates'):
    ranks = np.zeros(len(labels), np.int64)
    for j, c in enumerate(labels):
      ranks[j], seen[c] = seen[c], seen[c] + 1
    _, score = run(images, labels, ranks)
    scores[labels, ranks], ids[labels, ranks] = score, batch_ids
  count = cfg.ipc * cfg.rded.factor**2
  out = np.zeros((num_classes, cfg.ipc) + tuple(spec.image_shape), np.uint8)
  for c in range(num_classes):
    source, crop = select(scores[c], count)
    crops, _ = run(train.take(ids[c, source]), np.full(count, c), source)
    patches = np.asarray(jax.device_get(crops))[np.arange(count), crop]
    out[c] = datasets.denormalise(stitch(patches, cfg.rded.factor, cfg.ipc, spec.image_shape),
                                  spec)
  return out


METHOD = Method(name='rded', kind='direct', synthesize=synthesize, several_teachers=True,
                validate=validate, draws=lambda cfg: {'recover.rded.candidates':
                                                      cfg.rded.candidates})
