"""Relabel: FKD-style soft labels for every augmented view of every synthetic image.

The view of batch b in epoch e (which images, their crops and flips, the CutMix/MixUp
lambda, box and partner permutation) is a pure function of (seed, e, b): nothing about
crops is stored, and replay is exact by construction. Two modes give the same labels:
  online  the teacher runs inside the student's step (nothing stored);
  stored  the teacher's logits on each view are written once, compressed ('float32',
          'float16' or 'topk' probabilities + indices), in sharded files with SHA-256
          checksums and a manifest; evaluate reads them back.
"""

import dataclasses
import functools
import hashlib
import io
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import export
from sre2l_jax import recover
from sre2l_jax import squeeze
from sre2l_jax.data import augment
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline

MANIFEST = 'manifest.json'


class LabelError(ValueError):
  """Stored labels are missing, corrupted, or were made for other images or settings."""


# ----------------------------------------------------------------------------- schedule


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which images form batch b of epoch e. Epochs are padded by wrapping around so every
  batch has `batch_size` images (one compiled step) and every image is seen each epoch."""
  num_images: int
  batch_size: int
  epochs: int
  seed: int

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_images // self.batch_size)

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch

  def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
    order = np.random.default_rng([self.seed, epoch, 7]).permutation(self.num_images)
    order = np.resize(order, self.steps_per_epoch * self.batch_size)
    return order[batch * self.batch_size:(batch + 1) * self.batch_size]

  def view_key(self, epoch: int, batch: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), 0x5e1ab)
    return jax.random.fold_in(jax.random.fold_in(key, epoch), batch)


def make_schedule(config, num_images: int) -> Schedule:
  batch = min(config.relabel.batch_size, num_images)
  return Schedule(num_images, batch, config.relabel.epochs, config.seed)


# ----------------------------------------------------------------------------- views


def cutmix_mask(key, lam, height: int, width: int):
  """Box mask (H, W) of the CutMix region and the lambda corrected to its clipped area."""
  k_y, k_x = jax.random.split(key)
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.floor(height * cut), jnp.floor(width * cut)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return mask, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def make_views(key, images_u8, *, cfg, spec):
  """The augmented, mixed views of one batch.

  images_u8: (B, H, W, C) uint8. Returns (views (B, H, W, C) normalised float32,
  lam () float32, partner (B,) int32): view i mixes image i (weight lam) with image
  partner[i] (weight 1 - lam), as the targets of the hard-label variant need.
  """
  x = datasets.normalise(images_u8, spec)
  b, h, w = x.shape[:3]
  k_crop, k_flip, k_lam, k_perm, k_box, k_apply = jax.random.split(key, 6)
  scale = (cfg.min_scale, cfg.max_scale)
  x = jax.vmap(lambda k, im: augment.random_resized_crop(k, im, (h, w), scale))(
      jax.random.split(k_crop, b), x)
  x = jax.vmap(augment.random_flip)(jax.random.split(k_flip, b), x)
  partner = jax.random.permutation(k_perm, b).astype(jnp.int32)
  apply = jax.random.uniform(k_apply) < cfg.mix_prob
  if cfg.mix == 'cutmix':
    lam = jax.random.beta(k_lam, cfg.cutmix_alpha, cfg.cutmix_alpha)
    mask, lam = cutmix_mask(k_box, lam, h, w)
    mixed = jnp.where(mask[None, :, :, None], x[partner], x)
  elif cfg.mix == 'mixup':
    lam = jax.random.beta(k_lam, cfg.mixup_alpha, cfg.mixup_alpha)
    mixed = lam * x + (1 - lam) * x[partner]
  elif cfg.mix == 'none':
    lam, mixed = jnp.float32(1.0), x
  else:
    raise ValueError(f"relabel.mix={cfg.mix!r}; valid: 'cutmix', 'mixup', 'none'.")
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  return jnp.where(apply, mixed, x), lam, partner


def teacher_logits(teacher, views, *, model):
  return model.apply(teacher, views, train=False)


# ----------------------------------------------------------------------------- storage


VIEW_KEYS = ('min_scale', 'max_scale', 'mix', 'cutmix_alpha', 'mixup_alpha', 'mix_prob')


def view_settings(cfg) -> dict:
  """The relabel settings that, with the schedule, fix every view (stored in the manifest)."""
  return {k: cfg[k] for k in VIEW_KEYS}


def compress(logits: np.ndarray, storage: str, topk: int, temperature: float) -> dict:
  """Logits (..., C) float32 -> the arrays that are stored."""
  if storage == 'float32':
    return {'logits': logits.astype(np.float32)}
  if storage == 'float16':
    return {'logits': logits.astype(np.float16)}
  if storage == 'topk':
    probs = np.asarray(jax.nn.softmax(logits / temperature, axis=-1))
    index = np.argsort(-probs, axis=-1)[..., :topk]
    dtype = np.uint8 if logits.shape[-1] <= 256 else np.uint16
    return {'topk_probs': np.take_along_axis(probs, index, -1).astype(np.float16),
            'topk_index': index.astype(dtype)}
  raise ValueError(f"relabel.storage={storage!r}; valid: 'float32', 'float16', 'topk'.")


def targets_from_stored(stored: dict, num_classes: int, temperature: float):
  """Stored arrays (..., k or C) -> target distributions (..., C) float32 at `temperature`.

  top-k: the stored probabilities, the remaining mass spread evenly over the other classes.
  """
  if 'logits' in stored:
    return jax.nn.softmax(stored['logits'].astype(jnp.float32) / temperature, axis=-1)
  probs = stored['topk_probs'].astype(jnp.float32)
  index = stored['topk_index'].astype(jnp.int32)
  k = probs.shape[-1]
  rest = jnp.clip(1.0 - probs.sum(-1, keepdims=True), 0.0, 1.0) / max(num_classes - k, 1)
  full = jnp.broadcast_to(rest, probs.shape[:-1] + (num_classes,))
  onehots = jax.nn.one_hot(index, num_classes)  # (..., k, C)
  return full * (1 - onehots.sum(-2)) + jnp.einsum('...k,...kc->...c', probs, onehots)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def images_digest(images: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def _write_shard(path: str, arrays: dict) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(buffer.getvalue())
  os.replace(tmp, path)


class StoredLabels:
  """Reads a label directory written by `write_labels`, verifying every shard's checksum."""

  def __init__(self, directory: str, manifest: dict):
    self.directory, self.manifest = directory, manifest
    self._cache = (None, None)

  @classmethod
  def open(cls, directory: str, images: np.ndarray, schedule: Schedule,
           temperature: float, view: dict | None = None) -> 'StoredLabels':
    """`view`: `view_settings` of the relabel config that will replay the views (checked
    against the labels' when given: other crops or mixing would get the wrong labels)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
      raise LabelError(f'No stored labels at {directory}. Produce them with: python -m '
                       f'sre2l_jax.main --config=<config> --workdir=<workdir> '
                       f'--stages=relabel (with relabel.mode=stored).')
    manifest = checkpoint.read_json(path)
    problems = []
    if manifest['images_sha256'] != images_digest(images):
      problems.append('they were made for other images (the distilled set changed)')
    for key, value in (('num_images', schedule.num_images),
                       ('batch_size', schedule.batch_size), ('epochs', schedule.epochs),
                       ('seed', schedule.seed)):
      if manifest[key] != value:
        problems.append(f'{key} is {manifest[key]} in the labels but {value} now')
    for key, value in (view or {}).items():
      if manifest['view'].get(key) != value:
        problems.append(f'view setting {key} is {manifest["view"].get(key)!r} in the labels '
                        f'but {value!r} now')
    if manifest['storage'] == 'topk' and manifest['temperature'] != temperature:
      problems.append(f'top-k labels were made at temperature {manifest["temperature"]}, '
                      f'evaluate uses {temperature}')
    if problems:
      raise LabelError(f'The labels in {directory} do not match: {"; ".join(problems)}. '
                       f'Re-run --stages=relabel on this workdir after removing {directory}.')
    if not manifest.get('complete'):
      raise LabelError(f'The labels in {directory} are incomplete (the relabel run did not '
                       f'finish). Re-run --stages=relabel on this workdir: it resumes from '
                       f'the last finished shard.')
    return cls(directory, manifest)

  def shard_for(self, epoch: int) -> dict:
    for shard in self.manifest['shards']:
      if shard['epochs'][0] <= epoch < shard['epochs'][1]:
        return shard
    raise LabelError(f'No label shard covers epoch {epoch} in {self.directory}.')

  def epoch(self, epoch: int) -> dict:
    """Stored arrays of one epoch, each (steps_per_epoch, batch, k or C)."""
    shard = self.shard_for(epoch)
    if self._cache[0] != shard['file']:
      path = os.path.join(self.directory, shard['file'])
      if not os.path.exists(path):
        raise LabelError(f'Label shard {path} is missing. Re-run --stages=relabel after '
                         f'removing {self.directory}.')
      if _sha256(path) != shard['sha256']:
        raise LabelError(f'Label shard {path} is corrupted or truncated (SHA-256 mismatch). '
                         f'Re-run --stages=relabel after removing {self.directory}.')
      with np.load(path) as data:
        self._cache = (shard['file'], {k: data[k] for k in data.files})
    arrays = self._cache[1]
    return {k: v[epoch - shard['epochs'][0]] for k, v in arrays.items()}


def write_labels(directory: str, images: np.ndarray, schedule: Schedule, cfg, spec,
                 model, teacher, mesh, temperature: float) -> dict:
  """Runs the teacher on every view of the schedule and stores its outputs; resumable at
  shard granularity (finished shards listed in the manifest are kept)."""
  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, MANIFEST)
  manifest = {'storage': cfg.storage, 'topk': cfg.topk if cfg.storage == 'topk' else None,
              'temperature': temperature, 'num_images': schedule.num_images,
              'batch_size': schedule.batch_size, 'epochs': schedule.epochs,
              'steps_per_epoch': schedule.steps_per_epoch, 'seed': schedule.seed,
              'num_classes': spec.num_classes, 'images_sha256': images_digest(images),
              'view': view_settings(cfg), 'shards': []}
  if os.path.exists(manifest_path):
    old = checkpoint.read_json(manifest_path)
    if {k: v for k, v in old.items() if k not in ('shards', 'complete', 'bytes')} == {
        k: v for k, v in manifest.items() if k != 'shards'}:
      # Keep the finished shards up to the first missing or damaged one: shards after a
      # gap would otherwise hide it (relabel resumes after the last kept shard).
      for s in old['shards']:
        path = os.path.join(directory, s['file'])
        end = manifest['shards'][-1]['epochs'][1] if manifest['shards'] else 0
        if (s['epochs'][0] != end or not os.path.exists(path)
            or _sha256(path) != s['sha256']):
          break
        manifest['shards'].append(s)
  done = max([s['epochs'][1] for s in manifest['shards']], default=0)

  sharded, replicated = pipeline.data_sharding(mesh), pipeline.replicated(mesh)
  views_fn = jax.jit(functools.partial(make_views, cfg=cfg, spec=spec),
                     in_shardings=(replicated, sharded), out_shardings=(sharded, replicated,
                                                                        replicated))
  logits_fn = jax.jit(functools.partial(teacher_logits, model=model),
                      in_shardings=(replicated, sharded), out_shardings=replicated)
  per_shard = max(1, cfg.epochs_per_shard)
  for first in range(done, schedule.epochs, per_shard):
    last = min(schedule.epochs, first + per_shard)
    outputs = []
    for epoch in range(first, last):
      epoch_outputs = []
      for b in range(schedule.steps_per_epoch):
        batch = jax.device_put(images[schedule.batch_indices(epoch, b)], sharded)
        views, _, _ = views_fn(schedule.view_key(epoch, b), batch)
        epoch_outputs.append(logits_fn(teacher, views))
      # Fetched per epoch: a whole shard of pending device results at once has crashed
      # XLA's CPU runtime (jaxlib 0.10.2, 8 host devices).
      outputs.append(np.stack(jax.device_get(epoch_outputs)))
    logits = np.asarray(outputs, np.float32).reshape(
        (last - first, schedule.steps_per_epoch, schedule.batch_size, spec.num_classes))
    name = f'labels_{first:06d}_{last:06d}.npz'
    path = os.path.join(directory, name)
    if jax.process_index() == 0:
      _write_shard(path, compress(logits, cfg.storage, cfg.topk, temperature))
      manifest['shards'].append({'file': name, 'epochs': [first, last],
                                 'sha256': _sha256(path), 'bytes': os.path.getsize(path)})
      checkpoint.write_json(manifest_path, manifest)
  manifest['bytes'] = sum(s['bytes'] for s in manifest['shards'])
  manifest['complete'] = True
  checkpoint.write_json(manifest_path, manifest)
  return manifest


# ----------------------------------------------------------------------------- sets


def distilled_set(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """The recovered images (uint8, class-major) and labels, or a clear error."""
  directory = recover.distilled_dir(workdir)
  if not os.path.exists(directory):
    raise FileNotFoundError(
        f'No distilled set in {directory}. Run the recover stage first: python -m '
        f'sre2l_jax.main --config=<config> --workdir={workdir} --stages=recover')
  return export.read_tfds(export.tfds_dataset_dir(directory))


def random_subset(config, ipc: int) -> tuple[np.ndarray, np.ndarray]:
  """A class-balanced random subset of real training images (the same-protocol baseline),
  of the classes the recover stage covers: images uint8 (C * ipc, H, W, C), labels int32."""
  spec = datasets.get_spec(config.dataset.name)
  num_classes = recover.recovered_classes(config.recover, spec)
  train = pipeline.load_split(config.dataset, 'train')
  rng = np.random.default_rng([config.seed, 0xba5e])
  if not isinstance(train, pipeline.InMemorySplit):
    return _streaming_subset(train, num_classes, ipc, rng)
  index = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), ipc, replace=False)
                          for c in range(num_classes)])
  return train.images[index], train.labels[index]


def _streaming_subset(split, num_classes: int, ipc: int, rng, chunk: int = 1024):
  """`random_subset` of a split too large for memory (ImageNet): records are read in a
  random order until every class has `ipc` (labels come with the records, so only a little
  more than num_classes * ipc are read), and the chosen ones centre-cropped to the models'
  input like the test images."""
  from sre2l_jax.data import streaming  # pylint: disable=g-import-not-at-top
  chosen = {c: [] for c in range(num_classes)}
  missing = num_classes * ipc
  order = rng.permutation(split.num_examples)
  for start in range(0, len(order), chunk):
    for record in split.source.__getitems__([int(i) for i in order[start:start + chunk]]):
      label, image = int(record['label']), np.asarray(record['image'], np.uint8)
      if label < num_classes and len(chosen[label]) < ipc:
        chosen[label].append(streaming.center_crop(image, split.image_shape))
        missing -= 1
    if not missing:
      break
  if missing:
    short = [c for c in range(num_classes) if len(chosen[c]) < ipc]
    raise ValueError(
        f'The random-subset baseline needs {ipc} training images of every class; '
        f'{len(short)} classes (e.g. {short[:10]}) have fewer among the {split.num_examples} '
        f'training images used (dataset.train_limit?). Remove "random" from '
        f'evaluate.baselines to skip the baseline.')
  images = np.stack([image for c in range(num_classes) for image in chosen[c]])
  return images, np.repeat(np.arange(num_classes), ipc).astype(np.int32)


def image_sets(config, workdir: str) -> dict:
  """{'distilled': (images, labels), 'random': (images, labels)} as evaluate uses them."""
  sets = {'distilled': distilled_set(workdir)}
  if 'random' in config.evaluate.baselines.split(','):
    sets['random'] = random_subset(config, config.recover.ipc)
  return sets


def label_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, 'relabel', name)


def validate(config) -> None:
  cfg = config.relabel
  if cfg.mode not in ('online', 'stored'):
    raise ValueError(f"relabel.mode={cfg.mode!r}; valid: 'online', 'stored'.")
  if cfg.epochs <= 0 or cfg.batch_size <= 0:
    raise ValueError(f'relabel.epochs and relabel.batch_size must be positive; got '
                     f'{cfg.epochs}, {cfg.batch_size}.')
  if cfg.storage == 'topk' and not 0 < cfg.topk:
    raise ValueError(f'relabel.topk={cfg.topk} must be positive.')
  compress(np.zeros((1, 2), np.float32), cfg.storage, 1, 1.0)  # validates the name


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stored mode: writes `workdir/relabel/<set>/` for the distilled set and each baseline.
  Online mode: records that labels come from the teacher at training time."""
  validate(config)
  start = time.time()
  spec = datasets.get_spec(config.dataset.name)
  sets = image_sets(config, workdir)
  result = {'stage': 'relabel', 'mode': config.relabel.mode, 'sets': {}}
  if config.relabel.mode == 'stored':
    mesh = pipeline.create_mesh(config.mesh_shape)
    model, teacher = squeeze.load_teacher(config, workdir, mesh)
    for name, (images, _) in sets.items():
      schedule = make_schedule(config, len(images))
      pipeline.check_batch_size(schedule.batch_size, mesh, 'relabel.batch_size')
      manifest = write_labels(label_dir(workdir, name), images, schedule, config.relabel,
                              spec, model, teacher, mesh, config.evaluate.temperature)
      result['sets'][name] = {'label_bytes': manifest['bytes'],
                              'image_bytes': int(images.nbytes),
                              'storage': manifest['storage'], 'topk': manifest['topk']}
      logging.info('relabel: %s labels %d bytes (%s)', name, manifest['bytes'],
                   manifest['storage'])
  result['wall_seconds'] = time.time() - start
  checkpoint.write_json(os.path.join(workdir, 'relabel', 'result.json'), result)
  return result
