"""Real candidate images judged by the teacher: random crops, the teacher's score of the true
class, its features, and k-means over them. Shared by the scored starting images
(`selection`), RDED (`rded`) and the k-means coreset baseline (`image_sets.coreset`)."""

import jax
import jax.numpy as jnp
import numpy as np

from sre2l_jax import models
from sre2l_jax.data import augment


def random_crops(keys, images, size: tuple[int, int], scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
  """Random resized crops: crop k of image i from keys[i, k].

  keys (N, K); images (N, H, W, C) float; size (h, w). Returns (N, K, h, w, C).
  """
  return jax.vmap(lambda ks, image: jax.vmap(lambda k: augment.random_resized_crop(
      k, image, size, scale, ratio=ratio))(ks))(keys, images)


def class_scores(logits, labels, *, log: bool):
  """The teacher's probability of each row's true class (log: its log-probability, -CE).
  logits (..., K) float; labels (...) int, or () for all."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.log_softmax(logits, axis=-1) if log else jax.nn.softmax(logits)
  labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), probs.shape[:-1])
  return jnp.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]


def logits_and_features(model, variables, x):
  """(logits (B, K), features (B, D) float32: the last BatchNorm layer's input averaged over
  (H, W)) of the teacher on normalised images x (B, H, W, C), in inference mode."""
  logits, state = model.apply(variables, x, train=False, mutable=[models.BN_INPUTS])
  *_, (_, last) = models.iter_in_call_order(state[models.BN_INPUTS])
  return logits, jnp.mean(last.astype(jnp.float32), axis=tuple(range(1, last.ndim - 1)))


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """(N, K) squared Euclidean distances of rows of x (N, D) to centroids (K, D)."""
  return ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)


def kmeans(features: np.ndarray, k: int, rng: np.random.Generator,
           max_iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """(centroids (k, D), cluster index (N,) of each row) of features (N, D), float64:
  k-means++ seeding, then Lloyd's iterations (at most `max_iterations`) until no assignment
  changes; an empty cluster keeps its centroid. The assignment is the last one made, of
  which the centroids are the means."""
  x = np.asarray(features, np.float64)
  centroids = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    distance = np.min(squared_distances(x, np.asarray(centroids)), axis=1)
    total = distance.sum()
    centroids.append(x[rng.choice(len(x), p=distance / total)] if total > 0
                     else x[rng.integers(len(x))])
  centroids = np.asarray(centroids)
  assign = np.zeros(len(x), np.int64)
  for i in range(max_iterations):
    new = np.argmin(squared_distances(x, centroids), axis=1)
    if i and np.array_equal(new, assign):  # the centroids would not move
      break
    assign = new
    for j in range(k):
      if np.any(assign == j):
        centroids[j] = x[assign == j].mean(0)
  return centroids, assign


def herding(features: np.ndarray, k: int) -> np.ndarray:
  """Indices of k distinct rows of features (N, D), in the order chosen by herding (Welling
  2009, as iCaRL picks its exemplars): each next row is the one that brings the mean of the
  rows chosen so far nearest the mean of all rows (ties: the lower index). No random draw."""
  x = np.asarray(features, np.float64)
  target, total = x.mean(0), np.zeros(x.shape[1])
  free = np.ones(len(x), bool)
  chosen = []
  for t in range(1, k + 1):
    distance = (((total + x) / t - target) ** 2).sum(-1)
    distance[~free] = np.inf
    i = int(np.argmin(distance))
    chosen.append(i)
    free[i] = False
    total += x[i]
  return np.asarray(chosen, np.int64)


def nearest_to_centroids(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """For each centroid in turn, the index of the nearest row of features not taken by an
  earlier centroid (k distinct rows; ties: the lower index)."""
  distances = squared_distances(np.asarray(features, np.float64), centroids)
  chosen = []
  for j in range(len(centroids)):
    order = np.argsort(distances[:, j], kind='stable')
    chosen.append(next(int(i) for i in order if int(i) not in chosen))
  return np.asarray(chosen, np.int64)
