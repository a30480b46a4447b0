"""Stored soft labels: the teacher's outputs on every view, compressed, in checksummed shards.

A label directory holds `manifest.json` (what the labels were made for: image digest,
schedule, view settings, storage, temperature; the shards with their SHA-256) and shards
`labels_<first>_<last>.npz` of whole epochs. Storage is 'float32' or 'float16' logits, or
'topk' probabilities + class indices. `StoredLabels.open` refuses labels made for other
images or settings, and `verify` checks every shard before a student trains on them.
"""

import functools
import hashlib
import io
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sre2l_jax import checkpoint
from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import views
from sre2l_jax.data import batching

MANIFEST = 'manifest.json'
TEACHER_KEY = 'teacher_sha256'
MODES = ('online', 'stored')
STORAGES = ('float32', 'float16', 'topk')


class LabelError(ValueError):
  """Stored labels are missing, corrupted, or were made for other images or settings."""


def storage_name(cfg) -> str:
  """'float32', 'float16' or 'topk<k>' (cfg: the relabel config)."""
  return f'topk{cfg.topk}' if cfg.storage == 'topk' else cfg.storage


def label_dir(config, workdir: str, name: str) -> str:
  """Where the stored labels of image set `name` under `config`'s settings live:
  `workdir/relabel/<name>/<storage>-<digest of its record>` (`fingerprints.TABLE['labels']`),
  so labels of other settings (another storage, schedule, views) sit beside them instead of
  replacing them."""
  return os.path.join(workdir, 'relabel', name,
                      f'{storage_name(config.relabel)}-'
                      f'{fingerprints.digest(fingerprints.record("labels", config))}')


def validate(cfg) -> None:
  """Clear errors for relabel settings that cannot run (cfg: the relabel config)."""
  if cfg.mode not in MODES:
    raise ValueError(f'relabel.mode={cfg.mode!r}; valid: {", ".join(MODES)}.')
  views.validate(cfg)
  if cfg.storage not in STORAGES:
    raise ValueError(f'relabel.storage={cfg.storage!r}; valid: {", ".join(STORAGES)}.')
  if cfg.storage == 'topk' and not 0 < cfg.topk:
    raise ValueError(f'relabel.topk={cfg.topk} must be positive.')
  if not 0 < cfg.epochs_per_shard:
    raise ValueError(f'relabel.epochs_per_shard={cfg.epochs_per_shard} must be positive.')


def teacher_logits(teacher, images, *, model):
  """The frozen teacher's logits (B, C) on normalised images (B, H, W, C)."""
  return model.apply(teacher, images, train=False)


def create_teacher_logits(model, teacher, mesh):
  """Jitted views (B, H, W, C) sharded on 'data' -> the teacher's logits (B, C) replicated
  (what `write_labels` stores); the teacher is an argument, not a constant."""
  fn = jax.jit(functools.partial(teacher_logits, model=model),
               in_shardings=(batching.replicated(mesh), batching.data_sharding(mesh)),
               out_shardings=batching.replicated(mesh))
  return functools.partial(fn, teacher)


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
  raise ValueError(f'relabel.storage={storage!r}; valid: {", ".join(STORAGES)}.')


