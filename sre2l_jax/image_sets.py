"""The image sets students are trained on: the distilled set recover wrote, and the
same-protocol baselines: the class-balanced random real subset and the k-means coreset."""

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import label_store
from sre2l_jax import rngs
from sre2l_jax import teacher as teacher_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.data import user_data
from sre2l_jax.synthesis import candidates

BASELINES = ('random', 'coreset', 'hard_label', 'full_data')
# The full-data variant: the student trained with hard labels on the whole real training
# split (DD-Ranking's 'real-hard', the first term of its hard label recovery).
# Recover settings a run may change on resume: they change neither the images nor their
# meaning (the round size is kept from the first start, see `recover.plan_rounds`).
TEACHER_KEY = 'teacher_sha256'


def recovered_classes(cfg: ml_collections.ConfigDict, spec: datasets.DatasetSpec) -> int:
  """How many classes get images: classes 0..N-1 with N = recover.num_classes if set (> 0,
  smoke runs on 1000-class datasets), else all of the dataset's classes."""
  return cfg.num_classes or spec.num_classes


def distilled_dir(workdir: str) -> str:
  """Where recover writes the distilled set as a TFDS dataset."""
  return os.path.join(workdir, 'recover', 'tfds')


def with_images_digest(workdir: str, result: dict, images: np.ndarray | None = None) -> dict:
  """recover's `result` with `images_sha256`; a result written before digests gets the
  digest of the set as it is now (`images`, or read from the workdir) recorded once."""
  if 'images_sha256' in result:
    return result
  if images is None:
    images, _ = distilled_set(workdir)
  result = dict(result, images_sha256=label_store.images_digest(images))
  logging.info('recover: %s predates image digests; recorded the distilled set\'s (%s)',
               os.path.join(workdir, 'recover', checkpoint.RESULT), result['images_sha256'][:12])
  files.write_json(os.path.join(workdir, 'recover', checkpoint.RESULT), result)
  return result


def check_recovered(config: ml_collections.ConfigDict, workdir: str,
                    images: np.ndarray) -> None:
  """Refuses a distilled set `images` that recover made in `workdir` under other settings,
  with another teacher, or that changed since recover wrote it. A set that no recover run
  of this workdir made (no recover/fingerprint.json: an imported one) is taken as it is."""
  stage_dir = os.path.join(workdir, 'recover')
  path = os.path.join(stage_dir, checkpoint.FINGERPRINT)
  if not files.exists(path):
    return
  mesh = batching.create_mesh(config.mesh_shape)
  config = teacher_lib.for_recover(config)  # the teachers recover matched (and recorded)
  key = files.normalised(fingerprints.record(
      'recover', config, **{TEACHER_KEY: teacher_lib.digest(config, workdir, mesh)}))
  # A set recovered before teacher digests records none (recover records it when next run).
  saved = files.read_json(path, remake=f'restore it, or remove {stage_dir} and recover again')
  rerun = (f'recover again with this config into a new --workdir, or remove {stage_dir} '
           f'(and relabel/, evaluate/) and run --stages=recover,...')
  # Settings first: recover.teachers changes the teachers recorded as well.
  differences = checkpoint.diff(saved, dict(key, **{TEACHER_KEY: saved.get(TEACHER_KEY)}))
  if differences:
    raise ValueError(
        f'The distilled set in {stage_dir} was recovered under other settings than this '
        f'run\'s: {"; ".join(differences)}. Run with the settings it was made with (the '
        f'values "saved" above), or {rerun}.')
  if saved.get(TEACHER_KEY, key[TEACHER_KEY]) != key[TEACHER_KEY]:
    raise ValueError(
        f'The distilled set in {stage_dir} was recovered with another teacher (SHA-256 '
        f'{saved[TEACHER_KEY][:12]}); the teacher at {teacher_lib.teacher_dir(config, workdir)} '
        f'is now {key[TEACHER_KEY][:12]}. Its soft labels would not be the ones the set was '
        f'made for: restore that teacher, or {rerun}.')
  result = checkpoint.finished_result(stage_dir)
  if result is None:
    raise ValueError(f'recover has not finished in {stage_dir}: run --stages=recover on '
                     f'{workdir} first (it resumes).')
  recorded = with_images_digest(workdir, result, images)['images_sha256']
  found = label_store.images_digest(images)
  if recorded != found:
    raise ValueError(
        f'The distilled set in {distilled_dir(workdir)} is not the one recover wrote (SHA-256 '
        f'{found[:12]}, recover/result.json records {recorded[:12]}): it was changed or '
        f'replaced. Remove {distilled_dir(workdir)} and run --stages=recover on {workdir} '
        f'(it exports the recovered images again).')


