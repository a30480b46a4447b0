"""Per-class statistics of every BN input of the teacher, over the real training set.

For BN layer l and class k: the mean and the biased variance over (N, H, W) of the layer's
input, N running over the training images of class k, and the within-image variance (the
biased variance over (H, W) of one image, averaged over the class's images), the teacher in
inference mode (its running statistics normalise, as during recovery). These are what the
`edc` method matches a group's images of one class against (EDC's soft category-aware
matching); the two variances give the variance n real images of the class are expected to
have together (`edc.expected_variance`).

Computed once per (teacher, dataset) and stored beside the teacher as
`class_stats-<digest>.npz`, the digest naming the teacher's weights and the data it was
computed on; a teacher folder that cannot be written (read-only, another user's) gets it in
the run's `recover/` folder instead. The teacher's own files are never touched.
"""

import hashlib
import io
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import models
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

KEY = 'class_stats'  # the entry of the teacher's variables that carries them during recovery
STATISTICS = ('mean', 'var', 'within_var')  # per layer, each (K, C), as recovery gets them


def layer_paths(batch_stats: dict) -> list[tuple[str, ...]]:
  """Paths of the BN layers in `batch_stats` (each a dict with 'mean' and 'var')."""
  out = []
  for path, _ in models.iter_in_call_order(batch_stats):
    if path[-1] == 'mean':
      out.append(path[:-1])
  return out


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def create_sums_fn(model, num_classes: int, spec: datasets.DatasetSpec):
  """A jitted (variables, image uint8 (B, H, W, C), label (B,), mask (B,)) -> per BN layer
  {path: (sum (K, C), sum of squares (K, C), count (K,), sum of within-image variances
  (K, C), images (K,))}: the first three of the layer's input minus its running mean
  (shifted, so that the host's E[x^2] - E[x]^2 does not cancel), over the images of each
  class and their (H, W) positions; the within-image variance of each image over (H, W),
  two-pass."""

  def sums(variables, image, label, mask):
    x = datasets.normalise(image, spec)
    _, state = model.apply(variables, x, train=False, mutable=[models.BN_INPUTS])
    weights = jax.nn.one_hot(label, num_classes, dtype=jnp.float32) * mask[:, None]  # (B, K)
    out = {}
    for path, inputs in models.iter_in_call_order(state[models.BN_INPUTS]):
      layer = path[:-1] + (path[-1][:-len('_input')],)
      shifted = inputs.astype(jnp.float32) - _get(variables['batch_stats'], layer)['mean']
      first = jnp.sum(shifted, axis=(1, 2))  # (B, C)
      second = jnp.sum(jnp.square(shifted), axis=(1, 2))
      dot = lambda a: jnp.einsum('bk,bc->kc', weights, a, precision=jax.lax.Precision.HIGHEST)
      images = jnp.sum(weights, axis=0)
      count = images * inputs.shape[1] * inputs.shape[2]
      within = jnp.var(inputs.astype(jnp.float32), axis=(1, 2))  # (B, C), biased
      out['/'.join(layer)] = (dot(first), dot(second), count, dot(within), images)
    return out

  return jax.jit(sums)


def compute(model, variables: dict, split, num_classes: int, spec: datasets.DatasetSpec,
            mesh, batch_size: int) -> dict:
  """Per-class BN-input statistics over `split` (a `pipeline.Split`, one ordered pass).

  Returns a tree shaped like variables['batch_stats'] whose leaves are {'mean': (K, C),
  'var': (K, C), 'within_var': (K, C)} float32 (K = num_classes; a class without images
  gets the running statistics, its within-image variance the running variance), plus
  'count' (K,) float64 (values per channel) per layer.
  """
  sums_fn = create_sums_fn(model, num_classes, spec)
  totals = None
  for batch in split.eval_batches(batch_size, batching.data_sharding(mesh)):
    part = jax.device_get(sums_fn(variables, batch['image'], batch['label'], batch['mask']))
    part = {k: tuple(np.asarray(a, np.float64) for a in v) for k, v in part.items()}
    totals = part if totals is None else {
        k: tuple(t + p for t, p in zip(totals[k], part[k])) for k in totals}
  out = {}
  for name, (first, second, count, within, images) in totals.items():
    path = tuple(name.split('/'))
    running = _get(variables['batch_stats'], path)
    running_mean = np.asarray(jax.device_get(running['mean']), np.float64)
    running_var = np.asarray(jax.device_get(running['var']), np.float64)
    n = np.maximum(count, 1.0)[:, None]
    shift = first / n
    mean = running_mean + shift
    var = np.maximum(second / n - np.square(shift), 0.0)
    within = within / np.maximum(images, 1.0)[:, None]
    empty = count == 0
    mean[empty], var[empty], within[empty] = running_mean, running_var, running_var
    _set(out, path, {'mean': mean.astype(np.float32), 'var': var.astype(np.float32),
                     'within_var': within.astype(np.float32), 'count': count})
  return out


