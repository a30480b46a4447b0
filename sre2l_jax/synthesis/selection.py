"""Real starting images chosen by the teacher (recover.init='scored'): score and coverage.

Per class (RDED's realism score, as EDC initialises): `recover.scored.candidates` random real
images of the class; each is scored on `recover.scored.crops` random-resized crops (scale
recover.min_scale..max_scale; 1: the whole image, no crop) by the teacher's probability of
the true class, and keeps its best crop (one per source image, so no image fills two
places). Then `ipc` of them: with `recover.scored.coverage`, k-means (Lloyd, k = ipc) on the
teacher's features of the candidates (the last BN layer's input averaged over H, W) and the
best-scored candidate of each cluster (`recover.scored.pick='score'`; 'centre': the one
nearest the cluster's mean, as the k-means coreset picks; 'hardest': the lowest-scored; or
'herding', no clusters: herding's choice, whose features' mean stays nearest the
candidates'), so the set spreads over the class
instead of piling on its most typical images (at Fashion-MNIST IPC 10 the plain top 10 scored 82.96% against
the random subset's 83.46%, issue 13); without it, the top `ipc` by score. The chosen
images of a class are ordered best score first (ipc index 0 = best).

The candidates are scored as they are read (`Split.candidate_batches`, a streamed split
included): the host keeps per candidate its best crop's score, crop key and features, and
reads the chosen images again (`Split.take`) to crop them again. A candidate's crop keys come
from its position in the candidate stream (`crop_keys`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from sre2l_jax import rngs
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.synthesis.candidates import class_scores
from sre2l_jax.synthesis.candidates import herding
from sre2l_jax.synthesis.candidates import kmeans
from sre2l_jax.synthesis.candidates import logits_and_features
from sre2l_jax.synthesis.candidates import random_crops


# recover.scored.pick: a cluster's best-scored, most typical, or lowest-scored source image;
# or, without clusters, herding's choice.
PICKS = ('score', 'centre', 'hardest', 'herding')


def check_pick(pick: str) -> None:
  if pick not in PICKS:
    raise ValueError(f"recover.scored.pick={pick!r}; valid: 'score' (the best-scored of each "
                     f"cluster), 'centre' (the one nearest its mean), 'hardest' (the "
                     f"lowest-scored), 'herding' (no clusters: herding toward the class's "
                     f"mean feature).")


def best_per_source(scores: np.ndarray, sources: np.ndarray) -> np.ndarray:
  """Index of the best-scored candidate of every source image (sorted by source id)."""
  order = np.lexsort((-scores, sources))  # by source, best score first within a source
  first = np.ones(len(order), bool)
  first[1:] = sources[order][1:] != sources[order][:-1]
  return order[first]


def select(scores: np.ndarray, sources: np.ndarray, count: int, features=None,
           rng: np.random.Generator | None = None, pick: str = 'score',
           iterations: int = 20) -> np.ndarray:
  """Indices of `count` candidates, at most one per source image, best score first.

  scores (N,): higher is better; sources (N,): the source image of each candidate (crops of
  one image share it). features (N, D) or None: None takes the `count` best-scored sources'
  best candidates; else k-means with k = count over the sources' best candidates, and of
  each cluster the best-scored (pick 'score'), the one nearest the cluster's mean (pick
  'centre': the k-means coreset's choice, the cluster's most typical member) or the
  lowest-scored (pick 'hardest': the source the teacher is least sure of, its score its best
  crop's); pick 'herding' instead takes herding's choice over the sources' best candidates
  (`candidates.herding`: the chosen features' mean kept nearest the class's; no k-means, no
  random draw). `iterations`: k-means's Lloyd iterations at most.
  """
  check_pick(pick)
  best = best_per_source(scores, sources)
  if len(best) < count:
    raise ValueError(f'{len(best)} source images cannot give {count} distinct starting '
                     f'images; raise recover.scored.candidates.')
  if features is None:
    chosen = best[np.argsort(-scores[best], kind='stable')[:count]]
  elif pick == 'herding':
    chosen = best[herding(features[best], count)]
  else:
    feats = np.asarray(features, np.float64)[best]
    _, assign = kmeans(feats, count, rng or np.random.default_rng(0), max_iterations=iterations)
    chosen = []
    for j in range(count):
      members = np.flatnonzero(assign == j)
      if not len(members):
        continue
      if pick == 'score':
        chosen.append(best[members[np.argmax(scores[best[members]])]])
      elif pick == 'hardest':
        chosen.append(best[members[np.argmin(scores[best[members]])]])
      else:
        distance = ((feats[members] - feats[members].mean(0)) ** 2).sum(-1)
        chosen.append(best[members[np.argmin(distance)]])
    chosen = np.asarray(chosen)
    if len(chosen) < count:  # an empty cluster: fill with the best remaining sources
      rest = np.setdiff1d(best, chosen)
      chosen = np.concatenate([chosen, rest[np.argsort(-scores[rest], kind='stable')]
                               [:count - len(chosen)]])
  return chosen[np.argsort(-scores[chosen], kind='stable')]


def create_crop_fn(spec: datasets.DatasetSpec, cfg):
  """A jitted (images uint8 (N, H, W, C), keys (N, K)) -> crops normalised (N, K, H, W, C):
  K = recover.scored.crops random-resized crops (scale min_scale..max_scale) of each image, crop
  k from keys[:, k]; K = 1 is the whole image."""
  size = spec.image_shape[:2]

  def crop(images, keys):
    x = datasets.normalise(images, spec)
    if cfg.scored.crops == 1:
      return x[:, None]
    return random_crops(keys, x, size, (cfg.min_scale, cfg.max_scale))

  return jax.jit(crop)


def create_score_fn(model, spec: datasets.DatasetSpec, cfg, mesh=None):
  """A jitted (variables, images uint8 (N, H, W, C), labels (N,), key data uint32 (N, K, 2))
  -> (scores (N, K) = the teacher's probability of the label on each crop of
  `create_crop_fn`, features (N, K, D) = the last BN layer's input averaged over H, W).
  With a `mesh`, the candidates are split over its 'data' axis (N a multiple of its size,
  the inputs placed by `batching.data_sharding`) and the outputs replicated."""
  crop_fn = create_crop_fn(spec, cfg)

  def score(variables, images, labels, key_data):
    x = crop_fn(images, jax.random.wrap_key_data(key_data))
    flat = x.reshape((-1,) + x.shape[2:])
    logits, features = logits_and_features(model, variables, flat)
    hit = class_scores(logits, jnp.repeat(labels, x.shape[1]), log=False)
    return hit.reshape(x.shape[:2]), features.reshape(x.shape[:2] + features.shape[1:])

  if mesh is None:
    return jax.jit(score)
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(score, in_shardings=(replicated, sharded, sharded, sharded),
                 out_shardings=replicated)


def crop_keys(key, offset: int, count: int, crops: int):
  """The crop keys (count, crops) of the `count` candidates read from position `offset` of
  the candidate stream on: a pure function of the position (one split per `chunk`)."""
  return jax.random.split(jax.random.fold_in(key, offset), count * crops).reshape(
      (count, crops))


def scored_images(config, model, variables, train_split, num_classes: int, mesh=None,
                  chunk: int = 256) -> np.ndarray:
  """The starting images (num_classes, ipc, H, W, C) normalised float32 (host), chosen per
  class as the module docstring says. Deterministic in config.seed.

  One pass over the candidates (`Split.candidate_batches`, `chunk` at a time): each is
  scored on its crops and keeps only its best crop's score, key and features; the chosen
  images are read again (`Split.take`) and cropped again. So the host holds a chunk of
  images and, per candidate, its D features and a few numbers, whatever num_classes *
  scored.candidates is. With a
  `mesh` (variables replicated on it), each chunk is scored across its devices.
  """
  cfg = config.recover
  spec = datasets.spec_of(config.dataset)
  rng = rngs.numpy_rng('recover_init_scored', config.seed)
  per_class = cfg.scored.candidates or _smallest_class(train_split, num_classes)
  score_fn = create_score_fn(model, spec, cfg, mesh)
  place = ((lambda a: a) if mesh is None else
           (lambda a: jax.device_put(a, batching.data_sharding(mesh))))
  multiple = 1 if mesh is None else mesh.size
  key = rngs.stream_key(config.seed, 'recover_init_crops')
  labels, ids, keys, scores, features = [], [], [], [], []
  offset = 0
  for images, batch_labels, batch_ids in batching.named_draw(train_split.candidate_batches(
      num_classes, per_class, rng, chunk), 'recover.scored.candidates'):
    n = len(batch_labels)
    key_data = np.asarray(jax.random.key_data(crop_keys(key, offset, n, cfg.scored.crops)))
    padded = batching.pad_rows([images, batch_labels, key_data], multiple)  # repeats dropped
    score, feature = jax.device_get(score_fn(variables, *(place(a) for a in padded)))
    score, feature = np.asarray(score)[:n], np.asarray(feature)[:n]
    top = np.argmax(score, axis=1)  # each source image's best crop
    rows = np.arange(n)
    keys.append(key_data[rows, top])
    scores.append(score[rows, top])
    features.append(feature[rows, top])
    labels.append(batch_labels)
    ids.append(batch_ids)
    offset += n
  labels, ids, keys, scores, features = map(np.concatenate,
                                            (labels, ids, keys, scores, features))
  crop_fn = create_crop_fn(spec, cfg)
  out = np.zeros((num_classes, cfg.ipc) + spec.image_shape, np.float32)
  for c in range(num_classes):
    rows = np.flatnonzero(labels == c)
    chosen = rows[select(scores[rows], rows, cfg.ipc,
                         features[rows] if cfg.scored.coverage else None, rng, cfg.scored.pick,
                         cfg.scored.iterations)]
    best = jax.random.wrap_key_data(keys[chosen])[:, None]
    crops = crop_fn(train_split.take(ids[chosen]), best)[:, 0]
    # Through uint8, as a real image is stored.
    out[c] = np.asarray(datasets.normalise(datasets.denormalise(crops, spec), spec))
  return out


def check_candidates(cfg) -> None:
  """recover.scored.candidates gives ipc distinct starting images per class (cfg: recover's)."""
  if cfg.init == 'scored' and 0 < cfg.scored.candidates < cfg.ipc:
    raise ValueError(f'recover.scored.candidates={cfg.scored.candidates} gives fewer than '
                     f'recover.ipc={cfg.ipc} distinct starting images per class: raise it to '
                     f'>= {cfg.ipc} (0: all of each class).')


def check_class_sizes(cfg, smallest: int, train_limit: int) -> None:
  """With scored.candidates=0 (all of each class): every class has ipc images (before any
  work); smallest: the images of the training split's smallest recovered class."""
  if smallest < cfg.ipc:
    limit = f' (dataset.train_limit={train_limit})' if train_limit else ''
    raise ValueError(f'recover.ipc={cfg.ipc} with recover.init={cfg.init!r} needs {cfg.ipc} '
                     f'distinct real images per class; the smallest class of the training '
                     f'split{limit} has {smallest}: lower recover.ipc to {smallest} or less, '
                     f'use more training images (dataset.train_limit), or recover.init=noise.')


def _smallest_class(split, num_classes: int) -> int:
  _, labels = split.arrays()  # 0 (all of the class) needs an in-memory split
  return int(np.bincount(labels, minlength=num_classes)[:num_classes].min())