def distilled_set(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """The recovered images (uint8, class-major) and labels, or a clear error."""
  directory = distilled_dir(workdir)
  if not files.exists(directory):
    raise FileNotFoundError(
        f'No distilled set in {directory}. Run the recover stage first: python -m '
        f'sre2l_jax.main --config=<config> --workdir={workdir} --stages=recover')
  try:
    return export.read_tfds(export.tfds_dataset_dir(directory))
  except Exception as e:  # pylint: disable=broad-except  # TFDS / ArrayRecord raise many types
    text = ' '.join(str(e).split())[:300] or type(e).__name__
    raise ValueError(
        f'The distilled set in {directory} cannot be read ({text}): it is damaged. Remove '
        f'{directory} and run --stages=recover on {workdir}: it exports the recovered images '
        f'again.') from e


def checked_distilled_set(config: ml_collections.ConfigDict,
                          workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """`distilled_set(workdir)` after `check_recovered`: the set this config and teacher made."""
  images, labels = distilled_set(workdir)
  check_recovered(config, workdir, images)
  return images, labels


def check_external(directory: str) -> None:
  """Refuses an `evaluate.images_dir` that is not a folder."""
  if not files.isdir(directory):
    raise ValueError(f'evaluate.images_dir={directory} is not a folder; give the folder of a '
                     f'distilled set (one sub-folder of images per class).')


def external_set(directory: str, spec: datasets.DatasetSpec, num_classes: int,
                 ipc: int) -> tuple[np.ndarray, np.ndarray]:
  """A distilled set made elsewhere, an image folder: its sorted sub-folders are classes
  0..num_classes-1 (the reference repos' `new000/class000_id000.jpg` sort so), each holding
  `ipc` images, read in file-name order and brought to `spec.image_shape` as an image
  folder dataset's are (`user_data.read_image`). Images uint8 (num_classes * ipc, H, W, C)
  class-major, labels int32. Raises ValueError, naming what to fix, before reading pixels."""
  check_external(directory)
  classes = sorted(e.name for e in os.scandir(directory)
                   if e.is_dir() and not e.name.startswith('.'))
  if len(classes) != num_classes:
    raise ValueError(f'evaluate.images_dir={directory} has {len(classes)} class folders; the '
                     f'run evaluates {num_classes} classes (recover.num_classes, or the '
                     f'dataset\'s).')
  paths = []
  for name in classes:
    images = [os.path.join(directory, name, f)
              for f in user_data.images_of(os.path.join(directory, name))[0]]
    if len(images) != ipc:
      raise ValueError(f'{os.path.join(directory, name)} holds {len(images)} images; '
                       f'recover.ipc={ipc} (the baselines are drawn at it): set '
                       f'--config.recover.ipc={len(images)} if that is the set\'s IPC.')
    paths += images
  height, width, channels = spec.image_shape
  if height != width:
    raise ValueError(f'{spec.name} has {height} x {width} images; evaluate.images_dir '
                     f'reads square images only.')
  images = np.stack([user_data.read_image(p, height, channels)[0] for p in paths])
  return images, np.repeat(np.arange(num_classes), ipc).astype(np.int32)


def random_subset(config: ml_collections.ConfigDict, ipc: int) -> tuple[np.ndarray, np.ndarray]:
  """A class-balanced random subset of real training images (the same-protocol baseline),
  of the classes the recover stage covers: images uint8 (C * ipc, H, W, C), labels int32."""
  spec = datasets.spec_of(config.dataset)
  train = pipeline.load_split(config.dataset, 'train')
  try:
    return train.class_balanced_subset(recovered_classes(config.recover, spec), ipc,
                                       rngs.numpy_rng('random_subset', config.seed))
  except batching.TooFewPerClass as e:
    raise ValueError(f'The random-subset baseline: {e} Remove "random" from '
                     f'evaluate.baselines to skip it.') from e


def _features_fn(model, spec: datasets.DatasetSpec):
  """(variables, images uint8 (B, H, W, C)) -> the teacher's features (B, D) float32
  (`candidates.logits_and_features`: the space of the issue-13 coreset)."""
  return lambda variables, x: candidates.logits_and_features(
      model, variables, datasets.normalise(x, spec))[1]


def split_features(model, variables, split, spec: datasets.DatasetSpec, mesh,
                   batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """The teacher's features (`_features_fn`) of every image of `split` (a `pipeline.Split`, a
  streamed one included), in order, in one pass: (features (N, D) float32, labels (N,) int32)."""
  features = _features_fn(model, spec)
  step = jax.jit(lambda v, b: (features(v, b['image']), b['label'], b['mask']),
                 out_shardings=batching.replicated(mesh))  # readable on every process
  batch_size = -(-batch_size // mesh.size) * mesh.size
  out, labels = [], []
  for batch in split.eval_batches(batch_size, batching.data_sharding(mesh)):
    feature, label, mask = jax.device_get(step(variables, batch))
    real = np.asarray(mask) > 0  # the last batch's padding out
    out.append(np.asarray(feature)[real])
    labels.append(np.asarray(label, np.int32)[real])
  return np.concatenate(out), np.concatenate(labels)


def coreset(config: ml_collections.ConfigDict, workdir: str,
            ipc: int) -> tuple[np.ndarray, np.ndarray]:
  """The k-means coreset baseline: per class, k-means (k = ipc) over the teacher's features
  (`split_features`) of all its real training images, and the real image nearest each
  centroid. Images uint8 (C * ipc, H, W, C) class-major, labels int32; deterministic in
  config.seed. One pass over the training split (streamed ones included: the host keeps
  the features, N x D floats, and reads the chosen images again)."""
  spec = datasets.spec_of(config.dataset)
  mesh = batching.create_mesh(config.mesh_shape)
  model, variables = teacher_lib.load_one(config, workdir, mesh)  # config.teacher's features
  train = pipeline.load_split(config.dataset, 'train')
  features, labels = split_features(model, variables, train, spec, mesh)
  chosen = []
  for c in range(recovered_classes(config.recover, spec)):
    rows = np.flatnonzero(labels == c)
    if len(rows) < ipc:
      raise ValueError(f'Class {c} has {len(rows)} training images; the coreset needs '
                       f'ipc={ipc}.')
    centroids, _ = candidates.kmeans(features[rows], ipc,
                                     rngs.numpy_rng('coreset', config.seed, c))
    chosen.append(rows[candidates.nearest_to_centroids(features[rows], centroids)])
  chosen = np.concatenate(chosen)
  return train.take(chosen), labels[chosen]


def full_data(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The whole real training split of the classes the recover stage covers: images uint8
  (N, H, W, C), labels int32, in the split's order (held in memory)."""
  spec = datasets.spec_of(config.dataset)
  images, labels = pipeline.load_split(config.dataset, 'train').arrays()
  keep = labels < recovered_classes(config.recover, spec)
  return (images, labels) if keep.all() else (images[keep], labels[keep])


def distilled(config: ml_collections.ConfigDict, workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """The distilled set a run evaluates: evaluate.images_dir's (`external_set`) when set,
  else the one recover wrote in `workdir`, checked against recover's record
  (`checked_distilled_set`)."""
  if not config.evaluate.images_dir:
    return checked_distilled_set(config, workdir)
  spec = datasets.spec_of(config.dataset)
  return external_set(config.evaluate.images_dir, spec, recovered_classes(config.recover, spec),
                      config.recover.ipc)


def image_sets(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """{'distilled': (images, labels), and each of evaluate.baselines' sets ('random',
  'coreset'): (images, labels)} as evaluate uses them."""
  sets = {'distilled': distilled(config, workdir)}
  if 'random' in config.evaluate.baselines:
    sets['random'] = random_subset(config, config.recover.ipc)
  if 'coreset' in config.evaluate.baselines:
    sets['coreset'] = coreset(config, workdir, config.recover.ipc)
  return sets