def weights_digest(variables: dict) -> str:
  """SHA-256 over the teacher's arrays, in tree order: what class statistics record."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(jax.device_get(variables)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def file_name(expected: dict) -> str:
  digest = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()
  return f'class_stats-{digest[:16]}.npz'


def save(path: str, stats: dict, expected: dict) -> None:
  arrays = {}
  for path_, layer in _layers(stats):
    for key, value in layer.items():
      arrays['/'.join(path_ + (key,))] = value
  arrays['__fingerexpected_'] = np.frombuffer(json.dumps(expected, sort_keys=True).encode(),
                                            np.uint8)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files.atomic_write(path, buffer.getvalue())


def load(path: str, expected: dict) -> dict | None:
  """The statistics stored at `path`, or None if missing, unreadable, for other inputs or
  without a layer's within-image variance (stored before it was)."""
  if not files.exists(path):
    return None
  try:
    with np.load(io.BytesIO(files.read_bytes(path))) as data:
      stored = json.loads(bytes(data['__fingerexpected_']).decode())
      if stored != json.loads(json.dumps(expected, sort_keys=True)):
        return None
      out = {}
      for name in data.files:
        if name != '__fingerexpected_':
          _set(out, tuple(name.split('/')), np.asarray(data[name]))
      if any(k not in layer for _, layer in _layers(out) for k in STATISTICS):
        logging.info('class_stats: %s predates the within-image variance; recomputing', path)
        return None
      return out
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damaged
    logging.warning('class_stats: ignoring unreadable %s (%s); recomputing', path, e)
    return None


def _layers(stats: dict, prefix=()):
  """(path, {'mean', 'var', 'count'}) of every layer of a statistics tree."""
  for key, value in stats.items():
    if isinstance(value, dict) and 'mean' in value and not isinstance(value['mean'], dict):
      yield prefix + (key,), value
    elif isinstance(value, dict):
      yield from _layers(value, prefix + (key,))


def load_or_compute(config, variables: dict, split_fn, teacher_dir: str, fallback_dir: str,
                    mesh) -> dict:
  """The teacher's per-class statistics: read from beside the teacher (or `fallback_dir`),
  else computed over `split_fn()` (the training split) and stored. Returns the tree of
  `compute` without the counts, leaves float32 (K, C)."""
  spec = datasets.spec_of(config.dataset)
  num_classes = spec.num_classes
  expected = fingerprints.record('class_stats', config,
                                teacher_weights_sha256=weights_digest(variables),
                                num_classes=int(num_classes))
  name = file_name(expected)
  candidates = [os.path.join(teacher_dir, name), os.path.join(fallback_dir, name)]
  for path in candidates:
    stats = load(path, expected)
    if stats is not None:
      logging.info('class_stats: read %s', path)
      return strip_counts(stats)
  model = models.create_model(config.teacher, num_classes)
  batch_size = config.squeeze.eval_batch_size
  stats = compute(model, variables, split_fn(), num_classes, spec, mesh, batch_size)
  if jax.process_index() == 0:
    for path in candidates:
      try:
        save(path, stats, expected)
        logging.info('class_stats: computed and wrote %s', path)
        break
      except OSError as e:
        logging.warning('class_stats: cannot write %s (%s)', path, e)
  return strip_counts(stats)


def strip_counts(stats: dict) -> dict:
  out = {}
  for path, layer in _layers(stats):
    _set(out, path, {k: np.asarray(layer[k], np.float32) for k in STATISTICS})
  return out


def abstract(batch_stats: dict, num_classes: int) -> dict:
  """`load_or_compute`'s tree as shapes, from the teacher's batch_stats (for dry runs)."""
  out = {}
  for path in layer_paths(batch_stats):
    leaf = _get(batch_stats, path)['mean']
    shape = jax.ShapeDtypeStruct((num_classes,) + tuple(leaf.shape), jnp.float32)
    _set(out, path, {k: shape for k in STATISTICS})
  return out
