"""The k-means coreset baseline (image_sets.coreset): k-means, nearest images, determinism,
the features of a whole split in one pass (held or streamed), and the set built from a
teacher's features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sre2l_jax import image_sets
from sre2l_jax import models
from sre2l_jax import recover
from sre2l_jax import rngs
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.data import streaming
from sre2l_jax.synthesis import candidates

import testlib


def test_kmeans_finds_separated_clusters_and_is_deterministic():
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  x = np.concatenate([c + rng.normal(scale=0.1, size=(30, 2)) for c in centres])
  found = candidates.kmeans(x, 3, np.random.default_rng(1))[0]
  order = np.argsort(found[:, 0] * 100 + found[:, 1])
  expected = np.stack([x[i * 30:(i + 1) * 30].mean(0) for i in range(3)])
  np.testing.assert_allclose(found[order], expected[np.argsort(
      expected[:, 0] * 100 + expected[:, 1])], atol=1e-9)  # each centroid = its cluster mean
  np.testing.assert_array_equal(found, candidates.kmeans(x, 3, np.random.default_rng(1))[0])


def _lloyd_without_stopping(features, k, rng, iterations):
  """The reference: k-means++ then exactly `iterations` Lloyd steps (selection's k-means
  before the candidates module); the cluster index of each row."""
  x = np.asarray(features, np.float64)
  centres = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    distance = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
    total = distance.sum()
    centres.append(x[rng.choice(len(x), p=distance / total)] if total > 0
                   else x[rng.integers(len(x))])
  centres = np.asarray(centres)
  for _ in range(iterations):
    assign = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    for j in range(k):
      if np.any(assign == j):
        centres[j] = x[assign == j].mean(0)
  return assign


def test_kmeans_stopping_early_assigns_as_every_iteration_run():
  """Once no assignment changes the centroids stay: stopping there changes nothing."""
  for seed in range(20):
    features = np.random.default_rng(seed).normal(size=(40, 3))
    for iterations in (1, 2, 20):
      _, assign = candidates.kmeans(features, 5, np.random.default_rng(seed), iterations)
      np.testing.assert_array_equal(assign, _lloyd_without_stopping(
          features, 5, np.random.default_rng(seed), iterations))


def test_nearest_to_centroids_are_the_nearest_distinct_images():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(50, 4))
  centroids = rng.normal(size=(5, 4))
  chosen = candidates.nearest_to_centroids(features, centroids)
  assert len(set(chosen.tolist())) == 5
  d = ((features[:, None] - centroids[None]) ** 2).sum(-1)
  for j, i in enumerate(chosen):  # nearest among the images earlier centroids left
    left = np.setdiff1d(np.arange(50), chosen[:j])
    assert i == left[np.argmin(d[left, j])]
  # Two centroids on the same image: the second takes the next nearest.
  same = candidates.nearest_to_centroids(features, np.stack([features[7], features[7]]))
  assert same[0] == 7 and same[1] == np.argsort(((features - features[7]) ** 2).sum(-1))[1]


class _Records(list):
  """A random-access record source as TFDS's data sources are (for a StreamingSplit)."""

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def _last_bn_input_mean(model, variables, images, spec):
  """The coreset's features written out: the last BN layer's input averaged over (H, W)."""
  _, state = model.apply(variables, datasets.normalise(images, spec), mutable=[models.BN_INPUTS])
  return np.asarray(state[models.BN_INPUTS]['bn1_input']).mean(axis=(1, 2))


def test_split_features_are_the_last_bn_input_averaged_in_one_pass():
  """split_features: the last BN layer's input averaged over (H, W) of every image of a
  split, in order, padding dropped, for an in-memory split and a streamed one (records of
  other sizes, centre-cropped) alike; the coreset reads its chosen images again with `take`."""
  spec = datasets.get_spec('fashion_mnist')
  model = models.ConvNet(num_classes=10, width=4, depth=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + spec.image_shape))
  data = np.random.default_rng(4)
  mesh = batching.create_mesh(8)
  images = data.integers(0, 256, (13,) + spec.image_shape, np.uint8)
  labels = data.integers(0, 10, 13).astype(np.int32)
  features, got_labels = image_sets.split_features(
      model, variables, pipeline.InMemorySplit(images, labels), spec, mesh, batch_size=8)
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(features, _last_bn_input_mean(model, variables, images, spec),
                             rtol=1e-5, atol=1e-5)

  raw = [data.integers(0, 256, (36, 30), np.uint8) for _ in range(11)]
  split = streaming.StreamingSplit(_Records({'image': im, 'label': int(l)}
                                            for im, l in zip(raw, labels)), 11, (28, 28, 1))
  features, got_labels = image_sets.split_features(model, variables, split, spec, mesh,
                                                   batch_size=8)
  cropped = np.stack([streaming.center_crop(im[..., None], (28, 28, 1)) for im in raw])
  np.testing.assert_array_equal(got_labels, labels[:11])
  np.testing.assert_allclose(features, _last_bn_input_mean(model, variables, cropped, spec),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(split.take([9, 2]), cropped[[9, 2]])


def test_coreset_of_a_workdir_teacher(data_dir, tmp_path):
  """coreset(): per class the real images nearest the k-means centroids of the teacher's
  features, class-major, the same for the same seed."""
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.dataset.update(data_dir=data_dir, train_limit=300)
  config.recover.num_classes = 3
  model, variables = testlib.write_teacher(config, str(tmp_path))
  images, labels = image_sets.coreset(config, str(tmp_path), 2)
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
  train = pipeline.load_split(config.dataset, 'train')
  train_images, train_labels = train.arrays()
  all_features, _ = image_sets.split_features(model, variables, train,
                                              datasets.get_spec('fashion_mnist'),
                                              batching.create_mesh(8))
  for c in range(3):
    rows = np.flatnonzero(train_labels == c)
    features = all_features[rows]
    centroids, _ = candidates.kmeans(features, 2, rngs.numpy_rng('coreset', config.seed, c))
    nearest = rows[np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=0)]
    np.testing.assert_array_equal(images[2 * c:2 * c + 2], train_images[nearest])
  again, _ = image_sets.coreset(config, str(tmp_path), 2)
  np.testing.assert_array_equal(again, images)


@pytest.mark.slow
def test_recover_from_the_coreset_starts_from_the_baselines_own_images(data_dir, tmp_path):
  """recover.init='coreset': the refined set starts from coreset()'s images, class by class
  in its centroid order. With an lr of 1e-9 the exported set is the start as stored (each
  pixel moves by ~1e-9 of the normalised range; uint8 steps are 1/255 of it: equal)."""
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.dataset.update(data_dir=data_dir, train_limit=300)
  config.teacher.width = 8
  config.mesh_shape = 8
  config.recover.update(num_classes=2, ipc=4, batch_size=2, iterations=2, lr=1e-9,
                        init='coreset', min_bn_reduction=0, min_teacher_top1=0)
  workdir = str(tmp_path)
  testlib.write_teacher(config, workdir, statistics='measured')
  testlib.run_stage(recover, config, workdir)
  images, labels = image_sets.distilled_set(workdir)
  want, want_labels = image_sets.coreset(config, workdir, 4)
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(images, want)
  spec = datasets.get_spec('fashion_mnist')
  config.recover.ipc = 300  # more than any class of the 300 images has: refused before work
  with pytest.raises(ValueError, match="recover.init='coreset' needs 300"):
    recover.check_draws(config, spec)
  config.recover.init = 'centroid'
  with pytest.raises(ValueError, match="'coreset'"):
    recover.check_settings(config, spec)