def logits_from_stored(stored: dict):
  """Stored arrays (..., C) -> the teacher's logits float32 (float32 / float16 storage)."""
  if 'logits' not in stored:
    raise ValueError('These stored labels keep top-k probabilities, not the teacher\'s '
                     'logits: evaluate.loss=\'mse_ce\' needs relabel.storage float32 or '
                     'float16, or relabel.mode=online.')
  return stored['logits'].astype(jnp.float32)


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


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with files.open_file(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def images_digest(images: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def _write_shard(path: str, arrays: dict) -> bytes:
  """Writes `arrays` as an .npz file; returns its bytes (checksummed without reading the
  file back, which in a bucket is a download)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files.atomic_write(path, buffer.getvalue())
  return buffer.getvalue()


class StoredLabels:
  """Reads a label directory written by `write_labels`, verifying every shard's checksum."""

  def __init__(self, directory: str, manifest: dict):
    self.directory, self.manifest = directory, manifest
    self._cache = (None, None)

  @classmethod
  def open(cls, directory: str, images: np.ndarray, schedule: views.Schedule,
           temperature: float, view: dict | None = None,
           teacher_digest: str | None = None) -> 'StoredLabels':
    """`view`: `views.view_settings` of the relabel config that will replay the views
    (checked against the labels' when given: other crops or mixing get the wrong labels);
    `teacher_digest`: the teacher's (`teacher.digest`), checked against the one the labels
    record (labels written before digests record none)."""
    path = os.path.join(directory, MANIFEST)
    if not files.exists(path):
      raise LabelError(f'No stored labels at {directory}. Produce them with: python -m '
                       f'sre2l_jax.main --config=<config> --workdir=<workdir> '
                       f'--stages=relabel (with relabel.mode=stored).')
    manifest = read_manifest(directory)
    problems = []
    if manifest['images_sha256'] != images_digest(images):
      problems.append('they were made for other images (the distilled set changed)')
    made_by = manifest.get(TEACHER_KEY)
    if teacher_digest and made_by and made_by != teacher_digest:
      problems.append(f'they were made by another teacher (SHA-256 {made_by[:12]}, the '
                      f'teacher is now {teacher_digest[:12]})')
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

  def verify(self) -> 'StoredLabels':
    """Checks every shard against its SHA-256 (call before a student trains: a bad shard
    found halfway would waste the first half)."""
    for shard in self.manifest['shards']:
      self._check(shard)
    return self

  def _check(self, shard: dict) -> bytes:
    """The shard's bytes, read once (a download in a bucket) and checked."""
    path = os.path.join(self.directory, shard['file'])
    if not files.exists(path):
      raise LabelError(f'Label shard {path} is missing. Re-run --stages=relabel after '
                       f'removing {self.directory}.')
    data = files.read_bytes(path)
    if hashlib.sha256(data).hexdigest() != shard['sha256']:
      raise LabelError(f'Label shard {path} is corrupted or truncated (SHA-256 mismatch). '
                       f'Re-run --stages=relabel after removing {self.directory}.')
    return data

  def shard_for(self, epoch: int) -> dict:
    for shard in self.manifest['shards']:
      if shard['epochs'][0] <= epoch < shard['epochs'][1]:
        return shard
    raise LabelError(f'No label shard covers epoch {epoch} in {self.directory}.')

  def epoch(self, epoch: int) -> dict:
    """Stored arrays of one epoch, each (steps_per_epoch, batch, k or C)."""
    shard = self.shard_for(epoch)
    if self._cache[0] != shard['file']:
      data = self._check(shard)  # again: a shard may change while students train
      with np.load(io.BytesIO(data)) as data:
        self._cache = (shard['file'], {k: data[k] for k in data.files})
    arrays = self._cache[1]
    return {k: v[epoch - shard['epochs'][0]] for k, v in arrays.items()}


def read_manifest(directory: str) -> dict:
  """The manifest of the label directory `directory`, its shard names checked: each a plain
  file name in `directory` (no folder, no '..': a manifest cannot make a reader open files
  elsewhere)."""
  path = os.path.join(directory, MANIFEST)
  remake = f'remove {directory} and re-run --stages=relabel'
  manifest = files.read_json(path, remake=remake)
  for shard in manifest.get('shards', []):
    name = shard.get('file') if isinstance(shard, dict) else None
    if (not isinstance(name, str) or not name or name in ('.', '..') or '/' in name
        or '\\' in name or '..' in name):
      raise LabelError(f'{path} names the shard file {name!r}; a shard must be a file name '
                       f'inside {directory} (no folders, no ".."): the manifest is damaged '
                       f'or not this program\'s; {remake}.')
  return manifest


def _made_for(manifest: dict, other: dict) -> dict:
  """What a manifest says the labels were made for (the temperature only matters to top-k;
  the teacher's digest only where `other` records one too: labels made before digests)."""
  out = {k: v for k, v in manifest.items() if k not in ('shards', 'complete', 'bytes')}
  if out.get('storage') != 'topk':
    out.pop('temperature', None)
  if TEACHER_KEY not in other:
    out.pop(TEACHER_KEY, None)
  return out


def write_labels(directory: str, images: np.ndarray, schedule: views.Schedule, cfg, spec,
                 teacher_logits: Callable, mesh, temperature: float, *,
                 overwrite: bool = False, teacher_digest: str | None = None) -> dict:
  """Runs `teacher_logits(views)` on every view of the schedule and stores its outputs;
  resumable at shard granularity (finished shards listed in the manifest are kept; finished
  labels are left untouched).

  cfg: the relabel config. teacher_logits: jitted views (B, H, W, C) sharded on 'data' ->
  logits (B, num_classes) replicated. teacher_digest: `teacher.digest`, recorded. Labels of
  other images, settings or teacher in `directory` are refused (LabelError) unless
  `overwrite`, which deletes them first.
  """
  manifest_path = os.path.join(directory, MANIFEST)
  manifest = {'storage': cfg.storage, 'topk': cfg.topk if cfg.storage == 'topk' else None,
              'temperature': temperature, 'num_images': schedule.num_images,
              'batch_size': schedule.batch_size, 'epochs': schedule.epochs,
              'steps_per_epoch': schedule.steps_per_epoch, 'seed': schedule.seed,
              'num_classes': spec.num_classes, 'images_sha256': images_digest(images),
              'view': views.view_settings(cfg), 'shards': []}
  if teacher_digest:
    manifest[TEACHER_KEY] = teacher_digest
  if files.exists(manifest_path):
    old = read_manifest(directory)
    differences = checkpoint.diff(_made_for(old, manifest), _made_for(manifest, old))
    if differences and not overwrite:
      raise LabelError(f'{directory} holds labels made for other images or settings '
                       f'({"; ".join(differences)}); refusing to replace them. Pass '
                       f'--overwrite to replace them, or use another --workdir.')
    if differences:
      if jax.process_index() == 0:
        files.rmtree(directory)
    else:
      # Keep the finished shards up to the first missing or damaged one: shards after a
      # gap would otherwise hide it (relabel resumes after the last kept shard).
      for s in old['shards']:
        path = os.path.join(directory, s['file'])
        end = manifest['shards'][-1]['epochs'][1] if manifest['shards'] else 0
        if (s['epochs'][0] != end or not files.exists(path)
            or sha256_file(path) != s['sha256']):
          break
        manifest['shards'].append(s)
      if old.get('complete') and manifest['shards'] == old['shards'] and (
          manifest['shards'] and manifest['shards'][-1]['epochs'][1] == schedule.epochs):
        return old  # finished and intact: nothing to do
  files.makedirs(directory)
  done = max([s['epochs'][1] for s in manifest['shards']], default=0)

  sharded = batching.data_sharding(mesh)
  views_fn = views.create_batch_views(cfg, spec, mesh)
  per_shard = max(1, cfg.epochs_per_shard)
  for first in range(done, schedule.epochs, per_shard):
    last = min(schedule.epochs, first + per_shard)
    outputs = []
    for epoch in range(first, last):
      epoch_outputs = []
      for b in range(schedule.steps_per_epoch):
        batch = jax.device_put(images[schedule.batch_indices(epoch, b)], sharded)
        batch_views, _, _ = views_fn(schedule.view_key(epoch, b), batch)
        epoch_outputs.append(teacher_logits(batch_views))
      # Fetched per epoch: a whole shard of pending device results at once has crashed
      # XLA's CPU runtime (jaxlib 0.10.2, 8 host devices).
      outputs.append(np.stack(jax.device_get(epoch_outputs)))
    logits = np.asarray(outputs, np.float32).reshape(
        (last - first, schedule.steps_per_epoch, schedule.batch_size, spec.num_classes))
    name = f'labels_{first:06d}_{last:06d}.npz'
    path = os.path.join(directory, name)
    if jax.process_index() == 0:
      data = _write_shard(path, compress(logits, cfg.storage, cfg.topk, temperature))
      manifest['shards'].append({'file': name, 'epochs': [first, last],
                                 'sha256': hashlib.sha256(data).hexdigest(),
                                 'bytes': len(data)})
      files.write_json(manifest_path, manifest)
  manifest['bytes'] = sum(s['bytes'] for s in manifest['shards'])
  manifest['complete'] = True
  files.write_json(manifest_path, manifest)
  return manifest
